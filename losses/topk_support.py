"""Top-k supports S for the TopK losses: which ids, the teacher's log-probs there, and tail masses.

support = "student": S = the student's top-k ids from the rollout (LossBatch.student_topk_ids),
    with EXACT teacher log-probs at those ids (LossBatch.teacher_at_student_topk). Ids outside the
    teacher's own top-k are therefore never a problem, but only a teacher with capability
    `logprobs_at_any_ids` (an HF teacher) can supply them; a vLLM teacher is rejected up front.
support = "student_masked": S = the student's top-k ids from the rollout, as "student", but with the
    teacher's values taken from its OWN top-`teacher_k` (default k), which any teacher can return (the
    paper's released code, slime's topk_reverse_kl_notail(_sg) with an SGLang teacher). An id of S the
    teacher's top-`teacher_k` lacks gets log q := the student's ROLLOUT log-prob at that id
    (LossBatch.student_topk_logprobs, the behaviour log-prob), so its term is
    p(v) (log p(v) - log p_old(v)): 0 in value while the policy is the rollout's. In gradient, T2's
    p(v) (sg[log p(v)] - log p_old(v)) gives (log p(v) - log p_old(v)) grad p(v), also 0 there (the id is
    masked); T1's p(v) (log p(v) - log p_old(v)) gives (log p(v) - log p_old(v) + 1) grad p(v), i.e.
    grad p(v): T1 keeps pushing mass off a masked id. Diagnostics: student_mass_on_support over all of
    S, teacher_mass_on_support over the ids the teacher returned, teacher_topk_hit_fraction = |found| / k.
support = "teacher": S = the teacher's own top-k (ids and log-probs), which any teacher can return.
support = "intersection": S = student top-k ∩ teacher top-k, teacher log-probs from the teacher's
    top-k; rows with an empty intersection get loss 0 (counted by the `empty_support` diagnostic).
"""
from __future__ import annotations

import torch

from losses.base import LossBatch, Needs

SUPPORTS = ("student", "student_masked", "teacher", "intersection")


def _positive_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 1


def check_support(support: str, k: int, allowed: tuple[str, ...], teacher_k=None) -> None:
    if support not in allowed:
        raise ValueError(f"support={support!r}; choose one of {list(allowed)}")
    if not _positive_int(k):
        raise ValueError(f"k={k!r}; must be a positive integer")
    if teacher_k is not None and support != "student_masked":
        raise ValueError(f"teacher_k={teacher_k!r} is read only with support: student_masked (remove it)")
    if teacher_k is not None and not (_positive_int(teacher_k) and teacher_k >= k):
        raise ValueError(f"teacher_k={teacher_k!r}; must be an integer >= k ({k}): the teacher top-k the "
                         "student's ids are looked up in")


def support_needs(support: str = "teacher", k: int = 64, teacher_k=None) -> Needs:
    if support == "student":
        return Needs(student_topk=k, teacher_at_student_topk=True, needs_teacher=True)
    if support == "student_masked":
        return Needs(student_topk=k, teacher_topk=teacher_k or k, needs_teacher=True)
    if support == "teacher":
        return Needs(teacher_topk=k, needs_teacher=True)
    return Needs(student_topk=k, teacher_topk=k, needs_teacher=True)


def _first_k(t: torch.Tensor, k: int, name: str) -> torch.Tensor:
    if t.shape[1] < k:
        raise ValueError(f"LossBatch.{name} has {t.shape[1]} columns but the loss uses k={k}")
    return t[:, :k]


def topk_support(b: LossBatch, support: str, k: int, teacher_k=None):
    """-> ids [M, k] long, teacher log q at ids [M, k], mask [M, k] bool (False: not in S; for
    student_masked: the teacher's top-k lacks the id, whose log q is then the student's rollout log-prob)."""
    if support == "student_masked":
        return _student_masked(b, k, teacher_k or k)
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


def _student_masked(b: LossBatch, k: int, teacher_k: int):
    b.require("student_topk_ids", "student_topk_logprobs", "teacher_topk_ids", "teacher_topk_logprobs")
    ids = _first_k(b.student_topk_ids, k, "student_topk_ids")
    t_ids = _first_k(b.teacher_topk_ids, teacher_k, "teacher_topk_ids")
    t_lp = _first_k(b.teacher_topk_logprobs, teacher_k, "teacher_topk_logprobs")
    match = ids[:, :, None] == t_ids[:, None, :]                                   # [M, k, teacher_k]
    found = match.any(-1)                                                          # [M, k]
    # teacher top-k ids are distinct, so at most one match per id: the sum picks it
    at = torch.where(match, t_lp[:, None, :], torch.zeros((), dtype=t_lp.dtype)).sum(-1)
    fill = _first_k(b.student_topk_logprobs, k, "student_topk_logprobs").to(t_lp.dtype)
    return ids, torch.where(found, at, fill), found


def masked_support_diagnostics(logp_s: torch.Tensor, logq: torch.Tensor, found: torch.Tensor) -> dict:
    """student_masked: P(S) over all of S, Q over the ids the teacher returned, and the fraction of S it
    returned; inputs [M, k] -> [M]."""
    zero = torch.zeros((), dtype=logp_s.dtype)
    return {"student_mass_on_support": logp_s.detach().exp().sum(-1),
            "teacher_mass_on_support": torch.where(found, logq.exp().to(logp_s.dtype), zero).sum(-1),
            "teacher_topk_hit_fraction": found.to(logp_s.dtype).mean(-1)}


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
