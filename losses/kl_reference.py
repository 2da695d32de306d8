"""A KL-to-reference penalty added to any loss (loss.kl_to_reference): slime's --use-kl-loss
--kl-loss-coef --kl-loss-type, as the paper's OPSD scripts use it.

Per on-policy token, with log p = log p_theta(y_t) and log r = log p_ref(y_t) of a FROZEN reference
model (both at the loss temperature) and d = log p - log r:

    k1          d
    k2          d^2 / 2
    k3          exp(-d) - 1 + d           (Schulman's non-negative estimator)
    low_var_kl  k3 clamped to [-10, 10]   (the clamp also stops its gradient where it bites)

loss_t = base_t + coef * estimator_t on on-policy rows (reference rows of an SFT mix get no penalty),
reduced like the base loss. Each is back-propagated DIRECTLY, so, on-policy (y ~ p):
    k1: E[grad] = E[grad log p] = 0: ZERO expected gradient (it only adds noise; slime's default);
    k2: E[grad] = grad KL(p || p_ref): the reverse KL's gradient;
    k3 / low_var_kl: E[grad] = E[(1 - r/p) grad log p] = grad KL(p_ref || p): the FORWARD KL's gradient.
The diagnostic `kl_to_reference` is the estimator's token mean (logged as train/kl_to_reference).
"""
from __future__ import annotations

from dataclasses import replace

import torch

from losses.base import LossBatch, LossFn, LossOutput, Needs, diagnostics_enabled

ESTIMATORS = ("k1", "k2", "k3", "low_var_kl")


def kl_estimator(logp: torch.Tensor, logp_ref: torch.Tensor, estimator: str) -> torch.Tensor:
    """[M], [M] -> [M] per-token estimator value (with gradient through logp)."""
    d = logp - logp_ref
    if estimator == "k1":
        return d
    if estimator == "k2":
        return d.square() / 2
    k3 = torch.expm1(-d) + d
    return k3.clamp(-10.0, 10.0) if estimator == "low_var_kl" else k3


def check_kl_to_reference(coef, estimator) -> None:
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or coef < 0:
        raise ValueError(f"loss.kl_to_reference.coef: {coef!r}; must be a number >= 0 (0: off)")
    if estimator not in ESTIMATORS:
        raise ValueError(f"loss.kl_to_reference.estimator: {estimator!r} is not one of {list(ESTIMATORS)}")


def with_kl_to_reference(fn: LossFn, coef: float, estimator: str) -> LossFn:
    """fn plus coef * estimator on on-policy rows (see the module docstring). A `prepare` carries over."""
    check_kl_to_reference(coef, estimator)

    def wrapped(logits: torch.Tensor, b: LossBatch) -> LossOutput:
        b.require("frozen_reference_logprobs")
        out = fn(logits, b)
        logp = torch.log_softmax(logits, -1).gather(-1, b.tokens[:, None]).squeeze(-1)
        kl = kl_estimator(logp, b.frozen_reference_logprobs.to(logp.dtype), estimator)
        if b.is_reference is not None:
            kl = torch.where(b.is_reference, torch.zeros_like(kl), kl)
        diags = {**out.diagnostics, "kl_to_reference": kl.detach()} if diagnostics_enabled() else out.diagnostics
        return LossOutput(out.per_token + coef * kl, diags)

    if hasattr(fn, "prepare"):
        wrapped.prepare = fn.prepare
    return wrapped


def kl_needs(needs: Needs) -> Needs:
    return replace(needs, frozen_reference_logprobs=True)
