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


def pipeline_unit(cfg: ExperimentConfig) -> int:
    """The rows a pipelined step's chunks are made of (rollout.pipeline_chunks): one micro-batch on every
    learner rank (one row per rank with learner.max_tokens_per_micro_batch), so each chunk is whole
    micro-batches and the step's accumulation boundary falls at its last chunk's last micro-batch."""
    lc = cfg.learner
    return lc.num_ranks * (lc.micro_batch_size if lc.max_tokens_per_micro_batch is None else 1)


def chunk_bounds(cfg: ExperimentConfig, rows: int) -> list[slice]:
    """The step's rows in rollout.pipeline_chunks runs, in order, of near-equal numbers of whole units."""
    unit, c = pipeline_unit(cfg), cfg.rollout.pipeline_chunks
    units = rows // unit
    bounds = [round(k * units / c) * unit for k in range(c + 1)]
    bounds[-1] = rows
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]
