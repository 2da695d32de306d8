"""Values computed from a manifest: the rows of a step, the rollouts' sampling, and `resolve`, which
writes into a validated manifest the canonical forms and the `auto`s that the checks accepted."""
from __future__ import annotations

import os
from typing import Optional

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
    cfg.learner.teacher_head_thread = str(cfg.learner.teacher_head_thread).lower()
    if isinstance(cfg.run.resume, str):
        value = cfg.run.resume.lower()
        cfg.run.resume = {"true": True, "false": False}.get(value, value)
    if cfg.cluster.threads_per_actor == "auto" and cfg.cluster.mode == "local":  # ray mode: Setup, from the nodes
        cfg.cluster.threads_per_actor = threads_per_actor(cfg)
    if cfg.cluster.mode == "local":
        resolve_teacher_head_thread(cfg, local_cores(cfg))
    needs = build_configured_loss(cfg).needs
    for spec in teacher_specs(cfg):
        if spec.config.full_vocab_transport == "auto":
            spec.config.full_vocab_transport = auto_transport(cfg, needs, spec.config)


def reference_rows(cfg: ExperimentConfig) -> int:
    """Reference rows an OPD step adds for an SFT component of its loss (one per prompt), else 0. The loss
    must build: launch/validation.py checks that before it first counts rows (a ValueError otherwise)."""
    if cfg.algorithm != "opd":
        return 0
    return cfg.rollout.prompts_per_step if build_configured_loss(cfg).needs.reference_rows else 0


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


def actors_at_once(cfg: ExperimentConfig) -> int:
    """How many actors compute at the same time. The reference loop's stages run one after another, so
    the busiest stage's actors (rollout engines, the teachers' actors, learner ranks); with rollout.max_lag 1
    or rollout.pipeline_chunks > 1 every stage works at once, so all of them. SFT: the learner's ranks."""
    learner = cfg.learner.num_ranks
    if cfg.algorithm == "sft":
        return learner
    teachers = sum(t.config.num_actors for t in teacher_specs(cfg)) if cfg.algorithm == "opd" else 0
    stages = (cfg.rollout.num_actors, teachers, learner)
    overlapped = cfg.rollout.max_lag > 0 or cfg.rollout.pipeline_chunks > 1
    return sum(stages) if overlapped else max(stages)


def auto_threads(cores: int, busy: int) -> int:
    """cluster.threads_per_actor: auto: the cores shared by the actors working at once, at least one each
    (more threads than cores only oversubscribe: docs/benchmarks.md)."""
    return max(1, cores // max(1, busy))


def resolve_teacher_head_thread(cfg: ExperimentConfig, cores: int) -> None:
    """learner.teacher_head_thread: auto becomes "true" where the learner computes on a CPU and its ranks'
    threads (cluster.threads_per_actor, a number by now) fill at most half of `cores`: one step off or
    pipelined on 2 cores at auto's 1 thread an actor, where the second thread takes the teacher's output
    layer while the student's loss runs (docs/benchmarks.md, "The teacher's head on a second thread").
    On-policy at auto's 2 threads on 2 cores it would only oversubscribe them: "false"."""
    if cfg.learner.teacher_head_thread != "auto":
        return
    threads = cfg.cluster.threads_per_actor * cfg.learner.num_ranks
    cfg.learner.teacher_head_thread = "true" if cfg.cluster.num_gpus == 0 and 2 * threads <= cores else "false"


def local_cores(cfg: ExperimentConfig) -> int:
    """The cores this process may run on (its CPU affinity), and in local mode at most cluster.num_cpus."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cores = os.cpu_count() or 1
    return min(cores, cfg.cluster.num_cpus) if cfg.cluster.mode == "local" else cores


def threads_per_actor(cfg: ExperimentConfig, cores: Optional[int] = None) -> int:
    """cluster.threads_per_actor as a number: as given, or auto from `cores` (default: local_cores)."""
    t = cfg.cluster.threads_per_actor
    if t != "auto":
        return int(t)
    return auto_threads(local_cores(cfg) if cores is None else cores, actors_at_once(cfg))
