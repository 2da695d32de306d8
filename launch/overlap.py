"""The overlapped, one-step-off-policy loop (rollout.max_lag: 1): the engines sample step n+1 while
the teacher scores and the learner trains step n, and the driver readies step n+1's batch meanwhile.

Step n, with the engines holding weight version n-1 (the learner's too: the sync of step n-1 is done):

    1. take step n's batch, readied during step n-1 (or sample, score and build it now: see `runs_ahead`)
    2. submit step n+1's rollout (non-blocking) -- the engines sample it with version n-1 -- and its
       teacher scoring, which Ray starts when the engines' replies exist (TeacherGroup.submit_score:
       the rollout goes from the engines to the teachers without passing through the driver)
    3. submit the learner step for step n, and behind it the learner's own weight sync of version n
       (LearnerWorker.sync_after_step), which waits for step n+1's generation to finish; meanwhile
       the driver collects step n+1's rollout and scores and builds its batch (`ready`)
    4. collect the learner's answer: the step's metrics, and whether the sync went out (if not, the
       driver syncs itself, as the reference loop does)
    5. log, eval, checkpoint as in the reference loop (launch/driver.py: _loop)

So step n trains on samples of version n-2 against a learner at n-1: `rollout/lag` is 1 from step 2
on, 0 at step 1. Sampling seeds are a function of the step (Setup.sampling_at), so a step's samples
do not depend on when they were submitted, only on the weights the engines held. The driver's own
work for step n+1 (rewards, statistics, the batch) happens while the learner works, so between two
learner steps the learner waits only for the logging and the next submission.

Stage times with the overlap: time/learner_s runs from the learner's submission to its answer, so it
includes its weight sync (time/sync_s, reported by the learner) and any part of step n+1's readying
that outlasted the learner; time/rollout_wait_s and time/teacher_s of step n are the driver's waits for
step n+1's rollout and scores, inside that time; time/learner_compute_s is the learner's own step.

Why a weight sync cannot land mid-generation: the learner's sync first waits for the engines' replies
to the generation in flight. Even without that wait, HFEngine and VLLMEngine are plain (synchronous)
classes run as Ray actors with the default max_concurrency of 1 and no async methods: Ray runs one
method at a time per actor, so a weight-sync call queued behind a generate waits for it to finish
(tests/test_overlap.py checks the order).

What the lag does to the losses: a batch's behaviour log-probs come from the engine that sampled it,
i.e. from version n-2, and Rollout.weight_version says so. sampled_token_rkl's importance ratio
rho_t = exp(log p_theta(y_t) - log p_behaviour(y_t)) (optionally PPO-clipped, logged as
train/importance_ratio) therefore corrects the stale sampling policy token by token, as in any
off-policy PPO step. Full-vocabulary and top-k losses (full_reverse_kl, topk_*) compare the current
student with the teacher over the vocabulary at each visited prefix: that per-position divergence
is exact; only the distribution of prefixes is one version stale, and it is not re-weighted here.

Checkpoints: the loop never samples across a checkpoint (nor past the last step), so the step after
a checkpoint samples with the checkpointed weights in an uninterrupted run and a resumed one alike,
and resume stays exact. With max_lag 0 it never samples ahead at all and does what _loop does.

Faults: a rollout engine lost while step n+1 was in flight shows in its reply: the learner sends no
weights, and the driver replaces the engine when it collects (the pool's on_replace, Setup._reconnect,
re-sends the learner's weights, already version n, under the engines' tag n-1), then syncs version n
itself. Step n+1 then samples again, blocking, with version n: a lag of 0 for that step, and
`rollout/lag` says so (its share is not retried in flight).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Optional

from launch.config import ExperimentConfig
from launch.remote import Pending
from launch.run_dir import RunDir
from launch.session import Setup
from launch.step import (Run, StageTimer, begin, between_steps, checkpoint_due, draw, finish, learner_metrics,
                         log_step, rollout_batch, sync)
from launch.teacher_set import PendingScores
from opd.contracts import Rollout, TrainBatch


@dataclass
class Ahead:
    """A step's prompts and rows, and its rollout: in flight (pending) or collected (rollout; None
    when an engine was lost in flight, and the step samples again); its teacher scoring in flight
    (scores: OPD only; dropped with a lost rollout, whose replies it was waiting for); and, once
    readied, its batch and the metrics that describe it (rollout, reward and teacher statistics)."""
    prompts: list[dict]
    rows: list[dict]
    pending: Optional[Pending] = None
    rollout: Optional[Rollout] = None
    scores: Optional[PendingScores] = None
    batch: Optional[TrainBatch] = None
    metrics: dict = field(default_factory=dict)


def overlapped_loop(cfg: ExperimentConfig, run: RunDir, s: Setup) -> dict:
    r = begin(cfg, run, s)
    ahead: Optional[Ahead] = None
    for step in range(r.first + 1, cfg.run.steps + 1):
        timer, t0, faults = StageTimer(), time.time(), s.replaced()
        this = ahead or Ahead(*draw(r))
        metrics = {"data/skipped_rows": s.train_data.skipped, **this.metrics}
        if this.batch is None:  # not readied during the previous step: sample, score and build it now
            if this.rollout is None:
                with timer("rollout"):
                    this.rollout = s.rollouts.generate(s.fmt.students(this.rows), s.sampling_at(step))
            this.batch = rollout_batch(r, step, this.prompts, this.rows, this.rollout, timer, metrics, this.scores)
        ahead = submit(r, step + 1) if runs_ahead(cfg, step) else None
        metrics["rollout/lag"] = s.version - this.batch.weight_version  # the learner holds s.version now
        with timer("learner"):
            learning = s.learner.submit_step(this.batch)
            if ahead:  # the learner sends version `step` once step+1's generation is done
                syncing = s.learner.submit("sync_after_step", step, [ref for _, ref in ahead.pending.calls])
                ready(r, step + 1, ahead, timer)
            metrics.update(learner_metrics(s.learner.collect(learning)))
            sync_s = s.learner.collect(syncing) if ahead else None
        if sync_s is not None:
            metrics["time/sync_s"] = sync_s
        sync(r, step, timer, metrics, sent=sync_s is not None)
        log_step(r, step, this.batch, metrics, timer, t0, faults)
        stopped = between_steps(r, step)
        if stopped:  # a rollout still in flight finishes on its engine before the final save; nothing reads it
            return finish(r, stopped)
    return finish(r)


def ready(r: Run, step: int, ahead: Ahead, timer: StageTimer) -> None:
    """Collect `step`'s rollout and scores, submitted ahead, and build its batch, while the learner
    trains the step before. A rollout lost with an engine leaves ahead.rollout None: the step samples
    again when it comes (the learner, whose sync waited for the same replies, sent nothing)."""
    with timer("rollout_wait"):  # generation time the teacher and learner did not hide
        ahead.rollout = r.s.rollouts.collect(ahead.pending, retry=False)
    if ahead.rollout is None:
        ahead.scores = None  # it waited on a lost engine's reply: the step scores again
        return
    ahead.batch = rollout_batch(r, step, ahead.prompts, ahead.rows, ahead.rollout, timer, ahead.metrics, ahead.scores)


def runs_ahead(cfg: ExperimentConfig, step: int) -> bool:
    """Whether step+1 is sampled during step: with max_lag > 0, except after the last step and
    across a checkpoint (see the module docstring)."""
    return cfg.rollout.max_lag > 0 and step < cfg.run.steps and not checkpoint_due(cfg, step)


def submit(r: Run, step: int) -> Ahead:
    """Draw `step`'s prompts and start sampling them with the weights the engines hold now, and
    (OPD) scoring them as soon as they exist."""
    s = r.s
    prompts, rows = draw(r)
    pending = s.rollouts.submit(s.fmt.students(rows), s.sampling_at(step))
    scores = s.teachers.submit_score(rows, pending) if r.cfg.algorithm == "opd" else None
    return Ahead(prompts, rows, pending=pending, scores=scores)
