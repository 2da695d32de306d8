"""The numerical guard: the learner skips a step whose loss or gradient norm is not finite (no weight
change); the driver then skips its weight sync, counts the step, and stops the run when too many
come in a row, naming the step and the metric. One bad batch is survivable; a diverged run is not."""
from __future__ import annotations

import math

from launch.remote import RunStopped

WATCHED = ("train/loss", "train/grad_norm")


class NonfiniteGuard:
    def __init__(self, limit: int, in_row: int = 0):
        self.limit, self.in_row, self.total = limit, in_row, 0

    def skipped(self, step: int, metrics: dict[str, float]) -> bool:
        """Whether the learner skipped this step; raises RunStopped at learner.max_nonfinite_steps in a row."""
        if not metrics.get("train/skipped_nonfinite"):
            self.in_row = 0
            return False
        self.in_row, self.total = self.in_row + 1, self.total + 1
        key = next((k for k in WATCHED if not math.isfinite(metrics.get(k, 0.0))), "train/grad_norm")
        what = f"step {step}: {key} is {metrics.get(key)}"
        if self.in_row >= self.limit:
            raise RunStopped(f"{what}, {self.in_row} non-finite steps in a row (learner.max_nonfinite_steps = "
                             f"{self.limit}); the weights are those before the first of them. Lower learner.lr "
                             "or check the data and the teacher's scores")
        print(f"opd: {what}; optimizer step and weight sync skipped ({self.in_row} in a row)", flush=True)
        return True
