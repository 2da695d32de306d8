"""`opd train` end to end on tiny models with real Ray, DeepSpeed and transformers: run outputs,
skipped rows, checkpoint/resume, OPSD with a live self-teacher, GRPO and SFT."""
import json
import shutil

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from launch.cli import main


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_opd_run_writes_everything_and_resumes(ray_session, write_manifest, assets, tmp_path):
    train = tmp_path / "train.jsonl"
    shutil.copy(assets["train"], train)
    with train.open("a") as f:
        f.write('{"prompt": "1+1="}\n{"answer": "2"}\nnot json\n')
    manifest = write_manifest(data={"train": str(train)}, checkpoint={"interval": 1, "keep": 1},
                              loss={"name": "topk_reverse_kl_sg", "params": {"k": 4}})
    assert main(["train", str(manifest)]) == 0
    run = tmp_path / "runs" / "t"
    assert (run / "manifest.yaml").read_text().count("topk_reverse_kl_sg") == 1
    rows = read_metrics(run)
    steps = [r for r in rows if "train/loss" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in ("train/student_mass_on_support", "train/teacher_mass_on_support", "train/entropy",
                "rollout/response_length", "rollout/repetition_3gram", "time/rollout_s", "time/teacher_s",
                "time/learner_s", "time/sync_s", "perf/tokens_per_s", "train/grad_norm"):
        assert key in steps[0], key
    assert steps[0]["data/skipped_rows"] == 3
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 1, 2]
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 2 and 0 <= summary["end_eval_accuracy"] <= 1
    assert [p.name for p in (run / "checkpoints").iterdir() if p.name.startswith("step")] == ["step2"]

    model = AutoModelForCausalLM.from_pretrained(run / "final")
    tok = AutoTokenizer.from_pretrained(run / "final")
    out = model.generate(torch.tensor([[tok.bos_token_id] + tok("12+34=").input_ids]), max_new_tokens=3,
                         do_sample=False, pad_token_id=tok.pad_token_id)
    assert out.shape[1] > 7

    assert main(["train", str(manifest), "run.steps=3", "run.resume=true"]) == 0
    resumed = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    assert resumed == [1, 2, 3]  # continued from the step-2 checkpoint, not from scratch


@pytest.mark.parametrize("over", [
    # OPSD: the student's own weights as a live teacher, privileged hint in the teacher's prompt only.
    dict(teacher={"kind": "self", "live": True, "prompt_template": "{hint}{prompt}"}),
    dict(algorithm="grpo", loss={"name": "grpo"}, teacher={"kind": "none"}),
    dict(algorithm="sft", loss={"name": "sft"}, teacher={"kind": "none"}, learner={"micro_batch_size": 2}),
    dict(loss={"name": "full_reverse_kl"}, learner={"num_ranks": 2, "zero_stage": 3, "micro_batch_size": 2}),
    # The vLLM path (its CPU build): rollouts, teacher top-k scores and native weight sync.
    dict(rollout={"engine": "vllm", "vllm": {"kv_cache_memory_gb": 0.0625}},
         teacher={"kind": "vllm", "vllm": {"kv_cache_memory_gb": 0.0625}},
         loss={"name": "topk_reverse_kl_sg", "params": {"k": 4, "support": "teacher"}}),
], ids=["opsd-live-self-teacher", "grpo", "sft", "zero3-two-ranks", "vllm-rollout-and-teacher"])
def test_algorithms_run(ray_session, write_manifest, tmp_path, over):
    assert main(["train", str(write_manifest(**over)), "eval.interval=0"]) == 0
    rows = read_metrics(tmp_path / "runs" / "t")
    steps = [r for r in rows if "train/loss" in r]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(r["train/loss"])) for r in steps)
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2]


def sevens_sft(write_manifest, tmp_path, name: str, steps: int, evaluation: dict):
    """(manifest, data): SFT on a task with one answer ("7"), which the tiny model learns in a few dozen
    steps at lr 1e-2; the same rows train and evaluate."""
    data = tmp_path / "sevens.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"{i}+{i}=", "answer": "7"}) + "\n" for i in range(64)))
    return write_manifest(algorithm="sft", loss={"name": "sft"}, teacher={"kind": "none"},
                          data={"train": str(data), "eval": str(data)},
                          run={"name": name, "output_dir": str(tmp_path / "runs"), "steps": steps},
                          learner={"micro_batch_size": 4, "lr": 1e-2, "schedule": "constant", "warmup_ratio": 0},
                          eval=evaluation), data


def test_eval_stop_at_accuracy_ends_the_run_at_that_evaluation(ray_session, write_manifest, tmp_path):
    """SFT on a task with one answer ("7") learns it in a few dozen steps; the run stops at the first
    evaluation at or above the threshold, and its summary and final model are that step's."""
    manifest, _ = sevens_sft(write_manifest, tmp_path, "stop", 200, {"interval": 5, "size": 16, "stop_at_accuracy": 0.5})
    assert main(["train", str(manifest)]) == 0
    run = tmp_path / "runs" / "stop"
    summary = json.loads((run / "summary.json").read_text())
    steps = [r["step"] for r in read_metrics(run) if "train/loss" in r]
    evals = [(r["step"], r["eval/accuracy"]) for r in read_metrics(run) if "eval/accuracy" in r]
    assert 0 < summary["steps"] < 200 and summary["steps"] % 5 == 0 and steps[-1] == summary["steps"]
    assert evals[-1] == (summary["steps"], summary["end_eval_accuracy"]) and summary["end_eval_accuracy"] >= 0.5
    assert all(acc < 0.5 for _, acc in evals[:-1])  # it did not run past an earlier success
    assert (run / "final" / "config.json").exists()


def test_eval_stop_at_accuracy_is_checked_before_work(write_manifest):
    from launch.config import ManifestError
    from launch.manifest import load_manifest
    for bad in ({"stop_at_accuracy": 1.5}, {"stop_at_accuracy": 0.5, "interval": 0}):
        with pytest.raises(ManifestError, match="eval.stop_at_accuracy"):
            load_manifest(write_manifest(eval=bad))


def test_sft_sends_its_weights_only_before_an_evaluation(ray_session, write_manifest, tmp_path, capsys):
    """SFT samples nothing between evaluations, so the learner sends its weights only at evaluation steps
    and the last; each evaluation still sees the newest weights: the last one's accuracy is the saved
    model's, evaluated on its own, and it moved off the untrained model's."""
    manifest, data = sevens_sft(write_manifest, tmp_path, "lazy", 30, {"interval": 10, "size": 16, "max_new_tokens": 4})
    assert main(["train", str(manifest)]) == 0
    run = tmp_path / "runs" / "lazy"
    rows = read_metrics(run)
    assert [r["step"] for r in rows if "time/sync_s" in r] == [10, 20, 30]
    evals = {r["step"]: r["eval/accuracy"] for r in rows if "eval/accuracy" in r}
    assert sorted(evals) == [0, 10, 20, 30] and evals[30] != evals[0]
    capsys.readouterr()
    assert main(["eval", "--model", str(run / "final"), "--data", str(data), "--size", "16",
                 "--max-new-tokens", "4"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["accuracy"] == evals[30]
