"""The rollout engine boundary. The HF engine (CPU, tests, debugging) and the vLLM engine (GPU)
both implement it; nothing outside actors/ and teachers/ knows which one runs. tests/test_protocols.py
and mypy (make check) hold both to it."""
from __future__ import annotations

from typing import Optional, Protocol

from opd.contracts import Rollout, SamplingSpec
from opd.weight_sync.receiver import WeightReceiver


class RolloutEngine(WeightReceiver, Protocol):
    """Samples with the student's weights, which it receives from the learner after every step
    (WeightReceiver: the weight-sync calls, tagging what it holds with `weight_version`)."""

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> Rollout:
        """Sample one completion per prompt (repeat prompts for n samples)."""
        ...

    def sleep(self) -> None:
        """Colocated with the learner: give up its memory for the learner's step (an HF engine keeps it)."""
        ...

    def wake_up(self, tags: Optional[list[str]] = None) -> None: ...
