"""On-policy pipelining inside a step (rollout.pipeline_chunks: c > 1): the step's rows in c chunks, so the
teachers score chunk 1 while the engines sample later chunks, and the learner runs forward and backward on
each scored chunk while the rest are scored, all with the step's (pre-step) weights; one optimizer step
after the last chunk. The same step as the reference loop's (launch/driver.py: _loop), computed in pieces:

    1. submit every chunk's rollout (one engine call per chunk, so chunk 1 returns first) and its teacher
       scoring, which Ray starts when that chunk's replies exist (TeacherSet.submit_score)
    2. the step's global denominators (TrainBatch.denominators over every row): under loss.reduction
       token_mean the completion lengths of every chunk, so every rollout is collected first; under
       sample_mean row counts, known before sampling, so the learner starts on chunk 1 at once
    3. per chunk, in order: collect its scores, build its batch and submit LearnerWorker.accumulate with
       the step's denominators; the learner's calls queue, so chunk k trains while k+1 is being scored
    4. apply_step: the one optimizer update (gradient accumulation over the chunks)

Why wait for every rollout before the first backward under token_mean (2): a token's weight is
1 / (on-policy tokens of the whole step), which needs every chunk's lengths. Weighting each chunk by a
provisional count and rescaling the gradient afterwards would equal it only up to rounding, and not under
ZeRO's partitioned gradient buffers without more surgery. The wait costs the overlap of the learner with
sampling (it still overlaps the teachers' scoring); with an engine whose decoding costs the same per step
at few rows as at many (the HF engine on a CPU), chunked sampling is itself slower, and pipelining does not
pay there (docs/benchmarks.md). So the weights each token gets are exactly the reference loop's, and so is
the gradient (the same rows in the same micro-batches, each chunk padded only to its own longest
completion: equal up to float rounding, tests/test_learner_pipeline.py).

Sampling: chunk k samples with a seed derived from (the step's seed, k), a function of the step as
always, so a retried or resumed step samples the same tokens; the tokens differ from the same step at
c = 1 (other seeds, other batches), which is the only thing that does.

Metrics: the rollout, reward and teacher statistics over the whole step (the chunks' rollouts and scores
re-assembled), the learner's sums over every chunk's micro-batches; train/padding_fraction is the chunks'
own padding. Stage times: time/rollout_s and time/teacher_s are the driver's waits for them (overlapped
with the learner's work), time/learner_s the wait for the last chunk and the optimizer step.

Faults: a chunk whose rollout lost an engine is sampled again (RolloutGroup.collect retries it) and scored
again by the driver; the scoring submitted ahead was waiting on the lost reply and is dropped.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Optional

import torch

from launch.batches import distill_batch, rollout_stats
from launch.cluster import derived_seed
from launch.derived import chunk_bounds
from launch.step import Run, StageTimer, learner_metrics
from launch.teacher_set import RoutedScores, merge_scores
from opd.contracts import Rollout, TeacherScores, TrainBatch, concat_rollouts

STATS_FIELDS = ("sampled_logprobs", "sampled_rank", "entropy")  # what the teacher statistics read


def pipelined_step(r: Run, step: int, rows: list[dict], timer: StageTimer, metrics: dict) -> TrainBatch:
    """Sample, score and learn one OPD step in chunks (the module docstring). Returns the step's rows as a
    TrainBatch of prompts and completions only (what log_step reads); the learner has stepped."""
    cfg, s = r.cfg, r.s
    spec = s.sampling_at(step)
    parts = [rows[b] for b in chunk_bounds(cfg, len(rows))]
    pending, scoring = [], []
    for k, chunk in enumerate(parts):
        p = s.rollouts.submit(s.fmt.students(chunk), replace(spec, seed=derived_seed(spec.seed, "chunk", k)))
        pending.append(p)
        scoring.append(s.teachers.submit_score(chunk, p))
    rollouts: list[Optional[Rollout]] = [None] * len(parts)

    def collect(k: int) -> Rollout:
        if rollouts[k] is None:
            replaced = s.replaced()
            with timer("rollout"):
                rollouts[k] = s.rollouts.collect(pending[k])
            if s.replaced() != replaced:  # its scoring waited on a lost engine's reply: scored again below
                scoring[k] = None
        return rollouts[k]

    if cfg.loss.reduction == "sample_mean":  # row counts: known before sampling, the learner starts at once
        counts = (len(rows), 0)
    else:  # token counts: every chunk's lengths before the first backward
        for k in range(len(parts)):
            collect(k)
        counts = _batch(concat_rollouts(rollouts)).denominators(cfg.loss.reduction)
    routed, learning = [], []
    for k, chunk in enumerate(parts):
        rollout = collect(k)
        with timer("teacher"):  # the wait for this chunk's scores; the learner trains the chunks before
            r = (s.teachers.collect_score(scoring[k], rollout.completion_ids.shape[1]) if scoring[k] is not None
                 else s.teachers.score(chunk, rollout))
        routed.append(r)
        part = replace(distill_batch(rollout, r.scores), row_weights=s.teachers.row_weights(chunk))
        learning.append(s.learner.submit_chunk(part, counts, last=k == len(parts) - 1))
    whole = concat_rollouts(rollouts)  # the step's statistics, while the learner trains
    batch = _batch(whole)
    assert counts == batch.denominators(cfg.loss.reduction)
    rewards = s.rewards(whole, rows)
    metrics.update(rollout_stats(whole), **{"rollout/reward_mean": sum(rewards) / len(rewards)})
    metrics.update(s.teachers.stats(whole, merge_routed(routed, [len(r) for r in rollouts],
                                                        whole.completion_ids.shape[1])))
    with timer("learner"):
        for calls in learning:
            s.learner.collect(calls)
        metrics.update(learner_metrics(s.learner.call("apply_step")))
    return batch


def _batch(rollout: Rollout) -> TrainBatch:
    """The rollout's rows as a TrainBatch of prompts and completions (denominators, log_step's token count)."""
    return TrainBatch(prompt_ids=rollout.prompt_ids, completion_ids=rollout.completion_ids,
                      completion_mask=rollout.completion_mask, weight_version=rollout.weight_version)


def merge_routed(chunks: list[RoutedScores], sizes: list[int], width: int) -> RoutedScores:
    """The chunks' teacher scores as one step's, [N, width], for the teacher statistics (only the fields they
    read: the loss's inputs went to the learner chunk by chunk): every row in order, and each teacher's
    part over its rows of every chunk."""
    offsets = [sum(sizes[:k]) for k in range(len(sizes))]

    def stats_only(x: TeacherScores) -> TeacherScores:  # at the step's width (a chunk's is its own)
        return TeacherScores(**{f: None if getattr(x, f) is None else torch.nn.functional.pad(
            getattr(x, f), (0, width - getattr(x, f).shape[1])) for f in STATS_FIELDS})

    scores = merge_scores([(list(range(o, o + n)), stats_only(r.scores)) for o, n, r in zip(offsets, sizes, chunks)],
                          sum(sizes), width)
    teachers = sorted({g for r in chunks for g, _, _ in r.parts})
    parts = []
    for g in teachers:
        mine = [(o, idx, sc) for o, r in zip(offsets, chunks) for t, idx, sc in r.parts if t == g]
        idx_all = [o + i for o, idx, _ in mine for i in idx]
        at, pieces = 0, []
        for _, idx, sc in mine:
            pieces.append((list(range(at, at + len(idx))), stats_only(sc)))
            at += len(idx)
        parts.append((g, idx_all, merge_scores(pieces, len(idx_all), width)))
    return RoutedScores(scores, parts)
