"""The rollout engine boundary. The HF engine (CPU, tests, debugging) and the vLLM engine (GPU)
both implement it; nothing outside actors/ and teachers/ knows which one runs."""
from __future__ import annotations

from typing import Iterable, Protocol

import torch

from opd.contracts import Rollout, SamplingSpec


class RolloutEngine(Protocol):
    weight_version: int

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> Rollout:
        """Sample one completion per prompt (repeat prompts for n samples)."""

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """Load new student weights (names as in the HF model's state_dict) and tag them `version`."""
