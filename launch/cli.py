"""`opd` command line: train, eval, make-tiny."""
from __future__ import annotations

import argparse
import json
import os
import sys
import warnings


def _quiet() -> None:
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    warnings.filterwarnings("ignore")
    import transformers
    transformers.utils.logging.disable_progress_bar()


def cmd_train(args) -> int:
    from launch.config import ManifestError, load_manifest
    try:
        cfg = load_manifest(args.manifest, args.overrides)
    except (ManifestError, FileNotFoundError) as e:
        print(f"opd: bad manifest: {e}", file=sys.stderr)
        return 2
    from launch.driver import train
    summary = train(cfg)
    print(json.dumps(summary, indent=2))
    return 0


def cmd_eval(args) -> int:
    from launch.batches import PromptFormatter
    from opd.contracts import SamplingSpec
    from tasks.data import load_dataset
    from tasks.verifiers import get_verifier
    from transformers import AutoTokenizer
    rows = load_dataset(args.data, [args.prompt_field, args.answer_field]).rows[:args.size]
    tok = AutoTokenizer.from_pretrained(args.model)
    fmt = PromptFormatter(tok, args.prompt_template, "{prompt}")
    for r in rows:
        r["prompt"], r["answer"] = r[args.prompt_field], r[args.answer_field]
    spec = SamplingSpec(max_new_tokens=args.max_new_tokens, temperature=0, behaviour_logprobs=False)
    if args.engine == "vllm":
        import torch
        from actors.vllm_engine import VLLMEngine
        from opd.vllm_llm import LLMSpec
        cpu = not torch.cuda.is_available()
        engine = VLLMEngine(LLMSpec(model=args.model, dtype="float32" if cpu else "bfloat16",
                                    kv_cache_memory_gb=0.25 if cpu else None, enforce_eager=cpu), spec, tok.pad_token_id)
    else:
        from actors.hf_engine import HFEngine
        import torch
        engine = HFEngine(args.model, use_gpu=torch.cuda.is_available())
    out = engine.generate([fmt.student(r) for r in rows], spec)
    verify = get_verifier(args.verifier)
    acc = sum(verify(fmt.text(c), r["answer"]) for c, r in zip(out.completions(), rows)) / len(rows)
    print(json.dumps({"model": args.model, "engine": args.engine, "data": args.data, "size": len(rows),
                      "accuracy": acc}))
    return 0


def cmd_make_tiny(args) -> int:
    from tasks.arithmetic import write_task
    from tasks.tiny import write_tiny_models
    models = write_tiny_models(os.path.join(args.out, "models"), seed=args.seed)
    data = write_task(os.path.join(args.out, "data"), digits=args.digits, seed=args.seed)
    print(json.dumps({k: str(v) for k, v in {**models, **data}.items()}, indent=2))
    return 0


def main(argv=None) -> int:
    _quiet()
    p = argparse.ArgumentParser(prog="opd", description="On-policy distillation trainer")
    sub = p.add_subparsers(dest="cmd", required=True)
    t = sub.add_parser("train", help="run an experiment manifest")
    t.add_argument("manifest")
    t.add_argument("overrides", nargs="*", help="key=value overrides, e.g. loss.name=full_reverse_kl")
    t.set_defaults(fn=cmd_train)
    e = sub.add_parser("eval", help="greedy-decode a model on a dataset and verify")
    e.add_argument("--model", required=True)
    e.add_argument("--data", required=True)
    e.add_argument("--size", type=int, default=256)
    e.add_argument("--verifier", default="exact_match")
    e.add_argument("--prompt-field", default="prompt")
    e.add_argument("--answer-field", default="answer")
    e.add_argument("--prompt-template", default="{prompt}")
    e.add_argument("--max-new-tokens", type=int, default=16)
    e.add_argument("--engine", choices=["hf", "vllm"], default="hf")
    e.set_defaults(fn=cmd_eval)
    m = sub.add_parser("make-tiny", help="write tiny HF models, tokenizer and the arithmetic task")
    m.add_argument("--out", default="runs/tiny")
    m.add_argument("--digits", type=int, default=2)
    m.add_argument("--seed", type=int, default=0)
    m.set_defaults(fn=cmd_make_tiny)
    args = p.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
