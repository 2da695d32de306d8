"""Distillation losses: a registry of small per-token functions (see losses/base.py)."""
from losses.base import REGISTRY, LossBatch, LossOutput, LossSpec, Needs, register
from losses import policy_gradient, full_vocab  # noqa: F401  (registers)
from losses.build import Loss, build_loss

__all__ = ["REGISTRY", "Loss", "LossBatch", "LossOutput", "LossSpec", "Needs", "build_loss", "register"]
