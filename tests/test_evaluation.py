"""Evaluation (launch/evaluation.py): pass@k against brute force, the sets' manifest keys and their
errors, the Evaluator on a real in-process HF engine, and a real tiny run that logs every set."""
import json
import random
from dataclasses import replace
from itertools import combinations

import pytest

from launch.config import ManifestError

from launch.manifest import load_manifest
from launch.evaluation import EvalSet, EvalSetSpec, Evaluator, eval_set_specs, pass_at_k, pass_ks, set_metrics
from opd.contracts import SamplingSpec
from tasks.verifiers import last_digits_match


def brute_pass_at_k(right: list[bool], k: int) -> float:
    """The fraction of k-subsets of the samples that hold at least one right sample."""
    subsets = list(combinations(right, k))
    return sum(any(s) for s in subsets) / len(subsets)


def test_pass_at_k_equals_the_fraction_of_subsets_with_a_right_sample():
    for n in range(1, 9):
        for c in range(n + 1):
            right = [True] * c + [False] * (n - c)
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(brute_pass_at_k(right, k), abs=1e-12), (n, c, k)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_ks_are_powers_of_two_and_n():
    assert [pass_ks(n) for n in (1, 2, 3, 4, 6, 16)] == [[1], [1, 2], [1, 2, 3], [1, 2, 4], [1, 2, 4, 6],
                                                         [1, 2, 4, 8, 16]]


def test_set_metrics_against_brute_force():
    rng = random.Random(0)
    rewards = [[float(rng.random() < p) for _ in range(6)] for p in (0.0, 0.2, 0.5, 0.9, 1.0)]
    got = set_metrics(rewards)
    assert set(got) == {"accuracy", "pass@1", "pass@2", "pass@4", "pass@6"}
    assert got["accuracy"] == sum(map(sum, rewards)) / 30
    for k in (1, 2, 4, 6):
        want = sum(brute_pass_at_k([r == 1.0 for r in row], k) for row in rewards) / len(rewards)
        assert got[f"pass@{k}"] == pytest.approx(want, abs=1e-12)
    assert got["pass@1"] == pytest.approx(got["accuracy"])  # unbiased pass@1 is avg@n


# --- manifest keys ---

def test_sets_take_the_eval_sections_values_where_unset(write_manifest, assets):
    cfg = load_manifest(write_manifest(data={"eval": None}, eval={
        "samples_per_prompt": 2, "max_new_tokens": 3, "temperature": 0.7, "verifier": "last_digits_match",
        "sets": [{"data": str(assets["eval"])},
                 {"name": "hard", "data": str(assets["eval"]), "size": 4, "samples_per_prompt": 8,
                  "max_new_tokens": 6, "temperature": 0.6, "top_p": 0.95, "verifier": "exact_match"}]}))
    first, hard = eval_set_specs(cfg)
    assert first == EvalSetSpec("eval.sets[0].data", assets["eval"].stem, str(assets["eval"]), 8, 2, 3, 0.7, 1.0,
                                "last_digits_match")
    assert hard == EvalSetSpec("eval.sets[1].data", "hard", str(assets["eval"]), 4, 8, 6, 0.6, 0.95, "exact_match")


def test_data_eval_alone_is_one_set_named_by_its_stem(write_manifest, assets):
    (spec,) = eval_set_specs(load_manifest(write_manifest()))
    assert (spec.key, spec.name, spec.samples_per_prompt, spec.max_new_tokens) == ("data.eval", "eval", 1, 4)
    assert eval_set_specs(load_manifest(write_manifest(data={"eval": None}))) == []


def test_relative_set_paths_resolve_against_the_launch_directory(write_manifest, assets, monkeypatch):
    monkeypatch.chdir(assets["eval"].parent)
    cfg = load_manifest(write_manifest(data={"eval": None}, eval={"sets": [{"data": assets["eval"].name}]}))
    assert cfg.eval.sets[0].data == str(assets["eval"])


