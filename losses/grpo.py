"""GRPO / PPO-clip with verifier rewards: group-normalised advantages and the clipped objective."""
from __future__ import annotations

from typing import Optional

import torch

from losses.base import LossBatch, LossOutput, Needs, register
from losses.diagnostics import standard_diagnostics
from losses.policy_gradient import _check_clip, ppo_clip_loss


def group_normalised_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, eps: float = 1e-6,
                                divide_by_std: bool = True) -> torch.Tensor:
    """A_i = (r_i - mean_g r) / (std_g r + eps) over the samples i of each group g (one prompt's
    samples); std is the population std, so a one-sample group gets A = 0. divide_by_std=False
    gives the mean-centred variant (Dr. GRPO). rewards, group_ids: [N] -> [N] float32."""
    r = rewards.double()
    _, inv = torch.unique(group_ids, return_inverse=True)
    n = torch.zeros(int(inv.max()) + 1 if len(inv) else 0, dtype=torch.float64).index_add_(0, inv, torch.ones_like(r))
    mean = torch.zeros_like(n).index_add_(0, inv, r) / n
    centred = r - mean[inv]
    if divide_by_std:
        var = torch.zeros_like(n).index_add_(0, inv, centred**2) / n
        centred = centred / (var.sqrt()[inv] + eps)
    return centred.float()


@register("grpo", needs=lambda **_: Needs(advantages=True, behaviour_logprobs=True))
def grpo(clip_eps: float = 0.2, clip_eps_high: Optional[float] = None):
    """rho_t = exp(log p_theta(y_t) - log p_old(y_t)), A_t = the sequence's group-normalised advantage
    (LossBatch.advantages, see group_normalised_advantages);
    loss_t = -min(rho_t A_t, clip(rho_t, 1-clip_eps, 1+clip_eps_high) A_t)  (clip_eps_high defaults
    to clip_eps; a larger one is DAPO's clip-higher)."""
    _check_clip(clip_eps, clip_eps_high)
    if clip_eps is None:
        raise ValueError("clip_eps=None; grpo needs a positive clip_eps")
    high = clip_eps if clip_eps_high is None else clip_eps_high

    def fn(logits: torch.Tensor, b: LossBatch) -> LossOutput:
        b.require("advantages", "behaviour_logprobs")
        logp_all = torch.log_softmax(logits, -1)
        logp = logp_all.gather(-1, b.tokens[:, None]).squeeze(-1)
        loss, ratio, clipped = ppo_clip_loss(logp, b.behaviour_logprobs, b.advantages, clip_eps, high)
        diags = standard_diagnostics(logp_all, b)
        diags.update(importance_ratio=ratio, clip_fraction=clipped)
        return LossOutput(loss, diags)
    return fn
