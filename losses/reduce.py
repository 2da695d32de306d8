"""The one place a loss is reduced: sum_t weights_t * loss_t over completion positions.

Two entry points share one chunk loop:

* `compute_loss(fn, logits, batch)`: from student logits [M, V] (the reference path).
* `compute_loss_from_hidden(fn, hidden, head, batch)`: from the student's final hidden states [M, H]
  and its output head, so the [M, V] logits never exist. Each chunk's logits are made, the loss and its
  gradient taken, and d/dhidden, d/dhead accumulated in ONE pass (the gradient is stored for backward,
  which only scales it): the loss runs once per chunk instead of twice, and peak extra memory is one
  chunk's working set plus d/dhead. The learner's default (learner.fused_head). Its chunks are twice the
  logits path's (FUSED_CHUNK_BYTES): it holds two or three [chunk, V] tensors where autograd's backward
  holds 10-16, and the head's matmuls run faster at more rows (docs/benchmarks.md).

Either path also takes the teacher as final hidden states (LossBatch.teacher_hidden [M, Ht]) plus the
teacher's head, and makes each chunk's full teacher log-probs on the spot: exact full-vocabulary losses
without [N, T, V] teacher log-probs crossing a process boundary (teacher.full_vocab_transport).

The logits path, in detail:

Memory: forward and backward are both chunked over positions, so neither a float32 copy of the
[M, V] logits nor the loss's [M, V] intermediates ever exist at once. `_ChunkedLoss.forward` runs
each chunk under no_grad (upcast to float32) and keeps nothing but the logits reference; backward
recomputes each chunk with grad enabled and writes d loss / d logits_chunk into ONE preallocated
gradient tensor of the logits' own dtype (bf16 logits -> bf16 gradient). Peak extra memory is that
gradient (1x the logits) plus one chunk's working set, which `auto_chunk_rows` keeps near
CHUNK_BYTES per [chunk, V] float32 tensor. The price is running the loss twice per chunk.
"""
from __future__ import annotations

import os
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Callable, Iterator, Optional, TypeVar

import torch
import torch.nn.functional as F

from losses.base import LossBatch, LossFn, diagnostics_off

CHUNK_BYTES = 16 * 2**20  # one [chunk, V] float32 tensor; a chunk's working set is ~10-16 of these
FUSED_CHUNK_BYTES = 32 * 2**20  # the same for compute_loss_from_hidden: 262 rows at V = 32,000
TILE_BYTES = 2**18  # per thread, one row tile of a chunk's elementwise work on a CPU (row_tiles)
TEACHER_AHEAD = 2  # chunks whose teacher log-probs the teacher-head thread may have made before they are used


