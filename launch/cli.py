"""`opd` command line: train, check, eval, experiment, report, make-tiny."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings

from opd.env import set_quiet_env


def _quiet() -> None:
    set_quiet_env()
    warnings.filterwarnings("ignore")
    import transformers
    transformers.utils.logging.disable_progress_bar()


def cmd_train(args) -> int:
    from launch.config import ManifestError
    from launch.manifest import load_manifest
    from launch.experiment import is_experiment_file
    try:
        for m in filter(is_experiment_file, args.manifests):
            raise ManifestError(f"{m} is an experiment file (it lists arms); run it with `opd experiment {m}`")
        cfg = load_manifest(args.manifests, args.overrides)
    except (ManifestError, FileNotFoundError) as e:
        print(f"opd: bad manifest: {e}", file=sys.stderr)
        return 2
    from launch.driver import train
    from launch.remote import RunStopped
    try:
        summary = train(cfg)
    except ManifestError as e:  # a problem with the files the manifest names, found before any work
        print(f"opd: bad input: {e}", file=sys.stderr)
        return 2
    except RunStopped as e:  # a learner failure, an actor that keeps failing, a run gone non-finite
        print(f"opd: run stopped: {e}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


def cmd_check(args) -> int:
    """Validate a manifest without loading models or data, and check its layout against a described
    or live cluster: a GPU manifest can be checked on a laptop."""
    from launch.config import ManifestError
    from launch.manifest import load_manifest, missing_paths
    from launch.experiment import is_experiment_file
    from launch.placement import layout, unplaceable
    try:
        if any(is_experiment_file(m) for m in args.manifests):
            return _check_experiment(args)
        cfg = load_manifest(args.manifests, args.overrides, check_paths=False)
    except (ManifestError, FileNotFoundError) as e:
        print(f"opd check: {e}", file=sys.stderr)
        return 2
    lay = layout(cfg)
    print(f"{' + '.join(args.manifests)}: valid ({cfg.algorithm}, loss {cfg.loss.name}; {lay.describe()}; "
          f"{len(lay.bundles)} bundles, {lay.gpus:g} of cluster.num_gpus {cfg.cluster.num_gpus})")
    for key in missing_paths(cfg):
        print(f"warning: {key} does not exist on this machine; it must exist where the job runs")
    if args.address:
        import ray
        ray.init(address=args.address, logging_level="ERROR")
        nodes, where = [n["Resources"] for n in ray.nodes() if n["Alive"]], f"the cluster at {args.address}"
    elif args.nodes:
        nodes = [{"CPU": args.cpus_per_node, "GPU": args.gpus_per_node}] * args.nodes
        nodes = [{**n, **{r: 1e9 for r in cfg.cluster.node_resources.values()}} for n in nodes]  # pins: not described
        where = f"{args.nodes} node(s) x {args.gpus_per_node} GPU x {args.cpus_per_node} CPU"
    else:
        return 0
    why = unplaceable(lay.bundles, nodes)
    if why:
        print(f"opd check: placement: {where} cannot hold the layout: {why}", file=sys.stderr)
        return 2
    print(f"placement: fits on {where}")
    return 0


def _check_experiment(args) -> int:
    """`opd check EXPERIMENT.yaml [key=value ...]`: every arm's manifest as the experiment would run it
    (overrides included), one line per arm; the first bad arm stops with its error."""
    from pathlib import Path
    from launch.config import ManifestError
    from launch.experiment import load_experiment, resolve
    from launch.placement import layout
    if len(args.manifests) != 1:
        raise ManifestError(f"{' + '.join(args.manifests)}: an experiment file is checked on its own "
                            "(its arms name their manifests); give it alone, with key=value overrides")
    exp = load_experiment(args.manifests[0])
    for arm, cfg in resolve(exp, Path("runs/experiments").absolute() / exp.name, args.overrides):
        lay = layout(cfg)
        print(f"{exp.name} / {arm.name}: valid ({cfg.algorithm}, loss {cfg.loss.name}; {lay.describe()}): "
              f"{arm.command()}")
    return 0


def cmd_eval(args) -> int:
    from actors.kinds import ENGINE_KINDS, EngineStart
    if args.engine not in ENGINE_KINDS:
        print(f"opd eval: --engine {args.engine!r} is not one of {list(ENGINE_KINDS)}", file=sys.stderr)
        return 2
    import torch
    from launch.batches import ChatSettings, PromptFormatter
    from opd.contracts import SamplingSpec
    from opd.tokens import special_ids
    from tasks.data import load_dataset
    from tasks.verifiers import get_verifier
    from transformers import AutoTokenizer
    chat = None
    if args.chat_template_kwargs is not None or args.system_prompt is not None:
        chat = ChatSettings(kwargs=json.loads(args.chat_template_kwargs or "{}"), student_system=args.system_prompt)
    rows = load_dataset(args.data, [args.answer_field] if chat else [args.prompt_field, args.answer_field]).rows
    rows = rows[:args.size]
    tok = AutoTokenizer.from_pretrained(args.model)
    fmt = PromptFormatter(tok, args.prompt_template, "{prompt}", chat)
    for r in rows:  # in chat format a row may hold messages (its last user turn is {prompt})
        msgs = r.get("messages") if chat else None
        r["prompt"] = [m for m in msgs if m["role"] == "user"][-1]["content"] if msgs else r[args.prompt_field]
        r["answer"] = r[args.answer_field]
    special = special_ids(tok, args.model)
    spec = SamplingSpec(max_new_tokens=args.max_new_tokens, temperature=0, behaviour_logprobs=False,
                        stop_ids=special.stop)
    gpu = torch.cuda.is_available()
    kind = ENGINE_KINDS[args.engine]  # built in this process, outside any run: the kind says how
    dtype = "bfloat16" if gpu and kind.vllm else "float32"
    llm = None
    if kind.vllm:
        from opd.vllm_llm import LLMSpec
        llm = LLMSpec(model=args.model, dtype=dtype)
    engine = kind.start(EngineStart(path=args.model, dtype=dtype, seed=0, threads=0, use_gpu=gpu,
                                    trust_remote_code=False, sampling=spec, pad_id=special.pad, llm=llm)).build()
    out = engine.generate(fmt.students(rows), spec)
    verify = get_verifier(args.verifier)
    acc = sum(verify(fmt.text(c), r["answer"]) for c, r in zip(out.completions(), rows)) / len(rows)
    print(json.dumps({"model": args.model, "engine": args.engine, "data": args.data, "size": len(rows),
                      "accuracy": acc}))
    return 0


def cmd_experiment(args) -> int:
    from launch.config import ManifestError
    from launch.experiment import available, run_experiment
    if args.name == "list":
        print("\n".join(available()))
        return 0
    try:
        run_experiment(args.name, args.out, args.overrides)
    except ManifestError as e:
        print(f"opd experiment: {e}", file=sys.stderr)
        return 2
    return 0


def cmd_report(args) -> int:
    from pathlib import Path
    from launch.report import report
    try:
        path = report(args.runs, Path(args.out))
    except FileNotFoundError as e:
        print(f"opd report: {e}", file=sys.stderr)
        return 2
    print(path.read_text())
    return 0


def cmd_make_tiny(args) -> int:
    if args.family == "qwen3":
        from tasks.tiny_qwen3 import QWEN3_ROWS, write_family
        rows = (QWEN3_ROWS,) if args.vocab_rows is None else tuple(args.vocab_rows)
        try:
            paths = write_family(args.out or "runs/tiny-qwen3", seed=args.seed, vocab_rows=rows)
        except ValueError as e:
            print(f"opd make-tiny: --{e}", file=sys.stderr)
            return 2
        print(json.dumps({k: str(v) for k, v in paths.items()}, indent=2))
        return 0
    if args.vocab_rows is not None:
        print("opd make-tiny: --vocab-rows applies to --family qwen3 only", file=sys.stderr)
        return 2
    from tasks.arithmetic import write_task
    from tasks.tiny import write_tiny_models
    args.out = args.out or "runs/tiny"
    models = write_tiny_models(os.path.join(args.out, "models"), seed=args.seed)
    data = write_task(os.path.join(args.out, "data"), digits=args.digits, seed=args.seed)
    print(json.dumps({k: str(v) for k, v in {**models, **data}.items()}, indent=2))
    return 0


def main(argv=None) -> int:
    _quiet()
    p = argparse.ArgumentParser(prog="opd", description="On-policy distillation trainer")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="run an experiment manifest")
    t.add_argument("items", nargs="+", metavar="MANIFEST [MANIFEST ...] [key=value ...]",
                   help="manifests, merged left to right, then key=value overrides, e.g. loss.name=full_reverse_kl")
    t.set_defaults(fn=cmd_train)
    c = sub.add_parser("check", help="validate a manifest (and its GPU layout) without loading anything")
    c.add_argument("items", nargs="+", metavar="MANIFEST [MANIFEST ...] [key=value ...]",
                   help="manifests merged left to right (or one experiment file), then key=value overrides")
    c.add_argument("--nodes", type=int, default=0, help="describe a cluster: number of nodes ...")
    c.add_argument("--gpus-per-node", type=int, default=8)
    c.add_argument("--cpus-per-node", type=int, default=64)
    c.add_argument("--address", help="or check against a live Ray cluster (e.g. auto)")
    c.set_defaults(fn=cmd_check)
    e = sub.add_parser("eval", help="greedy-decode a model on a dataset and verify")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--size", type=int, default=256)
    e.add_argument("--verifier", default="exact_match")
    e.add_argument("--prompt-field", default="prompt")
    e.add_argument("--answer-field", default="answer")
    e.add_argument("--prompt-template", default="{prompt}")
    e.add_argument("--max-new-tokens", type=int, default=16)
    e.add_argument("--engine", default="hf", help="a rollout engine kind (rollout.engine): hf or vllm")
    e.add_argument("--chat-template-kwargs", default=None, metavar="JSON",
                   help="render prompts with the tokenizer's chat template, e.g. '{\"enable_thinking\": false}'")
    e.add_argument("--system-prompt", default=None, help="a system message (implies the chat template)")
    e.set_defaults(fn=cmd_eval)
    x = sub.add_parser("experiment", help="run a named comparison (configs/experiments/NAME.yaml, or an "
                                          "experiment file's path); 'list' lists them")
    x.add_argument("name")
    x.add_argument("overrides", nargs="*", help="key=value overrides for every arm, e.g. run.seed=1")
    x.add_argument("--out", default="runs/experiments")
    x.set_defaults(fn=cmd_experiment)
    r = sub.add_parser("report", help="plot runs' metrics.jsonl curves (PNG) and tabulate them (Markdown)")
    r.add_argument("runs", nargs="+", help="run folders, or run names under runs/")
    r.add_argument("--out", default="runs/report")
    r.set_defaults(fn=cmd_report)
    m = sub.add_parser("make-tiny", help="write tiny HF models, tokenizer and a task (arithmetic; chat math for qwen3)")
    m.add_argument("--family", choices=["llama", "qwen3"], default="llama",
                   help="llama: character-level Llamas + arithmetic (runs/tiny); qwen3: the tiny Qwen3 family "
                        "+ chat-format math (runs/tiny-qwen3)")
    m.add_argument("--out", default=None, help="default runs/tiny, or runs/tiny-qwen3 for --family qwen3")
    m.add_argument("--digits", type=int, default=2, help="llama family: digits per operand")
    m.add_argument("--vocab-rows", type=int, nargs="*", default=None, metavar="N",
                   help="qwen3 family: also write student-N/ and teacher-N/ with N embedding rows for each N "
                        "(default 151936, Qwen3's; none: only the small-vocabulary pair)")
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(fn=cmd_make_tiny)
    args, extra = p.parse_known_args(argv)
    if hasattr(args, "items"):  # manifests up to the first key=value, overrides from there
        first = next((i for i, item in enumerate(args.items) if "=" in item), len(args.items))
        args.manifests, args.overrides = args.items[:first], args.items[first:]
        if not args.manifests:
            p.error(f"{args.cmd}: name a manifest before the key=value overrides")
    # argparse stops filling `items` at the first option: `opd check m.yaml --nodes 1 a=b` leaves a=b over
    if extra and hasattr(args, "overrides") and not any(e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        p.error(f"unrecognized arguments: {' '.join(extra)}")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
