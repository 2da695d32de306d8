"""Sampled-token reverse KL as a policy-gradient advantage (the Thinking Machines / tinker recipe)."""
from __future__ import annotations

import torch

from losses.base import LossBatch, LossOutput, Needs, register


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


@register("sampled_token_rkl", needs=lambda **_: Needs(teacher_sampled=True, behaviour_logprobs=True,
                                                       needs_teacher=True))
def sampled_token_rkl(coef: float = 1.0, clip_eps: float | None = None):
    """A_t = -coef * sg[log p_old(y_t) - log q(y_t)];  loss_t = -rho_t * A_t,
    rho_t = exp(log p_theta(y_t) - log p_old(y_t))  (PPO-clipped with clip_eps when set).

    On-policy, E[grad] = -grad KL(p||q) per position: an unbiased reverse-KL gradient."""
    def fn(logits: torch.Tensor, b: LossBatch) -> LossOutput:
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, b.tokens[:, None]).squeeze(-1)
        log_ratio_teacher = b.behaviour_logprobs - b.teacher_sampled_logprobs
        adv = -coef * log_ratio_teacher
        ratio = torch.exp(logp - b.behaviour_logprobs)
        loss = -ratio * adv
        if clip_eps is not None:
            loss = torch.maximum(loss, -ratio.clamp(1 - clip_eps, 1 + clip_eps) * adv)
        return LossOutput(loss, {"sampled_log_ratio": log_ratio_teacher,
                                 "entropy": _entropy(logp_all.detach())})
    return fn
