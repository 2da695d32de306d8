"""The one place a loss is reduced: sum_t weights_t * loss_t over completion positions.

Memory: forward and backward are both chunked over positions, so neither a float32 copy of the
[M, V] logits nor the loss's [M, V] intermediates ever exist at once. `_ChunkedLoss.forward` runs
each chunk under no_grad (upcast to float32) and keeps nothing but the logits reference; backward
recomputes each chunk with grad enabled and writes d loss / d logits_chunk into ONE preallocated
gradient tensor of the logits' own dtype (bf16 logits -> bf16 gradient). Peak extra memory is that
gradient (1x the logits) plus one chunk's working set, which `auto_chunk_rows` keeps near
CHUNK_BYTES per [chunk, V] float32 tensor. The price is running the loss twice per chunk.
"""
from __future__ import annotations

from typing import Optional

import torch

from losses.base import LossBatch, LossFn, diagnostics_off

CHUNK_BYTES = 16 * 2**20  # one [chunk, V] float32 tensor; a chunk's working set is ~10-16 of these


def auto_chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(vocab, 1)))


def _upcast(logits_chunk: torch.Tensor, temperature: float) -> torch.Tensor:
    """A fresh float32 (float64 stays float64) copy of the chunk, divided by the temperature."""
    dtype = torch.promote_types(logits_chunk.dtype, torch.float32)
    x = logits_chunk.to(dtype, copy=True)
    return x.div_(temperature) if temperature != 1.0 else x


def _spans(m: int, chunk: int) -> list[slice]:
    return [slice(s, min(s + chunk, m)) for s in range(0, m, chunk)]


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, fn, batch, temperature, chunk, diags_out):
        total = torch.zeros((), dtype=torch.promote_types(logits.dtype, torch.float32))
        for sl in _spans(logits.shape[0], chunk):
            sub = batch.rows(sl)
            out = fn(_upcast(logits[sl], temperature), sub)
            total += (out.per_token * sub.weights).sum()
            for k, v in out.diagnostics.items():
                d = (v.detach().to(total.dtype) * sub.weights).sum()
                diags_out[k] = diags_out[k] + d if k in diags_out else d
        ctx.save_for_backward(logits)
        ctx.fn, ctx.batch, ctx.temperature, ctx.chunk = fn, batch, temperature, chunk
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (logits,) = ctx.saved_tensors
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        scale = grad_total / ctx.temperature  # d x / d logits = 1 / temperature
        with torch.enable_grad(), diagnostics_off():
            for sl in _spans(logits.shape[0], ctx.chunk):
                sub = ctx.batch.rows(sl)
                x = _upcast(logits[sl], ctx.temperature).requires_grad_()
                out = ctx.fn(x, sub)
                part = (out.per_token * sub.weights).sum()
                if not part.requires_grad:  # the loss does not depend on these logits
                    grad[sl].zero_()
                    continue
                (gx,) = torch.autograd.grad(part, x)
                grad[sl].copy_(gx.mul_(scale))
                del out, part, gx, x
        return grad, None, None, None, None, None


def compute_loss(fn: LossFn, logits: torch.Tensor, batch: LossBatch, temperature: float = 1.0,
                 chunk_size: Optional[int] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logits: [M, V] student logits (any float dtype) at the M positions of `batch`.

    Returns (loss, diagnostics): loss = sum_t w_t * l_t (a scalar with grad, float32 or float64);
    each diagnostic is sum_t w_t * d_t, so summing over micro-batches and ranks gives the global
    token mean. chunk_size: rows per chunk (None: auto_chunk_rows(V)); results do not depend on it."""
    if logits.dim() != 2 or logits.shape[0] != batch.tokens.shape[0]:
        raise ValueError(f"compute_loss: logits {tuple(logits.shape)} must be [M, V] with M = "
                         f"{batch.tokens.shape[0]} rows of the LossBatch")
    prepare = getattr(fn, "prepare", None)
    if prepare is not None:
        batch = prepare(batch)
    chunk = chunk_size or auto_chunk_rows(logits.shape[1])
    diags: dict[str, torch.Tensor] = {}
    total = _ChunkedLoss.apply(logits, fn, batch, float(temperature), int(chunk), diags)
    return total, diags
