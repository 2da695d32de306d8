"""The training loop: generate -> score -> learn -> sync, with eval and checkpoints around it. The
step's pieces are in launch/step.py, the run's session (actors and state) in launch/session.py."""
from __future__ import annotations

import time

from launch.batches import sft_batch
from launch.cluster import check_address
from launch.config import ExperimentConfig
from launch.inputs import load_inputs
from launch.overlap import overlapped_loop
from launch.pipeline import pipelined_step
from launch.remote import RunStopped
from launch.run_dir import RunDir
from launch.session import Setup
from launch.step import StageTimer, begin, between_steps, draw, finish, learn, log_step, rollout_batch, sync


def train(cfg: ExperimentConfig) -> dict:
    inputs = load_inputs(cfg)  # bad tokenizers, data or templates stop here: no Ray, no run folder
    check_address(cfg)
    run = RunDir(cfg)  # a folder holding another run is refused here; a resume picks its checkpoint
    s = None
    try:
        s = Setup(cfg, inputs)
        if cfg.rollout.max_lag > 0 and cfg.algorithm != "sft":  # SFT samples nothing to overlap
            return overlapped_loop(cfg, run, s)
        return _loop(cfg, run, s)
    except RunStopped as e:
        raise RunStopped(f"{e}; {run.resume_hint()}") from e
    finally:
        if s:
            s.shutdown()


def _loop(cfg: ExperimentConfig, run: RunDir, s: Setup) -> dict:
    """The reference loop: each step samples with the newest weights, then scores, learns and syncs."""
    r = begin(cfg, run, s)
    for step in range(r.first + 1, cfg.run.steps + 1):
        timer, t0, faults = StageTimer(), time.time(), s.replaced()
        prompts, rows = draw(r)
        metrics = {"data/skipped_rows": s.train_data.skipped}
        if cfg.rollout.pipeline_chunks > 1:  # sampled, scored and learned in chunks (launch/pipeline.py)
            batch = pipelined_step(r, step, rows, timer, metrics)
        else:
            if cfg.algorithm == "sft":
                batch = sft_batch(s.fmt, rows, "target")
            else:
                with timer("rollout"):  # the seed is a function of the step: a resumed or retried step samples alike
                    rollout = s.rollouts.generate(s.fmt.students(rows), s.sampling_at(step))
                batch = rollout_batch(r, step, prompts, rows, rollout, timer, metrics)
            learn(s, batch, timer, metrics)
        sync(r, step, timer, metrics)
        log_step(r, step, batch, metrics, timer, t0, faults)
        stopped = between_steps(r, step)
        if stopped:
            return finish(r, stopped)
    return finish(r)
