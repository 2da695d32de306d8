"""TopK divergences on a support S (losses/topk_support.py): T1, T2, T4, T5 and forward KL on the
teacher's top-k. p = student softmax at the loss temperature, q = teacher (same temperature),
P(S) = sum_{v in S} p(v), Q(S) likewise. Every loss takes `k` (uses the first k columns) and most
take `support`."""
from __future__ import annotations

import torch

from losses.base import LossBatch, LossOutput, diagnostics_enabled, register
from losses.diagnostics import standard_diagnostics
from losses.topk_support import (check_support, log_tail_mass, masked_support_diagnostics, support_diagnostics,
                                 support_needs, teacher_log_tail, topk_support)

# T1 and T2 also take the paper's masked student support (losses/topk_support.py)
_T1_T2_SUPPORTS = ("student", "student_masked", "teacher")


def _student_on_support(logits: torch.Tensor, b: LossBatch, support: str, k: int, teacher_k=None):
    logp = torch.log_softmax(logits, -1)
    ids, logq, mask = topk_support(b, support, k, teacher_k)
    logq = logq.to(logits.dtype)
    diags = standard_diagnostics(logp, b)
    return logp, ids, logp.gather(-1, ids), logq, mask, diags


def _on_support_diagnostics(support: str, lp, lq, mask) -> dict:
    if not diagnostics_enabled():
        return {}
    return (masked_support_diagnostics if support == "student_masked" else support_diagnostics)(lp, lq, mask)


def _t1_t2_needs(support="teacher", k=64, teacher_k=None, **_):
    return support_needs(support, k, teacher_k)


@register("topk_reverse_kl_biased", needs=_t1_t2_needs)
def topk_reverse_kl_biased(k: int = 64, support: str = "teacher", teacher_k=None):
    """T1: loss_t = sum_{v in S} p(v) (log p(v) - log q(v)), gradient through everything.

    grad T1 = grad T2 + grad P(S): descent always shrinks P(S), mass leaks to the tail and the loss
    can go negative. Kept on purpose: the paper's failure mechanism 2.
    support: student | student_masked | teacher. student_masked (the paper's T1 runs): S = the
    student's top-k, log q from the teacher's own top-teacher_k (default k), an id it lacks filled with
    the student's rollout log-prob log p_old(v): value p(v)(log p(v) - log p_old(v)), gradient
    (log p(v) - log p_old(v) + 1) grad p(v) (= grad p(v) on-policy: T1 still drains a masked id)."""
    check_support(support, k, _T1_T2_SUPPORTS, teacher_k)

    def fn(logits: torch.Tensor, b: LossBatch) -> LossOutput:
        _, _, lp, lq, mask, diags = _student_on_support(logits, b, support, k, teacher_k)
        loss = (lp.exp() * (lp - lq)).sum(-1)
        return LossOutput(loss, {**diags, **_on_support_diagnostics(support, lp, lq, mask)})
    return fn


@register("topk_reverse_kl_sg", needs=_t1_t2_needs)
def topk_reverse_kl_sg(k: int = 64, support: str = "teacher", teacher_k=None):
    """T2: loss_t = sum_{v in S} p(v) (sg[log p(v)] - log q(v)).

    grad = sum_{v in S} (log p(v) - log q(v)) grad p(v): the full-vocabulary reverse-KL gradient
    restricted to S (equal to it when S is the vocabulary); fixed point p = q on S. The paper's fix.
    support: student | student_masked | teacher. student_masked (the paper's T2 runs): S = the
    student's top-k, log q from the teacher's own top-teacher_k (default k), an id it lacks filled with
    the student's rollout log-prob log p_old(v): its gradient (log p(v) - log p_old(v)) grad p(v) is 0
    on-policy, so the id is masked."""
    check_support(support, k, _T1_T2_SUPPORTS, teacher_k)

    def fn(logits: torch.Tensor, b: LossBatch) -> LossOutput:
        _, _, lp, lq, mask, diags = _student_on_support(logits, b, support, k, teacher_k)
        loss = (lp.exp() * (lp.detach() - lq)).sum(-1)
        return LossOutput(loss, {**diags, **_on_support_diagnostics(support, lp, lq, mask)})
    return fn


