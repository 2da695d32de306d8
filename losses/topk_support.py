"""Top-k supports S for the TopK losses: which ids, the teacher's log-probs there, and tail masses.

support = "student": S = the student's top-k ids from the rollout (LossBatch.student_topk_ids),
    with EXACT teacher log-probs at those ids (LossBatch.teacher_at_student_topk). Ids outside the
    teacher's own top-k are therefore never a problem, but only a teacher with capability
    `logprobs_at_any_ids` (an HF teacher) can supply them; a vLLM teacher is rejected up front.
support = "teacher": S = the teacher's own top-k (ids and log-probs), which any teacher can return.
support = "intersection": S = student top-k ∩ teacher top-k, teacher log-probs from the teacher's
    top-k; rows with an empty intersection get loss 0 (counted by the `empty_support` diagnostic).
"""
from __future__ import annotations

import torch

from losses.base import LossBatch, Needs

SUPPORTS = ("student", "teacher", "intersection")


def check_support(support: str, k: int, allowed: tuple[str, ...]) -> None:
    if support not in allowed:
        raise ValueError(f"support={support!r}; choose one of {list(allowed)}")
    if not (isinstance(k, int) and not isinstance(k, bool) and k >= 1):
        raise ValueError(f"k={k!r}; must be a positive integer")


def support_needs(support: str = "teacher", k: int = 64) -> Needs:
    if support == "student":
        return Needs(student_topk=k, teacher_at_student_topk=True, needs_teacher=True)
    if support == "teacher":
        return Needs(teacher_topk=k, needs_teacher=True)
    return Needs(student_topk=k, teacher_topk=k, needs_teacher=True)


def _first_k(t: torch.Tensor, k: int, name: str) -> torch.Tensor:
    if t.shape[1] < k:
        raise ValueError(f"LossBatch.{name} has {t.shape[1]} columns but the loss uses k={k}")
    return t[:, :k]


def topk_support(b: LossBatch, support: str, k: int):
    """-> ids [M, k] long, teacher log q at ids [M, k], mask [M, k] bool (False: not in S)."""
    if support == "student":
        b.require("student_topk_ids", "teacher_at_student_topk")
        ids = _first_k(b.student_topk_ids, k, "student_topk_ids")
        return ids, _first_k(b.teacher_at_student_topk, k, "teacher_at_student_topk"), torch.ones_like(ids, dtype=torch.bool)
    b.require("teacher_topk_ids", "teacher_topk_logprobs")
    ids = _first_k(b.teacher_topk_ids, k, "teacher_topk_ids")
    logq = _first_k(b.teacher_topk_logprobs, k, "teacher_topk_logprobs")
    if support == "teacher":
        return ids, logq, torch.ones_like(ids, dtype=torch.bool)
    b.require("student_topk_ids")
    student = _first_k(b.student_topk_ids, k, "student_topk_ids")
    return ids, logq, (ids[:, :, None] == student[:, None, :]).any(-1)


def log_tail_mass(logits: torch.Tensor, ids: torch.Tensor):
    """log p_tail = log sum_{v not in S} softmax(logits)(v), computed from the logits (no 1 - P(S)
    cancellation). logits [M, V], ids [M, k] -> (log_p_tail [M], empty [M] bool). Where the tail is
    empty (S covers the vocabulary) log_p_tail is a finite placeholder and its gradient is 0."""
    z = logits.scatter(-1, ids, float("-inf"))
    m = z.detach().amax(-1, keepdim=True)
    empty = torch.isinf(m).squeeze(-1)
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)
    s = (z - m).exp().sum(-1)
    s = torch.where(empty, torch.ones_like(s), s)
    return s.log() + m.squeeze(-1) - torch.logsumexp(logits, -1), empty


def teacher_log_tail(logq: torch.Tensor, mask: torch.Tensor, floor: float):
    """q_tail = 1 - Q(S) in float64. Where q_tail < floor (the teacher's top-k holds essentially all
    its mass, or rounding pushed Q(S) past 1) it is raised to `floor`; never silently: returns
    (log max(q_tail, floor) [M], clamped [M] float, 1 where the floor was applied)."""
    q_tail = 1.0 - torch.where(mask, logq.double().exp(), 0.0).sum(-1)
    clamped = q_tail < floor
    return q_tail.clamp_min(floor).log().to(logq.dtype), clamped.float()


def support_diagnostics(logp_s: torch.Tensor, logq: torch.Tensor, mask: torch.Tensor) -> dict:
    """student_mass_on_support P(S), teacher_mass_on_support Q(S); inputs [M, k] -> [M]."""
    zero = torch.zeros((), dtype=logp_s.dtype)
    return {"student_mass_on_support": torch.where(mask, logp_s.detach().exp(), zero).sum(-1),
            "teacher_mass_on_support": torch.where(mask, logq.exp().to(logp_s.dtype), zero).sum(-1)}
