"""Full-vocabulary divergences against a co-located teacher's whole distribution q [M, V].

Teacher log-probs arrive at the loss temperature (the teacher applies it to its own logits).
Entries with q(v) = 0 (log q = -inf) contribute 0 to q log q terms, by the limit 0 log 0 = 0.

Student and teacher may have different embedding row counts over one tokenizer (Qwen3 pads its ids to
151,936 rows; a sibling may pad to 152,064): the rows past the tokenizer are padding. Then both
distributions are taken over the rows both have, each renormalised there (log_softmax of the common
rows), so p and q are distributions over one support; with equal sizes nothing changes."""
from __future__ import annotations

import math

import torch

from losses.base import LossBatch, LossOutput, Needs, register
from losses.diagnostics import standard_diagnostics

_FULL = Needs(teacher_full=True, needs_teacher=True)


def _q_log_q_minus(logq: torch.Tensor, other: torch.Tensor) -> torch.Tensor:
    """sum_v q(v) (log q(v) - other(v)), with 0 where q(v) = 0; [M, V] -> [M]."""
    q = logq.exp()
    return torch.where(q > 0, q * (logq - other), torch.zeros_like(other)).sum(-1)


def _student_and_teacher(b: LossBatch, logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p, log q), each [M, V] over the rows both sides have."""
    b.require("teacher_full_logprobs")
    logq = b.teacher_full_logprobs.to(logits.dtype)
    rows = min(logits.shape[-1], logq.shape[-1])
    if logq.shape[-1] != rows:
        logq = torch.log_softmax(logq[:, :rows], -1)
    return torch.log_softmax(logits[:, :rows], -1), logq


def _reverse_kl(b: LossBatch, logits: torch.Tensor) -> tuple[LossOutput, torch.Tensor, torch.Tensor]:
    """(output, p, log p - log q): the exact reverse KL per position and what its gradient is made of."""
    logp, logq = _student_and_teacher(b, logits)
    p = logp.exp()
    diff = logp - logq
    kl = torch.linalg.vecdot(p, diff)
    return LossOutput(kl, standard_diagnostics(logp, b, p=p, reverse_kl=kl)), p, diff


@register("full_reverse_kl", needs=lambda **_: _FULL)
def full_reverse_kl():
    """loss_t = sum_v p(v) (log p(v) - log q(v)): exact reverse KL(p||q) at each position."""
    def fn(logits: torch.Tensor, b: LossBatch) -> LossOutput:
        return _reverse_kl(b, logits)[0]

    def value_and_grad(logits: torch.Tensor, b: LossBatch) -> tuple[LossOutput, torch.Tensor]:
        """fn's output and d(sum_t w_t kl_t)/d logits in closed form, w_t p_j (log p_j - log q_j - kl_t),
        instead of autograd through log_softmax: a third of the [M, V] passes. compute_loss runs it tile by tile
        (losses/reduce.py: row_tiles)."""
        with torch.no_grad():
            out, p, diff = _reverse_kl(b, logits)
            grad = diff.sub_(out.per_token[:, None]).mul_(p).mul_(b.weights.to(p.dtype)[:, None])
            if grad.shape[-1] != logits.shape[-1]:  # padding rows past the common ones get no gradient
                grad = torch.cat([grad, grad.new_zeros(grad.shape[0], logits.shape[-1] - grad.shape[-1])], -1)
        return out, grad

    fn.value_and_grad = value_and_grad  # type: ignore[attr-defined]
    return fn


@register("full_forward_kl", needs=lambda **_: _FULL)
def full_forward_kl():
    """loss_t = sum_v q(v) (log q(v) - log p(v)): exact forward KL(q||p) (soft cross-entropy minus H(q))."""
    def fn(logits: torch.Tensor, b: LossBatch) -> LossOutput:
        logp, logq = _student_and_teacher(b, logits)
        kl = _q_log_q_minus(logq, logp)
        diags = standard_diagnostics(logp, b)
        if diags:
            diags["forward_kl"] = kl.detach()
        return LossOutput(kl, diags)
    return fn


def _jsd_needs(beta: float = 0.5, **_) -> Needs:
    return _FULL


@register("generalized_jsd", needs=_jsd_needs)
def generalized_jsd(beta: float = 0.5):
    """m = beta q + (1-beta) p;  loss_t = beta KL(q||m) + (1-beta) KL(p||m)  (GKD, TRL convention):
    beta = 0 is DEFINED as forward KL(q||p) and beta = 1 as reverse KL(p||q), since the interior
    expression tends to 0 at both ends."""
    if not (isinstance(beta, (int, float)) and 0.0 <= beta <= 1.0):
        raise ValueError(f"beta={beta!r}; must be in [0, 1]")
    if beta == 0.0:
        return full_forward_kl()
    if beta == 1.0:
        return full_reverse_kl()

    def fn(logits: torch.Tensor, b: LossBatch) -> LossOutput:
        logp, logq = _student_and_teacher(b, logits)
        p = logp.exp()
        logm = torch.logaddexp(logq + math.log(beta), logp + math.log(1 - beta))
        kl_teacher = _q_log_q_minus(logq, logm)
        kl_student = (p * (logp - logm)).sum(-1)
        loss = beta * kl_teacher + (1 - beta) * kl_student
        return LossOutput(loss, standard_diagnostics(logp, b, p=p))
    return fn
