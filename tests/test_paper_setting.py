"""configs/paper/: the paper's Qwen3-1.7B arms as its released scripts run them (ulab-uiuc/Open-On-Policy-
Distillation at 33234e5). These tests check that each arm holds its script's values, that arms differ only
where their scripts do, that headers name the script and state the layout, what cpu.yaml changes (and that
it changes nothing else), the DAPO and WildGuardMix converters, and the verifiers the arms name. Nothing
here runs a model: tests/test_paper_cpu.py runs every arm shrunk on the CPU."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from launch.config import ManifestError

from launch.manifest import load_manifest
from launch.placement import layout
from tasks.dapo import convert, main
from tasks.verifiers import VERIFIERS, boxed_match, last_boxed

PAPER = Path(__file__).resolve().parent.parent / "configs" / "paper"
OVERLAYS = ("cpu", "cpu_opsd")
MANIFESTS = sorted(p for p in PAPER.glob("*.yaml") if p.stem not in OVERLAYS)
ARMS = [p for p in MANIFESTS if p.stem != "base"]
TOPK = sorted(PAPER.glob("topk_t*_k*.yaml"))
OPD_DIR = "examples/on_policy_distillation/"
FAMILY = OPD_DIR + "run-qwen3-1.7B-1.7bgrpoteacher-opd_noanswer_dapo"
# arm -> (script; prompts x samples per step, max response, top-p, lr, schedule, updates per step, steps,
# eval interval), each value the script's (configs/paper/README.md has the line numbers)
SCRIPTS = {
    "topk_t1_k5": (FAMILY + "_reverseKL_grad_top5.sh", 64, 1, 4096, 0.95, 2e-6, "cosine", 1, 1000, 10),
    "topk_t1_k20": (FAMILY + "_reverseKL_grad.sh", 64, 1, 4096, 0.95, 2e-6, "cosine", 1, 1000, 10),
    "topk_t2_k1": (FAMILY + "_reverseKLstopgrad_top1.sh", 64, 1, 4096, 0.95, 2e-6, "cosine", 1, 1000, 10),
    "topk_t2_k5": (FAMILY + "_reverseKL_nograd_top5.sh", 64, 1, 4096, 0.95, 2e-6, "cosine", 1, 1000, 10),
    "topk_t4_k5": (FAMILY + "_reverseKLnorm_top5.sh", 64, 1, 4096, 0.95, 2e-6, "cosine", 1, 1000, 10),
    "topk_t4_k20": (FAMILY + "_stopgrad.sh", 64, 1, 4096, 0.95, 2e-6, "cosine", 1, 1000, 10),
    "opd_grpo_teacher": (FAMILY + "_rebustness.sh", 64, 1, 4096, 0.95, 2e-6, "cosine", 1, 1000, 10),
    "opd_sampled_token_8b": (OPD_DIR + "run-qwen3-1.7B-8b-opd_noanswer_dapo.sh", 128, 1, 4096, 1.0, 2e-6, "cosine",
                             2, 1000, 30),
    "grpo_teacher": (OPD_DIR + "run-qwen3-1.7B-opsd_grpo-dapo_baseline.sh", 16, 8, 8192, 1.0, 1e-6, "constant",
                     8, 1000, 50),
    "opsd_safety_rule": ("examples/prompt_internalization/run-qwen3-1.7B-pi-safety.sh", 32, 1, 2048, 1.0, 1e-6,
                         "cosine", 1, 300, 10),
}
USER_TURN = "{prompt}\n\nPlease reason step by step, and put your final answer within \\boxed{{}}."
CONSTITUTION_TEMPLATE = "{pi_instruction}\n\n{prompt}"
GRPO_TEACHER = "/shared/runs/paper-grpo-teacher/final"


def load(path, overrides=()):
    """load_manifest without requiring /shared/... to exist on this machine (the models and data
    live on the cluster), as `opd check` does."""
    return load_manifest(path, list(overrides), check_paths=False)


def layers(arm: Path) -> list[Path]:
    return [arm, PAPER / "cpu.yaml"] + ([PAPER / "cpu_opsd.yaml"] if arm.stem.startswith("opsd") else [])


# ---------------------------------------------------------------- manifests

def test_every_arm_names_its_script_in_its_header():
    assert {p.stem for p in ARMS} == set(SCRIPTS)
    for path in ARMS:
        header = path.read_text().split("\nextends:")[0]
        assert f"# Script: {SCRIPTS[path.stem][0]}" in header, path.name
        assert "Differences from the script" in header, path.name


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_manifest_loads_and_its_gpus_cover_the_layout(path):
    cfg = load(path)
    assert cfg.cluster.mode == "ray" and cfg.rollout.engine == "vllm"
    assert cfg.run.output_dir == "/shared/runs" and cfg.data.eval is None
    for p in (cfg.model.path, cfg.data.train, cfg.teacher.path, *(s.data for s in cfg.eval.sets)):
        assert p is None or p.startswith("/shared/"), p
    assert cfg.cluster.num_gpus >= layout(cfg).gpus


@pytest.mark.parametrize("path", ARMS, ids=lambda p: p.stem)
def test_arm_header_states_the_layout_it_gets(path):
    """Each arm extends base.yaml and its header's `total = N` is the GPU count the layout needs."""
    text = path.read_text()
    assert re.search(r"^extends: base\.yaml$", text, re.M)
    header = text.split("\nextends:")[0]
    assert "GPU layout" in header and "Reproduces" in header
    total = re.search(r"total\s+=\s+(\d+)", header)
    cfg = load(path)
    assert total and int(total.group(1)) == layout(cfg).gpus == cfg.cluster.num_gpus


