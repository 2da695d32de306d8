"""Values computed from a manifest: the rows of a step, the rollouts' sampling, and `resolve`, which
writes into a validated manifest the canonical forms and the `auto`s that the checks accepted."""
from __future__ import annotations

from launch.capabilities import auto_transport, build_configured_loss
from launch.config import ExperimentConfig
from launch.routing import teacher_specs
from opd.contracts import SamplingSpec


def resolve(cfg: ExperimentConfig) -> None:
    """learner.fused_head as a string (YAML reads true/false as booleans), run.resume as true / false /
    "auto", and each teacher's full_vocab_transport: auto resolved (launch/capabilities.py:auto_transport;
    it stays auto while the teacher's folder does not exist yet, and the run resolves it when it starts).
    Call it after launch/validation.py:validate, which accepts only values this can resolve."""
    cfg.learner.fused_head = str(cfg.learner.fused_head).lower()
    if isinstance(cfg.run.resume, str):
        value = cfg.run.resume.lower()
        cfg.run.resume = {"true": True, "false": False}.get(value, value)
    needs = build_configured_loss(cfg).needs
    for spec in teacher_specs(cfg):
        if spec.config.full_vocab_transport == "auto":
            spec.config.full_vocab_transport = auto_transport(cfg, needs, spec.config)


def reference_rows(cfg: ExperimentConfig) -> int:
    """Reference rows an OPD step adds for an SFT component of its loss (one per prompt), else 0."""
    if cfg.algorithm != "opd":
        return 0
    try:
        return cfg.rollout.prompts_per_step if build_configured_loss(cfg).needs.reference_rows else 0
    except ValueError:  # a bad loss is check_loss's to report
        return 0


def rows_per_step(cfg: ExperimentConfig) -> int:
    """Rows of one step's TrainBatch: SFT rows, or samples (plus reference rows for an SFT mix)."""
    if cfg.algorithm == "sft":
        return cfg.rollout.prompts_per_step
    return cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt + reference_rows(cfg)


def sampling_spec(cfg: ExperimentConfig, return_topk: int = 0):
    """The training rollouts' SamplingSpec."""
    rc = cfg.rollout
    return SamplingSpec(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p,
                        return_topk=return_topk)
