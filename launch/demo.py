"""`make demo`: tiny models -> teacher SFT -> brief student SFT -> on-policy distillation, then the
held-out accuracy before and after. Every stage is an ordinary `opd` command a user could run."""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

STAGES = [
    ("teacher SFT", "configs/demo/teacher_sft.yaml"),
    ("student SFT (brief warm start)", "configs/demo/student_sft.yaml"),
    ("on-policy distillation", "configs/demo/opd.yaml"),
]


def opd(*args: str) -> None:
    subprocess.run([sys.executable, "-m", "launch.cli", *args], check=True)


def main() -> int:
    t0 = time.time()
    if not Path("runs/tiny/models/student").exists():
        opd("make-tiny", "--out", "runs/tiny")
    summaries = []
    for title, manifest in STAGES:
        print(f"\n=== {title}: opd train {manifest}", flush=True)
        # the demo owns its run folders: a second `make demo` redoes every stage
        opd("train", manifest, "run.overwrite=true", *sys.argv[1:] if manifest.endswith("opd.yaml") else ())
        name = Path(manifest).stem
        run = {"teacher_sft": "demo-teacher", "student_sft": "demo-student", "opd": "demo-opd"}[name]
        summaries.append(json.loads(Path(f"runs/{run}/summary.json").read_text()))
    teacher, student, distilled = summaries
    lift = distilled["end_eval_accuracy"] - distilled["start_eval_accuracy"]
    print("\n=== result (held-out 2-digit addition, greedy, exact match)")
    print(f"teacher after SFT               {teacher['end_eval_accuracy']:6.1%}")
    print(f"student before OPD              {distilled['start_eval_accuracy']:6.1%}")
    print(f"student after {distilled['steps']} OPD steps       {distilled['end_eval_accuracy']:6.1%}   "
          f"({lift * 100:+.1f} points, loss {distilled['loss']})")
    print(f"wall time {time.time() - t0:.0f}s; metrics in runs/demo-opd/metrics.jsonl, "
          f"model in {distilled['final_model']}")
    return 0 if lift >= 0.20 else 1


if __name__ == "__main__":
    sys.exit(main())
