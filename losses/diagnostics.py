"""Per-position diagnostics every loss reports where its inputs allow (the paper's evidence).

All return [M] detached tensors. compute_loss turns each into sum_t w_t * d_t, i.e. a token mean.
"""
from __future__ import annotations

import torch

from losses.base import LossBatch, diagnostics_enabled


def entropy(logp: torch.Tensor) -> torch.Tensor:
    """H(p) = -sum_v p(v) log p(v); logp [M, V] -> [M]."""
    return -torch.linalg.vecdot(logp.exp(), logp)


def topk_overlap(student_ids: torch.Tensor, teacher_ids: torch.Tensor) -> torch.Tensor:
    """|S_student ∩ S_teacher| / min(Ks, K); ids [M, Ks], [M, K] -> [M]."""
    hits = (student_ids[:, :, None] == teacher_ids[:, None, :]).any(-1).sum(-1)
    return hits.float() / min(student_ids.shape[1], teacher_ids.shape[1])


def standard_diagnostics(logp: torch.Tensor, b: LossBatch, p: torch.Tensor | None = None,
                         reverse_kl: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """From student log-probs logp [M, V] (at the loss temperature) and whatever the batch holds:

    entropy            H(p), always
    sampled_log_ratio  log p(y_t) - log q(y_t)     when teacher_sampled_logprobs is present
    reverse_kl         exact sum_v p (log p - log q) when teacher_full_logprobs is present
    topk_overlap       student/teacher top-k overlap when both id sets are present

    A loss that has already computed p = exp(logp) or the exact reverse KL passes them, so the
    diagnostics do not redo [M, V] work (at a 32k vocabulary that was a fifth of the learner's loss time).
    """
    if not diagnostics_enabled():
        return {}
    logp = logp.detach()
    p = logp.exp() if p is None else p.detach()
    out = {"entropy": -torch.linalg.vecdot(p, logp)}  # one pass: (p * logp).sum(-1) writes the product first
    if b.teacher_sampled_logprobs is not None:
        out["sampled_log_ratio"] = logp.gather(-1, b.tokens[:, None]).squeeze(-1) - b.teacher_sampled_logprobs
    if reverse_kl is not None:
        out["reverse_kl"] = reverse_kl.detach()
    elif b.teacher_full_logprobs is not None:
        rows = min(logp.shape[-1], b.teacher_full_logprobs.shape[-1])  # padding rows past the tokenizer may differ
        lp, lq = (x if x.shape[-1] == rows else torch.log_softmax(x[:, :rows], -1) for x in (logp, b.teacher_full_logprobs))
        out["reverse_kl"] = (lp.exp() * (lp - lq)).sum(-1) if rows != logp.shape[-1] else (p * (lp - lq)).sum(-1)
    if b.student_topk_ids is not None and b.teacher_topk_ids is not None:
        out["topk_overlap"] = topk_overlap(b.student_topk_ids, b.teacher_topk_ids)
    return out
