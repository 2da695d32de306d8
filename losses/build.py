"""Turn a manifest's `loss:` section into a callable Loss with declared needs."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

import torch

from losses.base import REGISTRY, LossBatch, LossFn, Needs
from losses.reduce import compute_loss


@dataclass
class Loss:
    name: str
    fn: LossFn
    needs: Needs
    temperature: float = 1.0

    def __call__(self, logits: torch.Tensor, batch: LossBatch):
        return compute_loss(self.fn, logits, batch, self.temperature)


def build_loss(name: str, params: dict[str, Any] | None = None, temperature: float = 1.0) -> Loss:
    """Look `name` up in the registry and build it; errors name the field and the valid choices."""
    params = dict(params or {})
    if name not in REGISTRY:
        near = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"loss.name: unknown loss {name!r}{hint}; choose one of {sorted(REGISTRY)}")
    spec = REGISTRY[name]
    try:
        fn = spec.build(**params)
        needs = spec.needs(**params)
    except TypeError as e:
        raise ValueError(f"loss.params: {e} (loss {name!r})") from e
    return Loss(name=name, fn=fn, needs=needs, temperature=temperature)
