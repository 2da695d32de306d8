"""`make demo` (launch/demo.py) without running it: the seed option, the stage commands, the
gap-closed figure and the exit status. The demo itself takes minutes; these take well under a second."""
from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from launch import demo
from launch.manifest import load_manifest

ROOT = Path(__file__).resolve().parent.parent


def test_gap_closed():
    assert demo.gap_closed(teacher=0.9, before=0.1, after=0.74) == pytest.approx(0.8)
    assert demo.gap_closed(teacher=0.9, before=0.1, after=0.1) == 0.0
    assert demo.gap_closed(teacher=0.9, before=0.1, after=0.95) > 1.0  # a student may pass its teacher
    assert demo.gap_closed(teacher=0.5, before=0.5, after=0.6) is None  # no gap: not a fraction


def test_seed_and_overrides_reach_the_stages():
    args = demo.parse_args(["loss.name=full_reverse_kl", "--seed", "2", "learner.lr=1e-3"])
    assert args.seed == 2 and args.overrides == ["loss.name=full_reverse_kl", "learner.lr=1e-3"]
    assert demo.parse_args([]).seed == 0
    assert demo.make_tiny_command(2) == ["make-tiny", "--out", "runs/tiny", "--seed", "2"]
    stages = demo.stage_commands(args.seed, args.overrides)
    assert [cmd[1] for _, cmd, _ in stages] == [m for _, m, _ in demo.STAGES]
    for _, cmd, _ in stages:
        assert cmd[0] == "train" and "run.seed=2" in cmd and "run.overwrite=true" in cmd
    assert [("loss.name=full_reverse_kl" in cmd) for _, cmd, _ in stages] == [False, False, True]


def test_stage_manifests_are_valid_and_name_their_runs():
    """Each stage is a plain `opd train` command; the run names the demo reads summaries from are the
    manifests' own, and the OPD stage reads the two SFT stages' final models."""
    cfgs = []
    for _, cmd, run in demo.stage_commands(3):
        cfg = load_manifest(str(ROOT / cmd[1]), cmd[2:], check_paths=False)
        assert cfg.run.name == run and cfg.run.seed == 3
        cfgs.append(cfg)
    teacher, student, opd = cfgs
    assert opd.model.path.endswith("runs/demo-student/final") and opd.teacher.path.endswith("runs/demo-teacher/final")
    # the student's warm start is the brief one: it stops at its first eval with 20% right
    assert student.eval.stop_at_accuracy == 0.2 and student.eval.interval > 0 and teacher.eval.stop_at_accuracy is None


@pytest.mark.parametrize("after, status", [(0.80, 0), (0.60, 1)])
def test_exit_status_follows_the_gap_closed(tmp_path, monkeypatch, capsys, after, status):
    """Teacher 90%, student 20% -> `after`: 0.80 closes 86% of the gap (pass), 0.60 closes 57% (fail)."""
    monkeypatch.chdir(tmp_path)
    calls = []

    def fake_opd(*args):
        calls.append(args)
        if args[0] == "make-tiny":
            (tmp_path / "runs/tiny/models/student").mkdir(parents=True)
            return
        run = {"teacher_sft": "demo-teacher", "student_sft": "demo-student", "opd": "demo-opd"}[Path(args[1]).stem]
        acc = {"demo-teacher": (0.0, 0.9), "demo-student": (0.0, 0.2), "demo-opd": (0.2, after)}[run]
        (tmp_path / "runs" / run).mkdir(parents=True, exist_ok=True)
        (tmp_path / "runs" / run / "summary.json").write_text(json.dumps(
            {"steps": 10, "loss": "x", "start_eval_accuracy": acc[0], "end_eval_accuracy": acc[1],
             "final_model": f"runs/{run}/final"}))

    class Done:
        def wait(self):
            return 0

    monkeypatch.setattr(demo, "opd", fake_opd)
    monkeypatch.setattr(demo, "spawn", lambda args, log: fake_opd(*args) or Done())  # the student's SFT
    assert demo.main(["--seed", "1"]) == status
    assert calls[0] == ("make-tiny", "--out", "runs/tiny", "--seed", "1")
    out = capsys.readouterr()
    closed = (after - 0.2) / 0.7
    assert re.search(rf"gap closed +{closed:.1%}".replace(".", r"\."), out.out)
    assert ("FAILED" in out.err) == bool(status)
    # the tiny models are remade only when the seed changes
    assert (tmp_path / "runs/tiny/demo-seed").read_text().strip() == "1"
