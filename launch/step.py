"""The pieces of a training step, shared by the reference loop (launch/driver.py: _loop) and the
overlapped one (launch/overlap.py: overlapped_loop): draw prompts, build the step's batch, learn, sync,
log, eval and checkpoint between steps, finish. Each works on the run's session (launch/session.py)."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Optional

from launch.batches import distill_batch, reward_batch, rollout_stats
from launch.config import ExperimentConfig
from launch.guards import NonfiniteGuard
from launch.run_dir import RunDir
from launch.session import Setup
from launch.teacher_set import PendingScores
from opd.contracts import TrainBatch, concat_batches


@dataclass
class Run:
    """What every step of a run works with and no step changes: the manifest, the run's folder, its
    session (actors and weight state, launch/session.py), the non-finite guard across steps, and where
    the run starts. begin() makes it."""
    cfg: ExperimentConfig
    dir: RunDir
    s: Setup
    guard: NonfiniteGuard
    first: int                    # the last step done: 0, or the step a resumed run's checkpoint holds
    start_acc: Optional[float]    # the start-of-run eval accuracy (a resumed run's, from its folder)


def begin(cfg: ExperimentConfig, run: RunDir, s: Setup) -> Run:
    """The run, fresh or resumed."""
    step = s.resume(run)
    start_acc = run.start_eval if step else s.evaluate(run, step)
    guard = NonfiniteGuard(cfg.learner.max_nonfinite_steps, run.resume_state.get("nonfinite_in_row", 0))
    return Run(cfg, run, s, guard, step, start_acc)


def draw(r: Run) -> tuple[list[dict], list[dict]]:
    """The step's prompts, and its rows: each prompt repeated samples_per_prompt times (once for SFT)."""
    rc = r.cfg.rollout
    prompts = r.s.train.next_batch(rc.prompts_per_step)
    return prompts, [p for p in prompts for _ in range(1 if r.cfg.algorithm == "sft" else rc.samples_per_prompt)]


def rollout_batch(r: Run, step: int, prompts: list[dict], rows: list[dict], rollout, timer: StageTimer,
                  metrics: dict, scores: Optional[PendingScores] = None) -> TrainBatch:
    """Rewards, teacher scores (OPD) or advantages (GRPO) for a sampled rollout: the step's TrainBatch.
    `scores`: teacher scoring already submitted (launch/overlap.py); else the teachers score it now."""
    cfg, s = r.cfg, r.s
    rewards = s.rewards(rollout, rows)
    metrics.update(rollout_stats(rollout), **{"rollout/reward_mean": sum(rewards) / len(rewards)})
    if cfg.algorithm != "opd":
        return reward_batch(rollout, rewards, [i // cfg.rollout.samples_per_prompt for i in range(len(rows))])
    with timer("teacher"):  # with scores submitted ahead: the time spent waiting for them; each teacher its rows
        routed = (s.teachers.collect_score(scores, rollout.completion_ids.shape[1]) if scores
                  else s.teachers.score(rows, rollout))
    batch = replace(distill_batch(rollout, routed.scores), row_weights=s.teachers.row_weights(rows))
    if s.reference_rows:  # an SFT mix: reference rows join the same optimizer step
        with timer("reference"):
            batch = concat_batches(batch, s.reference_batch(prompts, step))
    metrics.update(s.teachers.stats(rollout, routed))
    return batch


def learn(s: Setup, batch: TrainBatch, timer: StageTimer, metrics: dict) -> None:
    with timer("learner"), s.engines_asleep():
        metrics.update(learner_metrics(s.learner.train_step(batch)))


def learner_metrics(out: dict[str, float]) -> dict[str, float]:
    """The learner's answer under the names the run logs: train/*, the teacher/* statistics of a
    hidden-state teacher under the driver's own names, and the step's compute time (the learner stage
    less the call's transport) as time/learner_compute_s."""
    return {"time/learner_compute_s" if k == "compute_s" else k if k.startswith("teacher/") else f"train/{k}": v
            for k, v in out.items()}


def sync(r: Run, step: int, timer: StageTimer, metrics: dict, sent: bool = False) -> None:
    """Send the engines the step's weights, tagged with the step. A skipped step changed nothing. An SFT
    run reads its engines only to evaluate, so it sends only before an evaluation. `sent`: the learner
    sent them itself, right after its step (launch/overlap.py)."""
    s = r.s
    if not r.guard.skipped(step, metrics):
        s.trained(step)
    if sent:
        s.synced(step)
    elif s.unsent is not None and engines_read_after(r.cfg, step):
        with timer("sync"):
            s.sync_weights(s.unsent)


def log_step(r: Run, step: int, batch: TrainBatch, metrics: dict, timer: StageTimer, t0: float, faults: int) -> None:
    metrics.update(timer.metrics(), **{"perf/step_s": time.time() - t0, "faults/restarts": r.s.replaced() - faults,
                                       "perf/tokens_per_s": batch.loss_tokens / (time.time() - t0)})
    r.dir.log(step, metrics)


def between_steps(r: Run, step: int) -> Optional[tuple[int, float]]:
    """Eval and checkpoint when due. (step, accuracy) when the eval reached eval.stop_at_accuracy: the
    run ends here; else None."""
    cfg, s = r.cfg, r.s
    acc = s.evaluate(r.dir, step) if eval_due(cfg, step) else None
    if checkpoint_due(cfg, step):
        s.checkpoint(r.dir, step, r.guard.in_row)
    stop = cfg.eval.stop_at_accuracy
    if stop is not None and acc is not None and acc >= stop:
        print(f"opd: eval accuracy {acc:.3f} >= eval.stop_at_accuracy {stop} at step {step}: the run ends here",
              flush=True)
        return step, acc
    return None


def eval_due(cfg: ExperimentConfig, step: int) -> bool:
    """An evaluation between steps (the last step's is finish()'s)."""
    return bool(cfg.eval.interval and step % cfg.eval.interval == 0 and step != cfg.run.steps)


def engines_read_after(cfg: ExperimentConfig, step: int) -> bool:
    """Whether the engines are read before the next step's sync: the next step samples from them (every
    algorithm but SFT), or an evaluation follows this step."""
    return cfg.algorithm != "sft" or eval_due(cfg, step) or step == cfg.run.steps


def checkpoint_due(cfg: ExperimentConfig, step: int) -> bool:
    return bool(cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0)


def finish(r: Run, stopped: Optional[tuple[int, float]] = None) -> dict:
    """The final eval (or, `stopped`, the step and accuracy of the one that ended the run early) and
    model, the skipped-rows line, and the run's summary."""
    cfg, run, s = r.cfg, r.dir, r.s
    steps, end_acc = stopped or (cfg.run.steps, s.evaluate(run, cfg.run.steps))
    s.learner.call("save_hf", str(run.final), cfg.model.path)
    print(f"opd: skipped rows: {s.skipped_rows_line()}", flush=True)
    summary = {"run": cfg.run.name, "algorithm": cfg.algorithm, "loss": cfg.loss.name, "steps": steps,
               "start_eval_accuracy": r.start_acc, "end_eval_accuracy": end_acc, "final_model": str(run.final),
               "skipped_rows": s.skipped_rows, "skipped_nonfinite_steps": r.guard.total, "actor_restarts": s.replaced()}
    run.close(summary)
    return summary


class StageTimer:
    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, stage: str):
        t = time.time()
        yield
        self.seconds[stage] = self.seconds.get(stage, 0.0) + time.time() - t

    def metrics(self) -> dict[str, float]:
        return {f"time/{k}_s": v for k, v in self.seconds.items()}