@pytest.mark.parametrize("path", ARMS, ids=lambda p: p.stem)
def test_each_arm_holds_its_scripts_values(path):
    _, prompts, samples, max_new, top_p, lr, schedule, updates, steps, interval = SCRIPTS[path.stem]
    cfg = load(path)
    rc, lc = cfg.rollout, cfg.learner
    assert (rc.prompts_per_step, rc.samples_per_prompt, rc.max_new_tokens, rc.temperature, rc.top_p) == \
        (prompts, samples, max_new, 1.0, top_p)
    assert (lc.lr, lc.schedule, lc.updates_per_step, cfg.run.steps, cfg.eval.interval) == \
        (lr, schedule, updates, steps, interval)
    assert (lc.optimizer, lc.warmup_ratio, lc.min_lr_ratio, lc.weight_decay, lc.betas, lc.grad_clip) == \
        ("adamw", 0.1, 0.0, 0.1, [0.9, 0.98], 1.0)
    assert (cfg.model.dtype, cfg.loss.reduction, cfg.run.seed) == ("bfloat16", "sample_mean", 1234)
    # thinking off, by the model's own template, in training and in every eval set
    assert cfg.data.chat_template and cfg.data.chat_template_kwargs == {"enable_thinking": False}
    assert cfg.data.system_prompt is None and cfg.teacher.system_prompt is None
    assert all(s.chat_template_kwargs == {"enable_thinking": False} for s in cfg.eval.sets)
    assert (cfg.eval.samples_per_prompt, cfg.eval.top_p) == (1, 0.95)
    assert all(s.samples_per_prompt is None and s.max_new_tokens is None for s in cfg.eval.sets)  # the section's


def test_math_arms_evaluate_as_eval_config_yaml():
    for path in ARMS:
        cfg = load(path)
        if path.stem == "opsd_safety_rule":
            continue
        assert cfg.data.prompt_template == USER_TURN and cfg.teacher.prompt_template == USER_TURN
        assert USER_TURN.format(prompt="P") == "P\n\nPlease reason step by step, and put your final answer within \\boxed{}."
        assert [s.name for s in cfg.eval.sets] == ["math500", "aime24", "aime25"]
        assert (cfg.eval.max_new_tokens, cfg.eval.temperature, cfg.eval.verifier) == (16384, 0.6, "math_equiv")
        assert cfg.rollout.vllm.max_model_len >= 16384 + 1024  # the engines evaluate too


