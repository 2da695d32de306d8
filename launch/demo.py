"""`make demo`: tiny models -> teacher SFT -> brief student SFT -> on-policy distillation, then the
held-out accuracy before and after, and the fraction of the teacher-student gap that OPD closed.
The student's SFT stops at its first evaluation with 20% right (eval.stop_at_accuracy), so it is
partly competent, and clearly weaker than the teacher, whatever the seed.
Every stage is an ordinary `opd` command a user could run; the demo prints each one.

    python -m launch.demo [--seed N] [key=value ...]   # overrides apply to the OPD stage only

--seed N (default 0) is `opd make-tiny --seed N` (the tiny models' random init and the task's
train/eval split) and `run.seed=N` on every stage (data order, rollout sampling): a different seed is
a different run from scratch, which is what a different machine's float kernels amount to.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from launch.report import gap_closed

TINY = Path("runs/tiny")
STUDENT_LOG = "runs/demo-student.log"
STAGES = [  # title, manifest, run name (the manifest's run.name)
    ("teacher SFT", "configs/demo/teacher_sft.yaml", "demo-teacher"),
    ("student SFT (brief warm start)", "configs/demo/student_sft.yaml", "demo-student"),
    ("on-policy distillation", "configs/demo/opd.yaml", "demo-opd"),
]
PASS_MARK = 0.70  # the demo fails if OPD closes less of the teacher-student gap than this


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m launch.demo", description=__doc__.split("\n\n")[0])
    p.add_argument("--seed", type=int, default=0, help="tiny models' init, data split and every stage's run.seed")
    p.add_argument("overrides", nargs="*", help="key=value overrides for the OPD stage, e.g. loss.name=sampled_token_rkl")
    return p.parse_intermixed_args(argv)


def make_tiny_command(seed: int) -> list[str]:
    return ["make-tiny", "--out", str(TINY), "--seed", str(seed)]


def stage_commands(seed: int, opd_overrides: list[str] = ()) -> list[tuple[str, list[str], str]]:
    """(title, `opd` arguments, run name) per stage. The demo owns its run folders: a second
    `make demo` redoes every stage (run.overwrite=true)."""
    return [(title, ["train", manifest, f"run.seed={seed}", "run.overwrite=true",
                     *(opd_overrides if manifest.endswith("opd.yaml") else ())], run)
            for title, manifest, run in STAGES]


def opd(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "launch.cli", *args], check=True)


def spawn(args: list[str], log) -> subprocess.Popen:
    """`opd ARGS` in the background, its output to the open file `log`."""
    return subprocess.Popen([sys.executable, "-m", "launch.cli", *args], stdout=log, stderr=subprocess.STDOUT)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    t0, walls = time.time(), {}
    stamp = TINY / "demo-seed"  # which seed runs/tiny was made with: a new seed remakes it
    if not (TINY / "models/student").exists() or not stamp.exists() or stamp.read_text().strip() != str(args.seed):
        print(f"=== tiny models and task: opd {' '.join(make_tiny_command(args.seed))}", flush=True)
        t = time.time()
        opd(*make_tiny_command(args.seed))
        walls["tiny"] = time.time() - t
        stamp.write_text(f"{args.seed}\n")
    stages = stage_commands(args.seed, args.overrides)
    # The two SFT stages are independent (each starts from its own tiny model) and each keeps one core
    # busy, so they run side by side; the student's output is kept in runs/demo-student.log and shown
    # after the teacher's. The OPD stage needs both.
    (t_title, t_cmd, _), (s_title, s_cmd, _), (o_title, o_cmd, _) = stages
    print(f"\n=== {s_title}, alongside the teacher: opd {' '.join(s_cmd)}", flush=True)
    print(f"=== {t_title}: opd {' '.join(t_cmd)}", flush=True)
    Path("runs").mkdir(exist_ok=True)
    t = time.time()
    with open(STUDENT_LOG, "w") as log:
        student_proc = spawn(s_cmd, log)
        try:
            opd(*t_cmd)
        finally:
            code = student_proc.wait()
    walls["SFT"] = time.time() - t
    print(f"\n=== {s_title}: its output ({STUDENT_LOG})", flush=True)
    print(Path(STUDENT_LOG).read_text(), end="", flush=True)
    if code:
        raise subprocess.CalledProcessError(code, ["opd", *s_cmd])
    print(f"\n=== {o_title}: opd {' '.join(o_cmd)}", flush=True)
    t = time.time()
    opd(*o_cmd)
    walls["OPD"] = time.time() - t
    summaries = [json.loads(Path(f"runs/{run}/summary.json").read_text()) for *_, run in stages]
    teacher, student, distilled = summaries
    t_acc, before, after = teacher["end_eval_accuracy"], distilled["start_eval_accuracy"], distilled["end_eval_accuracy"]
    closed = gap_closed(t_acc, before, after)
    print(f"\n=== result (held-out 2-digit addition, greedy, exact match; seed {args.seed})")
    print(f"teacher after {teacher['steps']} SFT steps       {t_acc:6.1%}")
    print(f"student after {student['steps']} SFT steps       {before:6.1%}")
    print(f"student after {distilled['steps']} OPD steps       {after:6.1%}   "
          f"({(after - before) * 100:+.1f} points, loss {distilled['loss']})")
    if closed is not None:
        print(f"gap closed                     {closed:6.1%}   (of the {(t_acc - before) * 100:.1f}-point "
              f"teacher-student gap; pass mark {PASS_MARK:.0%})")
    print(f"wall time {time.time() - t0:.0f}s (tiny models {walls.get('tiny', 0):.0f}s, SFT stages side by side {walls['SFT']:.0f}s, OPD {walls['OPD']:.0f}s); metrics in runs/demo-opd/metrics.jsonl, "
          f"model in {distilled['final_model']}")
    if closed is None:
        print(f"demo: FAILED: the student ({before:.1%}) was not weaker than the teacher ({t_acc:.1%}): "
              "no gap to close", file=sys.stderr)
        return 1
    if closed < PASS_MARK:
        print(f"demo: FAILED: OPD closed {closed:.1%} of the teacher-student gap, below the {PASS_MARK:.0%} "
              "the demo promises", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
