"""Every configs/paper arm, shrunk by configs/paper/cpu.yaml (the OPSD arm also by cpu_opsd.yaml), trains 2
steps on this CPU: the tiny Qwen3 family at Qwen3's 151,936 embedding rows, written once (`opd make-tiny
--family qwen3`'s write_family), with the arm's own algorithm, loss, teacher kind and engines (vLLM's CPU build
for rollouts and the vLLM teachers, an HF self-teacher for OPSD), chat template, eval sets and verifiers, all in
one Ray session. The arm JOB_ARM runs through `ray job submit` to a token-authenticated head instead
(tests/test_ray_job.py), so every arm trains once.

2 steps: the first runs the arm's loss and an update (several for the 8B and GRPO arms) and syncs the weights
into the engines; the second samples with the synced weights and steps again. What the shrink leaves alone is
checked without running anything in tests/test_paper_setting.py.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from launch.cli import main
from launch.manifest import load_manifest

PAPER = Path(__file__).resolve().parents[1] / "configs" / "paper"
JOB_ARM = PAPER / "topk_t2_k1.yaml"  # the ray job's arm: T2 with the masked student support from a vLLM teacher
ARMS = sorted(p for p in PAPER.glob("*.yaml") if p.stem != "base" and not p.stem.startswith("cpu") and p != JOB_ARM)


def layers(arm: Path) -> list[str]:
    """The arm, then the CPU shrink (and the OPSD arm's data on top)."""
    return [str(arm), str(PAPER / "cpu.yaml")] + ([str(PAPER / "cpu_opsd.yaml")] if arm.stem.startswith("opsd") else [])


@pytest.fixture(scope="module")
def workdir(qwen3_assets, tmp_path_factory) -> Path:
    """A directory whose runs/tiny-qwen3 is the family make-tiny writes: cpu.yaml's relative paths resolve there."""
    root = tmp_path_factory.mktemp("paper-cpu")
    (root / "runs").mkdir()
    (root / "runs" / "tiny-qwen3").symlink_to(Path(qwen3_assets["student"]).parent)
    return root


def steps_of(run: Path) -> list[dict]:
    rows = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "train/loss" in r]


def check_run(run: Path, cfg) -> None:
    """summary.json of 2 steps, finite losses and the metrics only this arm's loss and teacher produce."""
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["steps"], summary["loss"], summary["algorithm"]) == (2, cfg.loss.name, cfg.algorithm)
    assert (run / "final" / "config.json").is_file()
    steps = steps_of(run)
    assert [r["step"] for r in steps] == [1, 2]
    expected = {"train/loss", "train/grad_norm"}
    if cfg.loss.params.get("support") == "student_masked":
        expected.add("train/teacher_topk_hit_fraction")
    if cfg.loss.params.get("support") == "intersection":
        expected.add("train/empty_support")
    if cfg.loss.kl_to_reference.coef > 0:
        expected.add("train/kl_to_reference")
    for r in steps:
        for key in expected:
            assert math.isfinite(r[key]), (key, r)
        assert r["train/skipped_nonfinite"] == 0
    evals = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    for s in cfg.eval.sets:  # every set, under its own name, at the start and the end
        assert sum(f"eval/{s.name}/accuracy" in r for r in evals) == 2, s.name


@pytest.mark.parametrize("arm", ARMS, ids=lambda p: p.stem)
def test_paper_arm_trains_two_steps_on_cpu(ray_session, workdir, monkeypatch, arm):
    monkeypatch.chdir(workdir)
    cfg = load_manifest(layers(arm))
    assert cfg.model.path.endswith("student-151936") and cfg.rollout.engine == "vllm"
    assert main(["train", *layers(arm)]) == 0
    check_run(workdir / "runs" / "paper-cpu" / cfg.run.name, cfg)
