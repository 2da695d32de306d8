"""Full-vocabulary divergences against a co-located teacher's whole distribution."""
from __future__ import annotations

import torch

from losses.base import LossBatch, LossOutput, Needs, register
from losses.policy_gradient import _entropy


@register("full_reverse_kl", needs=lambda **_: Needs(teacher_full=True, needs_teacher=True))
def full_reverse_kl():
    """loss_t = sum_v p(v) (log p(v) - log q(v)): exact reverse KL(p||q) at each position."""
    def fn(logits: torch.Tensor, b: LossBatch) -> LossOutput:
        logp = torch.log_softmax(logits, -1)
        kl = (logp.exp() * (logp - b.teacher_full_logprobs)).sum(-1)
        return LossOutput(kl, {"reverse_kl": kl.detach(), "entropy": _entropy(logp.detach())})
    return fn
