"""Distillation losses: a registry of small per-token functions (see losses/base.py)."""
from losses.base import REGISTRY, LossBatch, LossOutput, LossSpec, Needs, register
from losses import full_vocab, grpo, policy_gradient, sft, topk, weighted_sum  # noqa: F401  (registers)
from losses.build import Loss, build_loss, check_teacher
from losses.grpo import group_normalised_advantages

__all__ = ["REGISTRY", "Loss", "LossBatch", "LossOutput", "LossSpec", "Needs", "build_loss", "check_teacher",
           "group_normalised_advantages", "register"]
