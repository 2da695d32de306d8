"""configs/paper/: the paper's real setting (Qwen3-1.7B on DAPO-Math-17k). These tests check that
the manifests are valid and mean what their headers say, that the DAPO converter handles the real
schema's duplicates and bad rows, and what boxed_match accepts. Nothing here touches a model or
a GPU: the manifests have not been run from this test suite."""
from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest

from launch.config import ManifestError, load_manifest
from launch.placement import layout
from tasks.dapo import convert, main
from tasks.verifiers import VERIFIERS, boxed_match, last_boxed

PAPER = Path(__file__).resolve().parent.parent / "configs" / "paper"
MANIFESTS = sorted(PAPER.glob("*.yaml"))
TOPK = sorted(PAPER.glob("topk_t*_k*.yaml"))


def load(path, overrides=()):
    """load_manifest without requiring /shared/... to exist on this machine (the models and data
    live on the cluster), as `opd check` does."""
    return load_manifest(path, list(overrides), check_paths=False)


# ---------------------------------------------------------------- manifests

def test_the_expected_arms_exist():
    names = {p.stem for p in MANIFESTS}
    assert {"base", "opd_sampled_token_8b", "opd_grpo_teacher", "grpo_teacher", "opsd_shared_system_prompt"} <= names
    assert {p.stem for p in TOPK} == {f"topk_t{t}_k{k}" for t in (1, 2) for k in (1, 5, 20, 50)}


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.stem)
def test_manifest_loads_and_its_gpus_cover_the_layout(path):
    cfg = load(path)
    assert cfg.cluster.mode == "ray" and cfg.rollout.engine == "vllm"
    assert cfg.run.output_dir == "/shared/runs"
    for p in (cfg.model.path, cfg.data.train, cfg.data.eval, cfg.teacher.path):
        assert p is None or p.startswith("/shared/"), p
    assert cfg.cluster.num_gpus >= layout(cfg).gpus


@pytest.mark.parametrize("path", [p for p in MANIFESTS if p.stem != "base"], ids=lambda p: p.stem)
def test_arm_header_states_the_layout_it_gets(path):
    """Each arm extends base.yaml and its header's `total = N` is the GPU count the layout needs."""
    text = path.read_text()
    assert re.search(r"^extends: base\.yaml$", text, re.M)
    header = text.split("\nextends:")[0]
    assert "GPU layout" in header and "Reproduces" in header
    total = re.search(r"total\s+=\s+(\d+)", header)
    cfg = load(path)
    assert total and int(total.group(1)) == layout(cfg).gpus == cfg.cluster.num_gpus


def test_paper_figures_are_in_every_arm():
    for path in MANIFESTS:
        cfg = load(path)
        rc, lc = cfg.rollout, cfg.learner
        assert cfg.model.dtype == "bfloat16" and rc.prompts_per_step == 64
        assert (rc.max_new_tokens, rc.temperature, rc.top_p) == (4096, 1.0, 0.95)
        assert (lc.optimizer, lc.lr, lc.schedule, lc.warmup_ratio, lc.weight_decay) == ("adamw", 2e-6, "cosine", 0.1, 0.1)
        assert (cfg.eval.temperature, cfg.eval.top_p, cfg.eval.verifier) == (0.6, 0.95, "boxed_match")
        assert rc.samples_per_prompt == (8 if cfg.algorithm == "grpo" else 1)


def _without(cfg, *keys):
    d = dataclasses.asdict(cfg)
    for key in keys:
        section, name = key.split(".")
        d[section].pop(name)
    return d


def test_topk_arms_differ_only_in_loss_name_and_k():
    ref = _without(load(PAPER / "topk_t2_k20.yaml"), "run.name", "loss.name", "loss.params")
    for path in TOPK:
        t, k = map(int, re.fullmatch(r"topk_t(\d)_k(\d+)", path.stem).groups())
        cfg = load(path)
        assert cfg.loss.name == {1: "topk_reverse_kl_biased", 2: "topk_reverse_kl_sg"}[t]
        assert cfg.loss.params == {"k": k, "support": "teacher"}
        assert cfg.teacher.kind == "vllm" and cfg.teacher.vllm.max_logprobs >= k
        assert _without(cfg, "run.name", "loss.name", "loss.params") == ref
    assert len({load(p).run.name for p in TOPK}) == len(TOPK)


def test_student_support_needs_an_hf_teacher():
    """configs/paper/README.md's claim: support: student is refused on the pinned vLLM teacher, accepted on HF."""
    with pytest.raises(ManifestError, match=r"'vllm' teacher cannot supply"):
        load(PAPER / "topk_t2_k20.yaml", ["loss.params.support=student"])
    cfg = load(PAPER / "topk_t2_k20.yaml", ["loss.params.support=student", "teacher.kind=hf",
                                            "rollout.vllm.max_logprobs=20"])
    assert cfg.loss.params["support"] == "student"


def test_grpo_teacher_feeds_the_opd_grpo_teacher_arm():
    grpo, opd = load(PAPER / "grpo_teacher.yaml"), load(PAPER / "opd_grpo_teacher.yaml")
    assert (grpo.algorithm, grpo.loss.name, grpo.teacher.kind) == ("grpo", "grpo", "none")
    assert opd.teacher.path == f"{grpo.run.output_dir}/{grpo.run.name}/final"
    assert opd.model.path == grpo.model.path   # the teacher is the student's own network, RL-adapted
    assert opd.loss.name == load(PAPER / "opd_sampled_token_8b.yaml").loss.name == "sampled_token_rkl"


def test_opd_teacher_sees_the_student_prompt_and_opsd_teacher_adds_a_shared_rule():
    row = {"prompt": "Find $x$ if $x^{2}=4$."}
    opd = load(PAPER / "opd_sampled_token_8b.yaml")
    assert opd.teacher.prompt_template == opd.data.prompt_template
    assert "\\boxed{}" in opd.data.prompt_template.format(**row)
    opsd = load(PAPER / "opsd_shared_system_prompt.yaml")
    assert (opsd.teacher.kind, opsd.teacher.live) == ("self", True)
    student, teacher = opsd.data.prompt_template.format(**row), opsd.teacher.prompt_template.format(**row)
    assert "<|im_start|>system" in teacher and "\\boxed{}" in teacher
    assert "<|im_start|>system" not in student and "boxed" not in student
    assert teacher.endswith(student.split("<|im_start|>user")[1])   # same user turn and assistant start


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
        json.dumps(["a", "list"]),
    ]) + "\n")
    assert main(["--src", str(src), "--out", str(out)]) == 0   # format detected from the columns
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [{"prompt": "Compute $\\frac{1}{2}+\\frac{1}{2}$.", "answer": "1"},
                    {"prompt": "AIME-style", "answer": "204"}]
    printed = capsys.readouterr().out
    assert "rows read 5, written 2, skipped 3" in printed and "not a JSON object): 2" in printed
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