@pytest.mark.parametrize("evals,message", [
    ({"sets": [{"data": "E"}, {"data": "E", "name": "b", "samples_per_prompt": 0}]},
     r"eval.sets\[1\].samples_per_prompt: must be > 0, got 0"),
    ({"sets": [{"data": "E", "top_p": 1.5}]}, r"eval.sets\[0\].top_p: must be in \(0, 1\], got 1.5"),
    ({"sets": [{"data": "E", "max_new_tokens": -1}]}, r"eval.sets\[0\].max_new_tokens: must be > 0"),
    ({"sets": [{"data": "E", "verifier": "math_equal"}]}, r"eval.sets\[0\].verifier: 'math_equal' is not one of"),
    ({"sets": [{"data": "E"}, {"data": "E"}]}, r"eval.sets\[1\].name: 'eval' is also eval.sets\[0\]'s name"),
    ({"sets": [{"data": "E", "name": "a/b"}]}, r"eval.sets\[0\].name: 'a/b' names metrics"),
    ({"sets": [{"data": "/nowhere/aime.jsonl"}]}, r"eval.sets\[0\].data: path '/nowhere/aime.jsonl' does not exist"),
    ({"sets": [{"name": "x"}]}, r"required value missing: eval.sets\[0\].data"),
    ({"sets": [{"data": "E", "sampels_per_prompt": 2}]},
     r"unknown key 'eval.sets\[\].sampels_per_prompt'; did you mean 'eval.sets\[\].samples_per_prompt'"),
    ({"samples_per_prompt": 0}, r"eval.samples_per_prompt: must be > 0, got 0"),
    ({"verify_timeout_s": 0}, r"eval.verify_timeout_s: must be > 0"),
    ({"top_p": 0}, r"eval.top_p: must be in \(0, 1\]"),
])
def test_bad_eval_values_name_the_key(write_manifest, assets, evals, message):
    evals = json.loads(json.dumps(evals).replace('"E"', json.dumps(str(assets["eval"]))))
    with pytest.raises(ManifestError, match=message):
        load_manifest(write_manifest(data={"eval": None} if "sets" in evals else {}, eval=evals))


def test_data_eval_and_sets_together_are_refused(write_manifest, assets):
    with pytest.raises(ManifestError, match=r"data.eval: .* is set together with eval.sets"):
        load_manifest(write_manifest(eval={"sets": [{"data": str(assets["eval"])}]}))


def test_a_sets_bad_rows_are_skipped_and_counted(write_manifest, assets, tmp_path):
    from launch.inputs import load_inputs
    bad = tmp_path / "aime.jsonl"
    bad.write_text(assets["eval"].read_text() + '{"prompt": "12+34="}\nnot json\n')
    inputs = load_inputs(load_manifest(write_manifest(data={"eval": None}, eval={
        "sets": [{"data": str(assets["eval"])}, {"data": str(bad), "size": 100}]})))
    assert [len(s.rows) for s in inputs.eval_sets] == [8, 16]
    assert inputs.skipped_rows["eval.sets[0].data"] == {}
    assert inputs.skipped_rows["eval.sets[1].data"] == {"missing field 'answer'": 1, "not JSON": 1}


# --- the Evaluator on a real HF engine, in process ---

@pytest.fixture(scope="module")
def engine_and_rows(assets):
    """The tiny random model, and eval rows whose answer is a digit: its completions end in that
    digit now and then (last_digits_match), so samples of one prompt differ in reward."""
    from transformers import AutoTokenizer
    from actors.hf_engine import HFEngine
    from launch.batches import PromptFormatter
    rows = [json.loads(line) for line in assets["eval"].read_text().splitlines()][:8]
    rows = [{**r, "answer": str(i % 3 + 1)} for i, r in enumerate(rows)]
    fmt = PromptFormatter(AutoTokenizer.from_pretrained(assets["tiny"]), "{prompt}", "{prompt}")
    return HFEngine(str(assets["tiny"])), fmt, rows


def _set(rows, n, name="e"):
    return EvalSet(EvalSetSpec("data.eval", name, "", len(rows), n, 8, 1.0, 1.0, "last_digits_match"), rows)


def test_one_sample_per_prompt_is_the_evaluation_as_it_was(engine_and_rows):
    """n = 1: the one engine call and the number the driver made before samples_per_prompt existed."""
    engine, fmt, rows = engine_and_rows
    metrics, acc = Evaluator([_set(rows, 1)], seed=5, verify_timeout_s=5.0, named=False)(engine, fmt)
    before = engine.generate(fmt.students(rows), SamplingSpec(max_new_tokens=8, temperature=1.0, top_p=1.0, seed=5,
                                                              behaviour_logprobs=False))
    want = sum(last_digits_match(fmt.text(c), r["answer"]) for c, r in zip(before.completions(), rows)) / len(rows)
    assert acc == metrics["eval/accuracy"] == want and set(metrics) == {"eval/accuracy", "eval/pass@1"}