def _without(cfg, *keys):
    d = dataclasses.asdict(cfg)
    for key in keys:
        section, name = key.split(".")
        d[section].pop(name)
    return d


def test_topk_arms_differ_only_in_loss_name_and_params():
    assert {tuple(map(int, re.fullmatch(r"topk_t(\d)_k(\d+)", p.stem).groups())) for p in TOPK} == \
        {(1, 5), (1, 20), (2, 1), (2, 5), (4, 5), (4, 20)}   # the scripts' grid
    ref = _without(load(PAPER / "topk_t2_k5.yaml"), "run.name", "loss.name", "loss.params")
    for path in TOPK:
        t, k = map(int, re.fullmatch(r"topk_t(\d)_k(\d+)", path.stem).groups())
        cfg = load(path)
        assert cfg.loss.name == {1: "topk_reverse_kl_biased", 2: "topk_reverse_kl_sg", 4: "topk_reverse_kl_renorm"}[t]
        assert cfg.loss.params == {"k": k, "support": "intersection" if t == 4 else "student_masked"}
        assert (cfg.teacher.kind, cfg.teacher.path, cfg.teacher.vllm.tensor_parallel_size) == ("vllm", GRPO_TEACHER, 1)
        assert cfg.teacher.vllm.max_logprobs >= k and cfg.rollout.vllm.max_logprobs >= k
        assert _without(cfg, "run.name", "loss.name", "loss.params") == ref
    assert len({load(p).run.name for p in TOPK}) == len(TOPK)


def test_the_cpu_build_serves_the_masked_support_but_not_the_exact_one():
    """vLLM's CPU build returns only a teacher's own top-k: enough for student_masked, not for `student`."""
    arm = layers(PAPER / "topk_t2_k5.yaml")
    assert load(arm).loss.params["support"] == "student_masked"
    with pytest.raises(ManifestError, match="logprobs_at_any_ids"):
        load(arm, ["loss.params.support=student"])


def test_grpo_teacher_feeds_the_distillation_arms():
    grpo = load(PAPER / "grpo_teacher.yaml")
    assert (grpo.algorithm, grpo.loss.name, grpo.teacher.kind) == ("grpo", "grpo", "none")
    assert grpo.loss.params == {"clip_eps": 0.2, "clip_eps_high": 0.28} and grpo.eval.verifier == "math_equiv"
    assert f"{grpo.run.output_dir}/{grpo.run.name}/final" == GRPO_TEACHER
    for path in [*TOPK, PAPER / "opd_grpo_teacher.yaml"]:
        cfg = load(path)
        assert cfg.teacher.path == GRPO_TEACHER and cfg.model.path == grpo.model.path


def test_the_8b_and_rebustness_arms():
    e = load(PAPER / "opd_sampled_token_8b.yaml")
    assert (e.loss.name, e.loss.params, e.teacher.path) == \
        ("sampled_log_ratio_direct_zero_grad", {"coef": 1.0}, "/shared/models/Qwen3-8B")
    r = load(PAPER / "opd_grpo_teacher.yaml")
    assert (r.loss.name, r.loss.params) == ("sampled_token_rkl", {"coef": 1.0, "clip_eps": 0.2})
    assert "_rebustness.sh" in (PAPER / "opd_grpo_teacher.yaml").read_text().split("\nextends:")[0]


