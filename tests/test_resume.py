"""Exact resume: a real `opd train` killed with SIGKILL mid-run and resumed logs the same per-step
metrics as a run never stopped (the shared reference run); unfinished checkpoints are skipped; a run folder
holding another run is refused unless the user asks to resume or overwrite."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from launch.cli import main
from launch.config import ManifestError
from launch.manifest import load_manifest
from launch.run_dir import RunDir
from learner import checkpoint

from conftest import reference_sections, tiny_manifest

REPO = Path(__file__).resolve().parents[1]
TIMING = ("time/", "perf/")


def read_metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def comparable(rows):
    """Every logged value except wall-clock timings, keyed by (step, kind)."""
    return [{k: v for k, v in r.items() if not k.startswith(TIMING)} for r in rows]


def test_sigkill_mid_run_then_resume_gives_the_same_metrics(reference_run, assets, tmp_path, capsys):
    """The shared reference run's manifest (tests/conftest.py: REFERENCE), checkpointed every step, killed with
    its Ray as a preempted node just after step 1's checkpoint, then resumed: it logs what the reference run
    logged, step for step (no metric depends on the checkpoint interval)."""
    sections = reference_sections("killed", tmp_path / "runs")
    manifest = tiny_manifest(assets, tmp_path, **{**sections, "checkpoint": {"interval": 1, "keep": 2}})
    run = tmp_path / "runs" / "killed"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    proc = subprocess.Popen([sys.executable, "-m", "launch.cli", "train", str(manifest)], cwd=REPO, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    sealed = run / "checkpoints" / "step1" / checkpoint.MARKER
    deadline = time.time() + 400
    while not sealed.exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)  # the driver, its Ray and every actor, as a preempted node
    proc.wait()
    assert sealed.exists(), "the run never wrote its step-1 checkpoint"
    assert not (run / "summary.json").exists()
    # What a kill during a save leaves behind, newer than the last complete checkpoint:
    (run / "checkpoints" / "step4.tmp").mkdir()
    (run / "checkpoints" / "step3").mkdir()  # no marker: cut short before it was sealed
    (run / "checkpoints" / "step3" / "mp_rank_00_model_states.pt").write_bytes(b"half a file")

    assert main(["train", str(manifest), "run.resume=true"]) == 0
    out = capsys.readouterr().out
    assert "skipping incomplete checkpoint" in out and "step3" in out and "step4.tmp" in out
    resumed_from = int(out.split("resuming from ")[1].split("(step ")[1].split(" ")[0])
    assert resumed_from in (1, 2)
    got, want = read_metrics(run), read_metrics(reference_run)
    assert [r["step"] for r in got if "train/loss" in r] == [1, 2, 3, 4]  # no step logged twice
    assert comparable(got) == comparable(want)
    assert [p.name for p in checkpoint.complete(run / "checkpoints")] == ["step3", "step4"]
    assert not checkpoint.incomplete(run / "checkpoints")


def test_checkpoints_are_sealed_or_skipped(tmp_path):
    d = tmp_path / "checkpoints"
    checkpoint.staging(d, 4).mkdir(parents=True)
    assert checkpoint.complete(d) == [] and checkpoint.incomplete(d) == [d / "step4.tmp"]
    checkpoint.seal(d, 4, {"step": 4})
    assert checkpoint.complete(d) == [d / "step4"] and checkpoint.state(d / "step4") == {"step": 4}
    (d / "step10").mkdir()
    assert checkpoint.complete(d) == [d / "step4"] and checkpoint.incomplete(d) == [d / "step10"]


def test_a_run_folder_is_not_silently_reused(write_manifest, tmp_path):
    manifest = write_manifest()
    RunDir(load_manifest(manifest)).log(1, {"train/loss": 1.0})
    run = tmp_path / "runs" / "t"
    with pytest.raises(ManifestError, match=r"run.name: .*already holds a run; use run.resume=auto.*run.overwrite=true"):
        RunDir(load_manifest(manifest))
    with pytest.raises(ManifestError, match="run.resume: true, but .* holds no complete checkpoint"):
        RunDir(load_manifest(manifest, ["run.resume=true"]))
    assert (run / "metrics.jsonl").read_text()  # refusals touch nothing
    fresh = RunDir(load_manifest(manifest, ["run.resume=auto"]))  # nothing to resume: starts afresh
    assert fresh.resume_from is None and (run / "metrics.jsonl").read_text() == ""
    fresh.log(1, {"train/loss": 1.0})
    RunDir(load_manifest(manifest, ["run.overwrite=true"]))
    assert (run / "metrics.jsonl").read_text() == ""
    # The same manifest with nothing logged (a run that stopped before its first step) may start again.
    RunDir(load_manifest(manifest))
    with pytest.raises(ManifestError, match="run.resume: 'sometimes' is not one of true, false, auto"):
        load_manifest(manifest, ["run.resume=sometimes"])


def test_cli_refuses_a_used_run_name_before_any_work(write_manifest, tmp_path, capsys):
    manifest = write_manifest()
    run = tmp_path / "runs" / "t"
    run.mkdir(parents=True)
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n')
    assert main(["train", str(manifest)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("opd: bad input: run.name:")
    assert sorted(p.name for p in run.iterdir()) == ["metrics.jsonl"]


def test_resume_truncates_what_a_killed_run_logged_after_its_checkpoint(write_manifest, tmp_path):
    manifest = write_manifest()
    run = tmp_path / "runs" / "t"
    checkpoint.staging(run / "checkpoints", 2).mkdir(parents=True)
    checkpoint.seal(run / "checkpoints", 2, {"step": 2})
    rows = [{"step": 0, "eval/accuracy": 0.5}, {"step": 1, "train/loss": 1.0}, {"step": 2, "train/loss": 0.9},
            {"step": 3, "train/loss": 0.8}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 4, "tr')
    d = RunDir(load_manifest(manifest, ["run.resume=true"]))
    assert d.resume_state["step"] == 2 and d.start_eval == 0.5
    assert read_metrics(run) == rows[:3]


def test_learner_checkpoint_restores_weights_optimizer_and_generators(ray_session, write_manifest, tmp_path):
    """Through real DeepSpeed: a sealed checkpoint restores the torch generator state too."""
    from learner.worker import LearnerWorker
    import torch.distributed as dist
    cfg = load_manifest(write_manifest())
    worker = LearnerWorker(cfg, 0, 1, rows_per_step=8)
    try:
        torch.manual_seed(7)
        state = {"step": 5, "data": {"epoch": 0, "pos": 3}, "weight_version": 5}
        path = worker.save_checkpoint(str(tmp_path / "ck"), 5, state)
        expected = torch.rand(3)
        before = {k: v.clone() for k, v in worker.engine.module.state_dict().items()}
        with torch.no_grad():
            for p in worker.engine.module.parameters():
                p.add_(1.0)
        worker.load_checkpoint(path)
        assert torch.equal(torch.rand(3), expected)
        after = worker.engine.module.state_dict()
        assert all(torch.equal(before[k], after[k]) for k in before)
        assert checkpoint.state(Path(path)) == state
        with pytest.raises(RuntimeError, match=r"checkpoint .*step7: cannot be loaded on rank 0"):
            (tmp_path / "ck" / "step7").mkdir()
            worker.load_checkpoint(str(tmp_path / "ck" / "step7"))
    finally:
        dist.destroy_process_group()