def test_n_samples_are_grouped_by_prompt(engine_and_rows):
    """avg@n and pass@k from the samples' own rewards (row j*P + p is prompt p's sample j), brute force."""
    engine, fmt, rows = engine_and_rows
    n, p = 8, len(rows)
    metrics, acc = Evaluator([_set(rows, n)], seed=0, verify_timeout_s=5.0, named=False)(engine, fmt)
    again = engine.generate(fmt.students(rows) * n, _set(rows, n).sampling(0))  # the same call, the same samples
    flat = [last_digits_match(fmt.text(c), rows[i % p]["answer"]) == 1.0 for i, c in enumerate(again.completions())]
    right = [[flat[j * p + i] for j in range(n)] for i in range(p)]
    assert any(0 < sum(r) < n for r in right), "no prompt with mixed samples: the test would prove nothing"
    assert acc == pytest.approx(sum(map(sum, right)) / (n * p))
    for k in (1, 2, 4, 8):
        assert metrics[f"eval/pass@{k}"] == pytest.approx(sum(brute_pass_at_k(r, k) for r in right) / p)


def test_named_sets_are_logged_apart_and_the_first_is_the_headline(engine_and_rows):
    engine, fmt, rows = engine_and_rows
    sets = [_set(rows, 2, "a"), replace(_set(rows[:4], 1, "b"), spec=replace(_set(rows[:4], 1, "b").spec,
                                                                               verifier="exact_match"))]
    metrics, acc = Evaluator(sets, seed=0, verify_timeout_s=5.0, named=True)(engine, fmt)
    assert set(metrics) == {"eval/accuracy", "eval/pass@1", "eval/pass@2", "eval/a/accuracy", "eval/a/pass@1",
                            "eval/a/pass@2", "eval/b/accuracy", "eval/b/pass@1"}
    assert acc == metrics["eval/accuracy"] == metrics["eval/a/accuracy"]
    assert metrics["eval/pass@2"] == metrics["eval/a/pass@2"]


# --- a real tiny run ---

def test_a_grpo_run_evaluates_every_set_and_bounds_its_rewards(ray_session, write_manifest, assets, tmp_path, capsys):
    """GRPO on the tiny model with two eval sets: n = 4 samples for the first (the headline), a second
    with a bad row; rewards and the second set go through math_equiv's worker, in this process."""
    from launch.driver import train
    from tasks import verifiers
    second = tmp_path / "second.jsonl"
    second.write_text("".join(assets["eval"].read_text().splitlines(keepends=True)[:4]) + '{"prompt": "1+1="}\n')
    calls = verifiers._WORKER.calls
    cfg = load_manifest(write_manifest(
        algorithm="grpo", teacher={"kind": "none"}, loss={"name": "grpo"}, data={"eval": None},
        eval={"interval": 0, "size": 8, "temperature": 1.0, "verifier": "math_equiv", "verify_timeout_s": 2.0,
              "sets": [{"name": "arith", "data": str(assets["eval"]), "samples_per_prompt": 4,
                        "verifier": "last_digits_match"},
                       {"name": "second", "data": str(second), "max_new_tokens": 2}]}), ["run.steps=1"])
    summary = train(cfg)
    steps = [json.loads(line) for line in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    evals = [s for s in steps if "eval/accuracy" in s]
    assert [s["step"] for s in evals] == [0, 1]
    for s in evals:
        assert {"eval/pass@1", "eval/pass@2", "eval/pass@4", "eval/arith/pass@4", "eval/second/accuracy",
                "eval/second/pass@1"} <= set(s) and "eval/pass@3" not in s
        assert s["eval/accuracy"] == s["eval/arith/accuracy"] == pytest.approx(s["eval/pass@1"])
        assert s["eval/pass@1"] <= s["eval/pass@2"] <= s["eval/pass@4"] <= 1
    assert (summary["start_eval_accuracy"], summary["end_eval_accuracy"]) == tuple(s["eval/accuracy"] for s in evals)
    assert summary["skipped_rows"]["eval.sets[1].data"] == {"missing field 'answer'": 1}
    assert "eval.sets[0].data 0; eval.sets[1].data 1 (missing field 'answer': 1)" in capsys.readouterr().out
    # through the worker: GRPO's rewards (4 prompts x 2 samples) and the second set (4 rows, 2 evals)
    assert verifiers._WORKER.calls - calls == 4 * 2 + 4 * 2