def test_opsd_arm_puts_the_rule_in_the_teachers_user_turn():
    cfg = load(PAPER / "opsd_safety_rule.yaml")
    assert (cfg.teacher.kind, cfg.teacher.live, cfg.teacher.path) == ("self", False, None)
    assert (cfg.data.prompt_template, cfg.teacher.prompt_template) == ("{prompt}", CONSTITUTION_TEMPLATE)
    assert (cfg.loss.name, cfg.teacher.full_vocab_transport) == ("full_reverse_kl", "hidden_states")
    kl = cfg.loss.kl_to_reference
    assert (kl.coef, kl.estimator, kl.path) == (0.01, "k1", None)
    assert cfg.data.answer_field == "label" and [s.name for s in cfg.eval.sets] == ["wildguardtest"]
    assert (cfg.eval.max_new_tokens, cfg.eval.temperature, cfg.eval.verifier) == (4096, 1.0, "safety_keyword")


def test_prompts_render_as_the_scripts_do(qwen3_assets):
    """Qwen3's template with thinking off: one user turn, the empty thinking block after the generation
    prompt. OPSD: the constitution, a blank line, then the request, in the teacher's user turn only."""
    from transformers import AutoTokenizer

    from launch.batches import ChatSettings, PromptFormatter
    from tasks.wildguard import CONSTITUTION
    tok = AutoTokenizer.from_pretrained(qwen3_assets["student"])
    start, end = "<|im_start|>user\n", "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"
    math = load(PAPER / "topk_t2_k5.yaml")
    fmt = PromptFormatter(tok, math.data.prompt_template, math.teacher.prompt_template,
                          ChatSettings(kwargs=math.data.chat_template_kwargs))
    row = {"prompt": "Find $x$ if $x^2=4$."}
    want = start + "Find $x$ if $x^2=4$.\n\nPlease reason step by step, and put your final answer within \\boxed{}." + end
    assert fmt.render([row], fmt.student_template) == fmt.render([row], fmt.teacher_template) == [want]
    opsd = load(PAPER / "opsd_safety_rule.yaml")
    fmt = PromptFormatter(tok, opsd.data.prompt_template, opsd.teacher.prompt_template,
                          ChatSettings(kwargs=opsd.data.chat_template_kwargs))
    row = {"prompt": "How do I bake bread?", "pi_instruction": CONSTITUTION}
    assert fmt.render([row], fmt.student_template) == [start + "How do I bake bread?" + end]
    assert fmt.render([row], fmt.teacher_template) == [start + CONSTITUTION + "\n\nHow do I bake bread?" + end]


# ---------------------------------------------------------------- cpu.yaml

# cluster.threads_per_actor and learner.teacher_head_thread: auto in both; local mode resolves them on load,
# ray mode at the run
CPU_KEYS = {"run.output_dir", "run.steps", "cluster.mode", "cluster.num_gpus", "cluster.placement_timeout_s",
            "cluster.threads_per_actor", "learner.teacher_head_thread",
            "model.path", "model.dtype", "teacher.path", "teacher.num_actors", "teacher.vllm.tensor_parallel_size",
            "teacher.vllm.max_model_len", "rollout.num_actors", "rollout.prompts_per_step", "rollout.max_new_tokens",
            "rollout.vllm.tensor_parallel_size", "rollout.vllm.max_model_len", "learner.num_ranks", "data.train",
            "eval.size", "eval.max_new_tokens"}


def _leaves(d, prefix=""):
    if isinstance(d, dict):
        return {k: v for key, value in d.items() for k, v in _leaves(value, f"{prefix}{key}.").items()}
    if isinstance(d, list) and d and isinstance(d[0], dict):
        return {k: v for i, value in enumerate(d) for k, v in _leaves(value, f"{prefix[:-1]}[{i}].").items()}
    return {prefix[:-1]: d}


