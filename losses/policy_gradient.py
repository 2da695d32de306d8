"""Sampled-token reverse KL as a policy-gradient advantage (the Thinking Machines / tinker recipe),
and, named for what it is, the direct back-propagation of the sampled log-ratio."""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from losses.base import LossBatch, LossOutput, Needs, register
from losses.diagnostics import standard_diagnostics


def ppo_clip_loss(logp: torch.Tensor, behaviour: torch.Tensor, adv: torch.Tensor,
                  eps_low: Optional[float], eps_high: Optional[float]):
    """rho = exp(logp - behaviour); loss = -rho*A, or max(-rho*A, -clip(rho, 1-eps_low, 1+eps_high)*A).

    All [M]. Returns (loss, rho detached, clipped [M] float: 1 where the clipped branch is active)."""
    ratio = torch.exp(logp - behaviour)
    loss = -ratio * adv
    clipped = torch.zeros_like(loss)
    if eps_low is not None:
        clipped_loss = -ratio.clamp(1 - eps_low, 1 + eps_high) * adv
        clipped = (clipped_loss > loss).float()
        loss = torch.maximum(loss, clipped_loss)
    return loss, ratio.detach(), clipped.detach()


def discounted_sum(rewards: torch.Tensor, seq_ids: torch.Tensor, gamma: float) -> torch.Tensor:
    """A_t = sum_{s>=t, same sequence} gamma^(s-t) r_s; rows of a sequence contiguous, in time order.

    rewards, seq_ids: [M] -> [M] (float64 accumulation, returned in rewards' dtype)."""
    r, ids = rewards.detach().double().tolist(), seq_ids.tolist()
    out, acc = [0.0] * len(r), 0.0
    for i in range(len(r) - 1, -1, -1):
        if i == len(r) - 1 or ids[i] != ids[i + 1]:
            acc = 0.0
        acc = r[i] + gamma * acc
        out[i] = acc
    return torch.tensor(out, dtype=rewards.dtype)


def _check_clip(clip_eps, clip_eps_high=None):
    for name, v in (("clip_eps", clip_eps), ("clip_eps_high", clip_eps_high)):
        if v is not None and not (isinstance(v, (int, float)) and v > 0):
            raise ValueError(f"{name}={v!r}; must be a positive number or null")


def _rkl_needs(gamma: float = 0.0, **_) -> Needs:
    return Needs(teacher_sampled=True, behaviour_logprobs=True, needs_teacher=True, sequence_ids=gamma > 0)


@register("sampled_token_rkl", needs=_rkl_needs)
def sampled_token_rkl(coef: float = 1.0, clip_eps: Optional[float] = None, gamma: float = 0.0):
    """r_t = -coef * sg[log p_old(y_t) - log q(y_t)];  A_t = sum_{s>=t} gamma^(s-t) r_s within the
    sequence (gamma=0: A_t = r_t);  rho_t = exp(log p_theta(y_t) - log p_old(y_t));
    loss_t = -rho_t * A_t, or PPO-clipped max(-rho_t A_t, -clip(rho_t, 1±clip_eps) A_t).

    On-policy with gamma=0, E[grad] = grad KL(p||q) per position (descending it lowers the reverse
    KL): an unbiased reverse-KL gradient. gamma>0 also credits later tokens' KL (sequence-level
    reverse KL) and needs LossBatch.seq_ids over whole sequences."""
    _check_clip(clip_eps)
    if not (isinstance(gamma, (int, float)) and 0.0 <= gamma <= 1.0):
        raise ValueError(f"gamma={gamma!r}; must be in [0, 1]")
    key = f"sampled_token_rkl/advantage(coef={coef},gamma={gamma})"

    def reward(b: LossBatch) -> torch.Tensor:
        return -coef * (b.behaviour_logprobs - b.teacher_sampled_logprobs)

    def prepare(b: LossBatch) -> LossBatch:
        b.require("seq_ids", "behaviour_logprobs", "teacher_sampled_logprobs")
        r = torch.where(b.weights != 0, reward(b), torch.zeros_like(b.behaviour_logprobs))  # padding: no reward
        return replace(b, extras={**b.extras, key: discounted_sum(r, b.seq_ids, gamma)})

    def fn(logits: torch.Tensor, b: LossBatch) -> LossOutput:
        b.require("behaviour_logprobs", "teacher_sampled_logprobs")
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, b.tokens[:, None]).squeeze(-1)
        adv = b.extras[key] if gamma > 0 else reward(b)
        loss, ratio, clipped = ppo_clip_loss(logp, b.behaviour_logprobs, adv, clip_eps, clip_eps)
        diags = standard_diagnostics(logp_all, b)
        diags.update(importance_ratio=ratio, clip_fraction=clipped, advantage=adv.detach())
        return LossOutput(loss, diags)

    if gamma > 0:
        fn.prepare = prepare
    return fn


@register("sampled_log_ratio_direct_zero_grad",
          needs=lambda **_: Needs(teacher_sampled=True, needs_teacher=True))
def sampled_log_ratio_direct_zero_grad(coef: float = 1.0):
    """loss_t = coef * (log p_theta(y_t) - log q(y_t)), back-propagated directly. A PITFALL, kept to
    demonstrate it: its value estimates KL(p||q) but E_{y~p}[grad log p(y)] = 0, so the expected
    gradient is ZERO and the teacher never enters it. Never a default; do not train with it."""
    def fn(logits: torch.Tensor, b: LossBatch) -> LossOutput:
        b.require("teacher_sampled_logprobs")
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, b.tokens[:, None]).squeeze(-1)
        return LossOutput(coef * (logp - b.teacher_sampled_logprobs), standard_diagnostics(logp_all, b))
    return fn