def auto_chunk_rows(vocab: int, budget: int = CHUNK_BYTES) -> int:
    return max(1, budget // (4 * max(vocab, 1)))


def _upcast(logits_chunk: torch.Tensor, temperature: float, own: bool = False) -> torch.Tensor:
    """A float32 (float64 stays float64) chunk divided by the temperature: a fresh copy, or with `own` (a
    chunk nothing else holds, the fused head's own output) the chunk itself unless it must be widened. That
    copy cost 2-5% of the fused loss at the realistic shape (docs/benchmarks.md)."""
    dtype = torch.promote_types(logits_chunk.dtype, torch.float32)
    x = logits_chunk.to(dtype, copy=not own)
    return x.div_(temperature) if temperature != 1.0 else x


def _spans(m: int, chunk: int) -> list[slice]:
    return [slice(s, min(s + chunk, m)) for s in range(0, m, chunk)]


@dataclass(frozen=True)
class Head:
    """An output layer: logits = hidden @ weight.T (+ bias). weight [V, H]."""
    weight: torch.Tensor
    bias: Optional[torch.Tensor] = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(hidden.dtype)
        return F.linear(hidden, self.weight.to(hidden.dtype), bias)

    def detach(self) -> "Head":
        return Head(self.weight.detach(), None if self.bias is None else self.bias.detach())

    def to(self, device: torch.device) -> "Head":
        return Head(self.weight.to(device), None if self.bias is None else self.bias.to(device))


def row_tiles(x: torch.Tensor) -> list[slice]:
    """Row tiles for elementwise passes over x [M, V]. On a CPU a few rows per thread (TILE_BYTES each), so
    that a log-softmax, its exp and the products that follow read the core's cache rather than memory: 2-3x
    faster than passes over a whole [131, 32000] chunk (docs/benchmarks.md). Elsewhere the whole chunk. Each
    row's values do not depend on the tiling."""
    if x.device.type != "cpu":
        return [slice(0, x.shape[0])]
    per_thread = max(1, TILE_BYTES // (x.element_size() * max(x.shape[1], 1)))
    return _spans(x.shape[0], per_thread * torch.get_num_threads())


def _teacher_token_stats(logq: torch.Tensor, tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """The teacher's statistics at the sampled tokens from its log-probs [m, V] (teacher/*, as a teacher that
    sends log-probs reports them): log q(y_t), rank (1 + tokens more likely), top-1, entropy; each [m]."""
    at = logq.gather(-1, tokens[:, None])
    # the comparison into a float tensor: summing a bool tensor was 6-7x slower (docs/benchmarks.md)
    rank = 1 + torch.gt(logq, at, out=torch.empty_like(logq)).sum(-1)
    return {"teacher/logprob_sampled": at.squeeze(-1), "teacher/rank_sampled": rank,
            "teacher/top1_fraction": (rank == 1).to(logq.dtype),
            "teacher/entropy": -torch.linalg.vecdot(logq.exp(), logq)}


def _chunk_rows(batch: LossBatch, sl: slice, teacher_head: Optional[Head], temperature: float,
                stats: bool = False) -> tuple[LossBatch, Optional[dict[str, torch.Tensor]]]:
    """The chunk's rows; a hidden-state teacher becomes full log-probs here, one chunk at a time
    (log softmax(teacher_head(h) / temperature), as the teacher itself computes them). With `stats`, also
    the teacher's token statistics at the chunk's rows (teacher/*: what the driver reports from a teacher
    that sends log-probs; None without a hidden-state teacher), for the caller to add to its diagnostics.
    Reads nothing but its arguments, so it may run on another thread (_made_ahead)."""
    sub = batch.rows(sl)
    if sub.teacher_hidden is None:
        return sub, None
    if teacher_head is None:
        raise ValueError("LossBatch.teacher_hidden is set but no teacher head was given: the learner loads the "
                         "teacher's output layer when teacher.full_vocab_transport is hidden_states")
    with torch.no_grad():  # the teacher is a constant (a live self-teacher's head is the student's own)
        logq = _upcast(teacher_head(sub.teacher_hidden), temperature, own=True)
        parts: list[dict[str, torch.Tensor]] = []
        for t in row_tiles(logq):  # in place, tile by tile: the logits become log-probs
            logq[t] = torch.log_softmax(logq[t], -1)
            if stats:
                parts.append(_teacher_token_stats(logq[t], sub.tokens[t]))
        at = logq.gather(-1, sub.tokens[:, None]).squeeze(-1)
    # log q(y_t) as a log-prob teacher sends it, so the diagnostics (sampled_log_ratio) are the same
    sampled = at if sub.teacher_sampled_logprobs is None else sub.teacher_sampled_logprobs
    sub = replace(sub, teacher_full_logprobs=logq, teacher_hidden=None, teacher_sampled_logprobs=sampled)
    return sub, ({k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else None)


def _add_teacher_stats(acc: dict, sub: LossBatch, teacher_stats: Optional[dict[str, torch.Tensor]]) -> None:
    """_chunk_rows' teacher statistics, weighted over the chunk's on-policy rows, into the diagnostics."""
    if teacher_stats is None:
        return
    on_policy = sub.weights if sub.is_reference is None else sub.weights * ~sub.is_reference
    dtype = torch.promote_types(sub.teacher_full_logprobs.dtype, torch.float32)
    _add_diagnostics(acc, teacher_stats, on_policy, dtype)


_T = TypeVar("_T")
_THREAD: tuple[int, Optional[ThreadPoolExecutor]] = (0, None)  # (pid, the teacher-head thread), started on first use


def _made_ahead(make: Callable[[slice], _T], spans: list[slice], ahead: int) -> Iterator[_T]:
    """make(span) for each span, in order; with ahead > 0, made on the teacher-head thread, at most `ahead`
    spans before the caller takes them (each is a [chunk, V] tensor held meanwhile). The same calls in the
    same order with the same torch threads: the results do not depend on `ahead`. A failure in `make`
    is raised where its result is taken. One span is made on the caller's thread: nothing would overlap."""
    global _THREAD
    if ahead <= 0 or len(spans) < 2:
        return (make(sl) for sl in spans)
    pid, thread = _THREAD
    if thread is None or pid != os.getpid():  # first use, or a forked child, which has no copy of the thread
        thread = ThreadPoolExecutor(1, thread_name_prefix="opd-teacher-head")
        _THREAD = (os.getpid(), thread)
    pending = deque(thread.submit(make, sl) for sl in spans[:ahead])  # started now, before the caller's next step

    def results() -> Iterator[_T]:
        for i in range(len(spans)):
            if i + ahead < len(spans):
                pending.append(thread.submit(make, spans[i + ahead]))
            yield pending.popleft().result()
    return results()


class _ChunkedLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, logits, fn, batch, temperature, chunk, diags_out, teacher_head):
        total = torch.zeros((), dtype=torch.promote_types(logits.dtype, torch.float32))
        for sl in _spans(logits.shape[0], chunk):
            sub, teacher_stats = _chunk_rows(batch, sl, teacher_head, temperature, stats=True)
            _add_teacher_stats(diags_out, sub, teacher_stats)
            out = fn(_upcast(logits[sl], temperature), sub)
            total += (out.per_token * sub.weights).sum()
            _add_diagnostics(diags_out, out.diagnostics, sub.weights, total.dtype)
        ctx.save_for_backward(logits)
        ctx.fn, ctx.batch, ctx.temperature, ctx.chunk, ctx.teacher_head = fn, batch, temperature, chunk, teacher_head
        return total

    @staticmethod
    def backward(ctx, grad_total):
        (logits,) = ctx.saved_tensors
        grad = torch.empty_like(logits, memory_format=torch.contiguous_format)
        scale = grad_total / ctx.temperature  # d x / d logits = 1 / temperature
        with diagnostics_off():  # _loss_and_grad turns grad on where it uses autograd
            for sl in _spans(logits.shape[0], ctx.chunk):
                sub, _ = _chunk_rows(ctx.batch, sl, ctx.teacher_head, ctx.temperature)
                _, gx = _loss_and_grad(ctx.fn, _upcast(logits[sl], ctx.temperature), sub, {}, logits.dtype)
                if gx is None:  # the loss does not depend on these logits
                    grad[sl].zero_()
                else:
                    grad[sl].copy_(gx.mul_(scale))
                del gx
        return grad, None, None, None, None, None, None


def _add_diagnostics(acc: dict, diags: dict, weights: torch.Tensor, dtype: torch.dtype) -> None:
    for k, v in diags.items():
        d = (v.detach().to(dtype) * weights).sum()
        acc[k] = acc[k] + d if k in acc else d


def _loss_and_grad(fn: LossFn, x: torch.Tensor, sub: LossBatch, diags_out: dict,
                   dtype: torch.dtype) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(sum_t w_t l_t, its gradient with respect to x, or None where x does not reach it), adding the weighted
    diagnostics to diags_out. A loss with a closed-form gradient (`fn.value_and_grad`) runs tile by tile
    (row_tiles) and writes the gradient over x, which the caller must own; otherwise autograd through fn."""
    closed = getattr(fn, "value_and_grad", None)
    if closed is None:
        x = x.detach().requires_grad_()
        with torch.enable_grad():
            out = fn(x, sub)
            part = (out.per_token * sub.weights).sum()
            gx = torch.autograd.grad(part, x)[0] if part.requires_grad else None
        _add_diagnostics(diags_out, out.diagnostics, sub.weights, dtype)
        return part.detach(), gx
    outs = []
    for t in row_tiles(x) or [slice(0, 0)]:
        out, x[t] = closed(x[t], sub.rows(t))
        outs.append(out)
    per_token = torch.cat([o.per_token for o in outs])
    _add_diagnostics(diags_out, {k: torch.cat([o.diagnostics[k] for o in outs]) for k in outs[0].diagnostics},
                     sub.weights, dtype)
    return (per_token * sub.weights).sum(), x


class _FusedHeadLoss(torch.autograd.Function):
    """loss(head(hidden)) with the gradient computed during forward, chunk by chunk."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, fn, batch, temperature, chunk, diags_out, teacher_head, ahead):
        total = torch.zeros((), dtype=torch.promote_types(hidden.dtype, torch.float32))
        # float32 accumulators whatever the model's dtype: a bf16 sum over chunks would round every chunk
        grad_h = torch.zeros(hidden.shape, dtype=total.dtype, device=hidden.device)
        grad_w = torch.zeros(weight.shape, dtype=total.dtype, device=weight.device)
        grad_b = None if bias is None else torch.zeros(bias.shape, dtype=total.dtype, device=bias.device)
        head = Head(weight, bias)
        spans = _spans(hidden.shape[0], chunk)
        rows = _made_ahead(lambda sl: _chunk_rows(batch, sl, teacher_head, temperature, stats=True), spans, ahead)
        for sl, (sub, teacher_stats) in zip(spans, rows):
            _add_teacher_stats(diags_out, sub, teacher_stats)
            h = hidden[sl]
            x = _upcast(head(h), temperature, own=True)
            part, gx = _loss_and_grad(fn, x, sub, diags_out, total.dtype)
            total += part
            if gx is not None:  # d loss / d logits = gx / temperature
                gx = gx.div_(temperature) if temperature != 1.0 else gx
                grad_h[sl] = gx @ weight.to(gx.dtype)
                grad_w.addmm_(gx.T, h.to(gx.dtype))
                if grad_b is not None:
                    grad_b += gx.sum(0)
            del part, gx, x
        ctx.save_for_backward(grad_h.to(hidden.dtype), grad_w.to(weight.dtype),
                              None if grad_b is None else grad_b.to(bias.dtype))
        return total

    @staticmethod
    def backward(ctx, grad_total):
        grad_h, grad_w, grad_b = ctx.saved_tensors
        scale = lambda g: None if g is None else g * grad_total.to(g.dtype)  # noqa: E731
        return scale(grad_h), scale(grad_w), scale(grad_b), None, None, None, None, None, None, None


def _checked_and_prepared(fn: LossFn, batch: LossBatch, x: torch.Tensor, what: str, shape: str) -> LossBatch:
    """x must be 2-D with one row per LossBatch row; then the loss's `prepare`, if it has one, runs once."""
    if x.dim() != 2 or x.shape[0] != batch.tokens.shape[0]:
        raise ValueError(f"{what} {tuple(x.shape)} must be {shape} with M = {batch.tokens.shape[0]} rows of the LossBatch")
    prepare = getattr(fn, "prepare", None)
    return prepare(batch) if prepare is not None else batch


def compute_loss_from_hidden(fn: LossFn, hidden: torch.Tensor, head: Head, batch: LossBatch,
                             temperature: float = 1.0, chunk_size: Optional[int] = None,
                             teacher_head: Optional[Head] = None,
                             teacher_thread: bool = False) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """compute_loss on logits = head(hidden), without ever holding them: hidden [M, H] (with grad), head
    the student's output layer (its weight may be tied to the embeddings: the gradient flows to it).
    Same value, gradient and diagnostics as compute_loss(fn, head(hidden), ...) up to float rounding.
    teacher_thread: a hidden-state teacher's log-probs are made on a second thread, up to TEACHER_AHEAD
    chunks ahead of the student's (learner.teacher_head_thread); the results are the same bits."""
    batch = _checked_and_prepared(fn, batch, hidden, "compute_loss_from_hidden: hidden", "[M, H]")
    chunk = chunk_size or auto_chunk_rows(head.weight.shape[0], FUSED_CHUNK_BYTES)
    diags: dict[str, torch.Tensor] = {}
    ahead = TEACHER_AHEAD if teacher_thread and batch.teacher_hidden is not None else 0  # else the rows are slices
    total = _FusedHeadLoss.apply(hidden, head.weight, head.bias, fn, batch, float(temperature), int(chunk), diags,
                                 teacher_head, ahead)
    return total, diags


def compute_loss(fn: LossFn, logits: torch.Tensor, batch: LossBatch, temperature: float = 1.0,
                 chunk_size: Optional[int] = None,
                 teacher_head: Optional[Head] = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """logits: [M, V] student logits (any float dtype) at the M positions of `batch`.

    Returns (loss, diagnostics): loss = sum_t w_t * l_t (a scalar with grad, float32 or float64);
    each diagnostic is sum_t w_t * d_t, so summing over micro-batches and ranks gives the global
    token mean. chunk_size: rows per chunk (None: auto_chunk_rows(V)); results do not depend on it."""
    batch = _checked_and_prepared(fn, batch, logits, "compute_loss: logits", "[M, V]")
    chunk = chunk_size or auto_chunk_rows(logits.shape[1])
    diags: dict[str, torch.Tensor] = {}
    total = _ChunkedLoss.apply(logits, fn, batch, float(temperature), int(chunk), diags, teacher_head)
    return total, diags
