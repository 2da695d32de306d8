"""The one place a loss is reduced: sum_t weights_t * loss_t over completion positions.

`compute_loss` walks the flattened positions in chunks so a float32 copy of the full
[positions, V] logits never exists at once (TODO: custom autograd so backward is chunked too).
"""
from __future__ import annotations

import torch

from losses.base import LossBatch, LossFn


def compute_loss(fn: LossFn, logits: torch.Tensor, batch: LossBatch, temperature: float = 1.0,
                 chunk_size: int = 1024) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logits: [M, V] student logits (any float dtype) at the M positions of `batch`.

    Returns (loss, diagnostics): loss = sum_t w_t * l_t (a scalar with grad); each diagnostic is
    sum_t w_t * d_t, so summing over micro-batches and ranks gives the global token mean."""
    total = logits.new_zeros((), dtype=torch.float32)
    diags: dict[str, torch.Tensor] = {}
    for start in range(0, logits.shape[0], chunk_size):
        sl = slice(start, start + chunk_size)
        sub = batch.rows(sl)
        out = fn(logits[sl].float() / temperature, sub)
        total = total + (out.per_token * sub.weights).sum()
        for k, v in out.diagnostics.items():
            diags[k] = diags.get(k, 0.0) + (v.detach().float() * sub.weights).sum()
    return total, diags