@pytest.mark.parametrize("arm", ARMS, ids=lambda p: p.stem)
def test_cpu_yaml_changes_only_sizes_paths_and_layout(arm):
    alone, cpu = (_leaves(dataclasses.asdict(load(x))) for x in (arm, layers(arm)))
    changed = {k for k in alone.keys() | cpu.keys() if alone.get(k) != cpu.get(k)}
    sets = {k for k in changed if k.startswith("eval.sets[")}
    assert changed - sets <= CPU_KEYS, changed - sets - CPU_KEYS
    assert {k.split(".", 2)[-1] for k in sets} == {"data"}   # a set keeps its name and every setting
    cfg = load(layers(arm))
    assert cfg.model.path.endswith("runs/tiny-qwen3/student-151936") and cfg.model.dtype == "float32"
    if arm.stem.startswith("opsd"):  # the self-teacher is the student's own network
        assert cfg.teacher.path is None
    else:
        assert cfg.teacher.path.endswith("runs/tiny-qwen3/teacher-151936")
    assert (cfg.cluster.mode, cfg.cluster.num_gpus, cfg.learner.num_ranks, cfg.run.steps) == ("local", 0, 1, 2)
    assert cfg.run.output_dir.endswith("runs/paper-cpu")
    assert all("runs/tiny-qwen3/data/" in s.data for s in cfg.eval.sets) and "runs/tiny-qwen3/data/" in cfg.data.train


# ---------------------------------------------------------------- the converter

PREFIX = ("Solve the following math problem step by step. The last line of your response should be of the "
          "form Answer: $Answer (without quotes) where $Answer is the answer to the problem.\n\n")
SUFFIX = "\n\nRemember to put your answer on its own line after \"Answer:\"."


def _dapo(problem, answer, index, prompt="wrap"):
    messages = [{"role": "user", "content": PREFIX + problem + SUFFIX}] if prompt == "wrap" else prompt
    return {"data_source": "math_dapo", "prompt": messages, "ability": "MATH",
            "reward_model": None if answer is None else {"ground_truth": answer, "style": "rule-lighteval/MATH_v2"},
            "extra_info": {"index": index}}


def _write_dapo_parquet(path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    message = pa.struct([("content", pa.string()), ("role", pa.string())])
    schema = pa.schema([("data_source", pa.string()), ("prompt", pa.list_(message)), ("ability", pa.string()),
                        ("reward_model", pa.struct([("ground_truth", pa.string()), ("style", pa.string())])),
                        ("extra_info", pa.struct([("index", pa.string())]))])
    rows = [
        _dapo("What is $1+1$?", "2", "u1"),
        _dapo("What is $1+1$?", "2", "u2"),                  # the public file repeats problems...
        _dapo("Let $f(x)=x^{2}$. Find $f(3)$.", "9", "u3"),
        _dapo("What is $1+1$?", "2", "u4"),                  # ...under new uuids
        _dapo("What is  $1+1$?\n", "3", "u5"),               # same problem (whitespace), other answer
        _dapo("ignored", "1", "u6", prompt=None),            # no prompt at all
        _dapo("ignored", "1", "u7", prompt=[]),              # empty message list
        _dapo("ignored", "1", "u8", prompt=[{"role": "system", "content": "hi"}]),
        _dapo("Compute $2^{10}$.", None, "u9"),              # no reward_model
        _dapo("Compute $2^{10}$.", "  ", "u10"),             # blank answer
        _dapo("", "5", "u11"),                               # only the instruction wrapper
        _dapo("Compute $2^{10}$.", "1024", "u12"),
    ]
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path, row_group_size=5)


def test_dapo_parquet_is_deduplicated_and_bad_rows_are_counted(tmp_path):
    src, out = tmp_path / "dapo.parquet", tmp_path / "out" / "train.jsonl"
    _write_dapo_parquet(src)
    summary = convert(src, out)
    assert [json.loads(line) for line in out.read_text().splitlines()] == [
        {"prompt": "What is $1+1$?", "answer": "2"},
        {"prompt": "Let $f(x)=x^{2}$. Find $f(3)$.", "answer": "9"},
        {"prompt": "Compute $2^{10}$.", "answer": "1024"},
    ]
    assert (summary.read, summary.written) == (12, 3)
    assert summary.skipped == {"duplicate problem": 2, "duplicate problem, different answer (first kept)": 1,
                               "prompt is not a message list": 1, "no user message": 2, "no answer": 2,
                               "no problem": 1}