@register("topk_reverse_kl_renorm", needs=lambda support="teacher", k=64, **_: support_needs(support, k))
def topk_reverse_kl_renorm(k: int = 64, support: str = "teacher"):
    """T4: loss_t = KL(p~||q~) = sum_{v in S} p~(v) (log p~(v) - log q~(v)), p~ = p/P(S), q~ = q/Q(S).

    Matches the shape inside S only; identically 0 at k=1. support may be "intersection"
    (student top-k ∩ teacher top-k); rows with an empty intersection get 0 (`empty_support`)."""
    check_support(support, k, ("student", "teacher", "intersection"))

    def fn(logits: torch.Tensor, b: LossBatch) -> LossOutput:
        _, _, lp, lq, mask, diags = _student_on_support(logits, b, support, k)
        nonempty = mask.any(-1)
        full = mask | ~nonempty[:, None]  # empty rows: compute on all k (finite), then zeroed
        ninf = torch.tensor(float("-inf"), dtype=lp.dtype)
        lpn = lp - torch.logsumexp(torch.where(full, lp, ninf), -1, keepdim=True)
        lqn = lq - torch.logsumexp(torch.where(full, lq, ninf), -1, keepdim=True)
        terms = torch.where(full, lpn.exp() * (lpn - lqn), torch.zeros_like(lpn))
        loss = torch.where(nonempty, terms.sum(-1), torch.zeros_like(lp[:, 0]))
        diags = {**diags, **support_diagnostics(lp, lq, mask)}
        if support == "intersection":
            diags["empty_support"] = (~nonempty).to(lp.dtype)
        return LossOutput(loss, diags)
    return fn


def _check_floor(floor) -> None:
    if not (isinstance(floor, float) and 0.0 < floor < 1.0):
        raise ValueError(f"teacher_tail_floor={floor!r}; must be a float in (0, 1)")


@register("topk_reverse_kl_tail", needs=lambda support="teacher", k=64, **_: support_needs(support, k))
def topk_reverse_kl_tail(k: int = 64, support: str = "teacher", teacher_tail_floor: float = 1e-6):
    """T5: loss_t = sum_{v in S} p log(p/q) + p_tail log(p_tail/q_tail), p_tail = 1-P(S), q_tail = 1-Q(S):
    a proper KL on k+1 categories. p_tail comes from the logits (exact); a teacher tail below
    teacher_tail_floor is raised to it and counted in `teacher_tail_clamped` (never silently)."""
    check_support(support, k, ("student", "teacher"))
    _check_floor(teacher_tail_floor)

    def fn(logits: torch.Tensor, b: LossBatch) -> LossOutput:
        _, ids, lp, lq, mask, diags = _student_on_support(logits, b, support, k)
        log_p_tail, empty = log_tail_mass(logits, ids)
        log_q_tail, clamped = teacher_log_tail(lq, mask, teacher_tail_floor)
        tail = torch.where(empty, torch.zeros_like(log_p_tail), log_p_tail.exp() * (log_p_tail - log_q_tail))
        loss = (lp.exp() * (lp - lq)).sum(-1) + tail
        return LossOutput(loss, {**diags, **support_diagnostics(lp, lq, mask), "teacher_tail_clamped": clamped})
    return fn


@register("topk_forward_kl", needs=lambda k=64, **_: support_needs("teacher", k))
def topk_forward_kl(k: int = 64, tail: bool = False, teacher_tail_floor: float = 1e-6):
    """loss_t = sum_{v in S_T} q(v) (log q(v) - log p(v))  [+ q_tail log(q_tail/p_tail) if tail],
    S_T = the teacher's top-k (verl / NeMo-RL style). With tail, a teacher tail below
    teacher_tail_floor is raised to it and counted in `teacher_tail_clamped` (never silently);
    where S_T covers the vocabulary the tail term is 0."""
    check_support("teacher", k, ("teacher",))
    _check_floor(teacher_tail_floor)
    if not isinstance(tail, bool):
        raise ValueError(f"tail={tail!r}; must be true or false")

    def fn(logits: torch.Tensor, b: LossBatch) -> LossOutput:
        _, ids, lp, lq, mask, diags = _student_on_support(logits, b, "teacher", k)
        loss = (lq.exp() * (lq - lp)).sum(-1)
        diags = {**diags, **support_diagnostics(lp, lq, mask)}
        if tail:
            log_p_tail, empty = log_tail_mass(logits, ids)
            log_q_tail, clamped = teacher_log_tail(lq, mask, teacher_tail_floor)
            t = log_q_tail.exp() * (log_q_tail - log_p_tail)
            loss = loss + torch.where(empty, torch.zeros_like(t), t)
            diags["teacher_tail_clamped"] = clamped
        return LossOutput(loss, diags)
    return fn
