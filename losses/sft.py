"""Supervised negative log-likelihood on reference or teacher-written tokens."""
from __future__ import annotations

import torch

from losses.base import LossBatch, LossOutput, Needs, register
from losses.diagnostics import standard_diagnostics


@register("sft", needs=lambda **_: Needs(reference_rows=True))
def sft():
    """loss_t = -log p_theta(y*_t) on rows with is_reference True (every row when is_reference is
    None), 0 on other rows. Mixed with distillation through weighted_sum (the SFT-stabilised student)."""
    def fn(logits: torch.Tensor, b: LossBatch) -> LossOutput:
        logp_all = torch.log_softmax(logits, -1)
        nll = -logp_all.gather(-1, b.tokens[:, None]).squeeze(-1)
        if b.is_reference is not None:
            nll = torch.where(b.is_reference, nll, torch.zeros_like(nll))
        diags = standard_diagnostics(logp_all, b)
        if diags:
            diags["nll"] = nll.detach()
        return LossOutput(nll, diags)
    return fn