def test_math500_jsonl_and_the_command_line(tmp_path, capsys):
    src, out = tmp_path / "test.jsonl", tmp_path / "eval.jsonl"
    src.write_text("\n".join([
        json.dumps({"problem": "Compute $\\frac{1}{2}+\\frac{1}{2}$.", "answer": "1", "level": 1}),
        "{not json",
        json.dumps({"problem": "AIME-style", "answer": 204}),  # integer answers become strings
        json.dumps({"problem": "no answer here"}),
        json.dumps({"problem": "AIME24-style", "solution": "\\boxed{73}"}),   # math-ai/aime24: the answer is its solution
        json.dumps(["a", "list"]),
    ]) + "\n")
    assert main(["--src", str(src), "--out", str(out)]) == 0   # format detected from the columns
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": "Compute $\\frac{1}{2}+\\frac{1}{2}$.", "answer": "1"},
                    {"prompt": "AIME-style", "answer": "204"}, {"prompt": "AIME24-style", "answer": "\\boxed{73}"}]
    printed = capsys.readouterr().out
    assert "rows read 6, written 3, skipped 3" in printed and "not a JSON object): 2" in printed
    assert "(no answer): 1" in printed


def test_converted_rows_load_with_the_training_loader(tmp_path):
    from tasks.data import load_dataset
    src, out = tmp_path / "dapo.parquet", tmp_path / "train.jsonl"
    _write_dapo_parquet(src)
    convert(src, out, fmt="dapo")
    assert len(load_dataset(str(out), ["prompt", "answer"]).rows) == 3


# ---------------------------------------------------------------- boxed_match

@pytest.mark.parametrize("completion,answer,reward", [
    ("so the answer is \\boxed{42}.", "42", 1.0),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}", 1.0),                 # nested braces
    ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}", 1.0),
    ("\\boxed{\\dfrac{1}{2}}", "\\frac{1}{2}", 1.0),
    ("first \\boxed{3}, finally \\boxed{5}", "5", 1.0),             # the last box counts
    ("first \\boxed{5}, finally \\boxed{3}", "5", 0.0),
    ("\\boxed{ $-7$ }", "-7", 1.0),                                 # spaces and $ dropped
    ("\\boxed{12.}", "12", 1.0),                                    # trailing period dropped
    ("\\boxed{0.5}", "1/2", 1.0),                                   # numeric equivalence, exact
    ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
    ("\\boxed{12.0}", "12", 1.0),
    ("\\boxed{1,000}", "1000", 1.0),
    ("\\boxed{0.333}", "\\frac{1}{3}", 0.0),                        # not rounded
    ("\\boxed{(1, 2)}", "(1,2)", 1.0),                              # string match after whitespace
    ("\\boxed{x=4}", "4", 0.0),                                     # light: no `x =` stripping
    ("the answer is 42", "42", 0.0),                                # no box at all
    ("\\boxed{}", "", 0.0),                                         # an empty box
    ("\\boxed{\\frac{1}{2}", "\\frac{1}{2}", 0.0),                  # truncated: never closed
    ("\\boxed{3}", "1/0", 0.0),
])
def test_boxed_match(completion, answer, reward):
    assert boxed_match(completion, answer) == reward


def test_last_boxed_and_registration():
    assert last_boxed("a \\boxed{x^{2}+\\{1\\}} b") == "x^{2}+\\{1\\}"
    assert last_boxed("\\boxed{\\{1, 2\\}\\}}") == "\\{1, 2\\}\\}"   # escaped braces are content
    assert last_boxed("nothing") is None
    assert VERIFIERS["boxed_match"] is boxed_match
