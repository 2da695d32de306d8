"""The training loop: generate -> score -> learn -> sync, with eval and checkpoints around it."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Optional

import ray
import torch
from launch.batches import distill_batch, reward_batch, rollout_stats, score_request, sft_batch
from launch.capabilities import build_configured_loss, check_built_teacher, check_loss
from launch.cluster import (LearnerGroup, RolloutGroup, check_address, connect_weight_sync, derived_seed,
                            start_ray)
from launch.config import ExperimentConfig, reference_rows, rows_per_step, sampling_spec
from launch.evaluation import Evaluator
from launch.guards import NonfiniteGuard
from launch.inputs import Inputs, load_inputs
from launch.placement import Placement
from launch.routing import teacher_specs
from launch.teacher_set import PendingScores, TeacherSet
from launch.remote import RunStopped, gather
from launch.run_dir import RunDir
from opd.contracts import SamplingSpec, TrainBatch, concat_batches
from tasks.data import PromptStream
from tasks.verifiers import get_verifier


def train(cfg: ExperimentConfig) -> dict:
    inputs = load_inputs(cfg)  # bad tokenizers, data or templates stop here: no Ray, no run folder
    check_address(cfg)
    run = RunDir(cfg)  # a folder holding another run is refused here; a resume picks its checkpoint
    s = None
    try:
        s = Setup(cfg, inputs)
        if cfg.rollout.max_lag > 0 and cfg.algorithm != "sft":  # SFT samples nothing to overlap
            from launch.overlap import overlapped_loop
            return overlapped_loop(cfg, run, s)
        return _loop(cfg, run, s)
    except RunStopped as e:
        raise RunStopped(f"{e}; {run.resume_hint()}") from e
    finally:
        if s:
            s.shutdown()


def _loop(cfg: ExperimentConfig, run: RunDir, s: "Setup") -> dict:
    """The reference loop: each step samples with the newest weights, then scores, learns and syncs."""
    first, start_acc, guard = begin(cfg, run, s)
    for step in range(first + 1, cfg.run.steps + 1):
        timer, t0, faults = StageTimer(), time.time(), s.replaced()
        prompts, rows = draw(cfg, s)
        metrics = {"data/skipped_rows": s.train_data.skipped}
        if cfg.algorithm == "sft":
            batch = sft_batch(s.fmt, rows, "target")
        else:
            with timer("rollout"):  # the seed is a function of the step: a resumed or retried step samples alike
                rollout = s.rollouts.generate(s.fmt.students(rows), s.sampling_at(step))
            batch = rollout_batch(cfg, s, step, prompts, rows, rollout, timer, metrics)
        learn(s, batch, timer, metrics)
        sync(cfg, s, step, guard, timer, metrics)
        log_step(run, s, step, batch, metrics, timer, t0, faults)
        stopped = between_steps(cfg, run, s, step, guard)
        if stopped:
            return finish(cfg, run, s, start_acc, guard, stopped)
    return finish(cfg, run, s, start_acc, guard)


# The pieces of a step, shared by _loop and launch/overlap.py's overlapped_loop.

def begin(cfg: ExperimentConfig, run: RunDir, s: "Setup") -> tuple[int, float | None, NonfiniteGuard]:
    """(last step done, start-of-run eval accuracy, the non-finite guard), fresh or resumed."""
    step = s.resume(run)
    start_acc = run.start_eval if step else s.evaluate(run, step)
    return step, start_acc, NonfiniteGuard(cfg.learner.max_nonfinite_steps, run.resume_state.get("nonfinite_in_row", 0))


def draw(cfg: ExperimentConfig, s: "Setup") -> tuple[list[dict], list[dict]]:
    """The step's prompts, and its rows: each prompt repeated samples_per_prompt times (once for SFT)."""
    prompts = s.train.next_batch(cfg.rollout.prompts_per_step)
    return prompts, [r for r in prompts for _ in range(1 if cfg.algorithm == "sft" else cfg.rollout.samples_per_prompt)]


def rollout_batch(cfg: ExperimentConfig, s: "Setup", step: int, prompts: list[dict], rows: list[dict], rollout,
                  timer: "StageTimer", metrics: dict, scores: Optional[PendingScores] = None) -> TrainBatch:
    """Rewards, teacher scores (OPD) or advantages (GRPO) for a sampled rollout: the step's TrainBatch.
    `scores`: teacher scoring already submitted (launch/overlap.py); else the teachers score it now."""
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


def learn(s: "Setup", batch: TrainBatch, timer: "StageTimer", metrics: dict) -> None:
    with timer("learner"), s.engines_asleep():
        metrics.update(learner_metrics(s.learner.train_step(batch)))


def learner_metrics(out: dict[str, float]) -> dict[str, float]:
    """The learner's answer under the names the run logs: train/*, the teacher/* statistics of a
    hidden-state teacher under the driver's own names, and the step's compute time (the learner stage
    less the call's transport) as time/learner_compute_s."""
    return {"time/learner_compute_s" if k == "compute_s" else k if k.startswith("teacher/") else f"train/{k}": v
            for k, v in out.items()}


def sync(cfg: ExperimentConfig, s: "Setup", step: int, guard: NonfiniteGuard, timer: "StageTimer", metrics: dict,
         sent: bool = False) -> None:
    """Send the engines the step's weights, tagged with the step. A skipped step changed nothing. An SFT
    run reads its engines only to evaluate, so it sends only before an evaluation. `sent`: the learner
    sent them itself, right after its step (launch/overlap.py)."""
    if not guard.skipped(step, metrics):
        s.unsent = step  # the learner holds weights the engines lack
    if sent:
        s.version, s.unsent = step, None
    elif s.unsent is not None and engines_read_after(cfg, step):
        with timer("sync"):
            s.sync_weights(s.unsent)


def log_step(run: RunDir, s: "Setup", step: int, batch: TrainBatch, metrics: dict, timer: "StageTimer", t0: float,
             faults: int) -> None:
    metrics.update(timer.metrics(), **{"perf/step_s": time.time() - t0, "faults/restarts": s.replaced() - faults,
                                       "perf/tokens_per_s": batch.loss_tokens / (time.time() - t0)})
    run.log(step, metrics)


def between_steps(cfg: ExperimentConfig, run: RunDir, s: "Setup", step: int,
                  guard: NonfiniteGuard) -> Optional[tuple[int, float]]:
    """Eval and checkpoint when due. (step, accuracy) when the eval reached eval.stop_at_accuracy: the
    run ends here; else None."""
    acc = s.evaluate(run, step) if eval_due(cfg, step) else None
    if checkpoint_due(cfg, step):
        s.checkpoint(run, step, guard.in_row)
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


def finish(cfg: ExperimentConfig, run: RunDir, s: "Setup", start_acc: float | None, guard: NonfiniteGuard,
           stopped: Optional[tuple[int, float]] = None) -> dict:
    """The final eval (or, `stopped`, the step and accuracy of the one that ended the run early) and
    model, the skipped-rows line, and the run's summary."""
    steps, end_acc = stopped or (cfg.run.steps, s.evaluate(run, cfg.run.steps))
    s.learner.call("save_hf", str(run.final), cfg.model.path)
    print(f"opd: skipped rows: {s.skipped_rows_line()}", flush=True)
    summary = {"run": cfg.run.name, "algorithm": cfg.algorithm, "loss": cfg.loss.name, "steps": steps,
               "start_eval_accuracy": start_acc, "end_eval_accuracy": end_acc, "final_model": str(run.final),
               "skipped_rows": s.skipped_rows, "skipped_nonfinite_steps": guard.total, "actor_restarts": s.replaced()}
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


class Setup:
    """Data, prompts, actors and the loss's needs, built once from the manifest."""

    def __init__(self, cfg: ExperimentConfig, inputs: Inputs):
        self.cfg, rc = cfg, cfg.rollout
        self.fmt, self.train_data = inputs.fmt, inputs.train
        self.teacher_fmts, self.router = inputs.teacher_fmts, inputs.router
        self.skipped_rows = inputs.skipped_rows
        self.train = PromptStream(self.train_data.rows, cfg.run.seed)
        start_ray(cfg)
        self.verifier = get_verifier(cfg.eval.verifier, cfg.eval.verify_timeout_s)  # GRPO's rewards
        self.evaluator = Evaluator(inputs.eval_sets, cfg.run.seed, cfg.eval.verify_timeout_s,
                                   named=bool(cfg.eval.sets), stop_ids=inputs.special.stop)
        needs = build_configured_loss(cfg).needs
        self.specs = teacher_specs(cfg) if cfg.algorithm == "opd" else []
        if any(t.config.full_vocab_transport == "auto" for t in self.specs):
            check_loss(cfg)  # `auto` left open by a check made before an earlier stage wrote the teacher
        self.requests = [score_request(needs, rc.temperature, t.config.full_vocab_transport, t.config.kind == "self")
                         for t in self.specs]
        stop = inputs.special.stop  # every engine stops at the same ids, in training, reference rows and eval
        self.sampling = replace(sampling_spec(cfg, return_topk=needs.student_topk), stop_ids=stop)
        self.reference_rows = reference_rows(cfg)
        ref = cfg.loss.reference
        self.reference_sampling = SamplingSpec(max_new_tokens=ref.max_new_tokens or rc.max_new_tokens,
                                               temperature=ref.temperature, behaviour_logprobs=False, stop_ids=stop)
        self.placement = Placement(cfg, cfg.cluster.placement_timeout_s)
        self.learner = self.rollouts = self.teachers = None
        self.version = 0  # the weight version the engines hold (a skipped step keeps it)
        self.unsent: Optional[int] = None  # the step whose weights the learner holds and the engines lack
        try:
            self._start_actors(inputs.special.pad)
        except BaseException:
            self.shutdown()  # a half-started run must not leave actors holding the cluster
            raise

    def _start_actors(self, pad_id: int) -> None:
        cfg, placement = self.cfg, self.placement
        self.learner = LearnerGroup(cfg, rows_per_step(cfg), placement)  # first: its ranks rendezvous while the rest load
        if cfg.cluster.colocate:  # vLLM sizes its share from the GPU memory free at start: the learner's must be taken
            gather([(f"learner rank {r}.__ray_ready__", a.__ray_ready__.remote()) for r, a in enumerate(self.learner.ranks)],
                   cfg.cluster.call_timeout_s)
        self.rollouts = RolloutGroup.start(cfg, placement, self.sampling, pad_id)
        self.teachers = (TeacherSet.start(cfg, placement, self.specs, self.teacher_fmts, self.requests, self.router)
                         if cfg.algorithm == "opd" else None)
        # Wait for every actor to load, so step 1's stage timings measure work, not start-up.
        gather([(f"{name}.__ray_ready__", a.__ray_ready__.remote()) for name, a in self._named_actors()],
               cfg.cluster.call_timeout_s)
        for spec, group in zip(self.specs, self.teachers.groups if self.teachers else []):
            # what a vLLM teacher can return depends on the runner its engine picked
            for caps in gather([(f"{group.pool.role} {i}.get_capabilities", a.get_capabilities.remote())
                                for i, a in enumerate(group.actors)], cfg.cluster.call_timeout_s):
                check_built_teacher(cfg, caps, spec)
        self.rollouts.pool.on_replace = self._reconnect
        for group in self._live_teachers():
            group.pool.on_replace = self._reconnect
        self._connect()

    def _live_teachers(self) -> list:
        """The teacher groups that follow the student's weights (live self-teachers)."""
        return [g for s, g in zip(self.specs, self.teachers.groups if self.teachers else []) if s.config.live]

    def _groups(self) -> list:
        """Every replaceable actor group: the rollout engines and each teacher."""
        return [g for g in [self.rollouts, *(self.teachers.groups if self.teachers else [])] if g]

    def _connect(self) -> None:
        targets = list(self.rollouts.actors)
        kinds = [self.cfg.rollout.engine] * len(targets)
        for group in self._live_teachers():  # a live self-teacher follows the student
            targets += group.actors
            kinds += ["hf"] * len(group.actors)
        connect_weight_sync(self.cfg, self.learner, targets, kinds)

    def _reconnect(self, _replaced: list[int]) -> None:
        """A replacement engine joins new transfer groups and receives the weights the others hold. Closing
        the old groups is bounded (sync.close_timeout_s): an engine that did not close is stuck in a
        broadcast and is replaced too, not waited on."""
        stuck = self.learner.call("close_weight_sync")
        for group in self._groups():
            if stuck:
                group.pool.replace_stuck(stuck)
        self._connect()
        self.learner.call("sync_weights", self.version)

    def _named_actors(self) -> list[tuple[str, object]]:
        return ([(f"learner rank {r}", a) for r, a in enumerate(self.learner.ranks if self.learner else [])]
                + [(f"{g.pool.role} {i}", a) for g in self._groups() for i, a in enumerate(g.actors)])

    def replaced(self) -> int:
        return sum(g.pool.replaced for g in self._groups())

    def reference_batch(self, prompts: list[dict], step: int) -> TrainBatch:
        """SFT rows for this step's prompts under the student's prompt: the dataset's answers, or
        completions the teacher samples from its own prompt (loss.reference.source)."""
        if self.cfg.loss.reference.source == "dataset":
            return sft_batch(self.fmt, prompts, "target")
        spec = replace(self.reference_sampling, seed=derived_seed(self.cfg.run.seed, "reference", step))
        written = self.teachers.generate(prompts, spec)
        return TrainBatch(prompt_ids=self.fmt.students(prompts), completion_ids=written.completion_ids,
                          completion_mask=written.completion_mask, is_reference=torch.ones(len(prompts), dtype=torch.bool))

    def sampling_at(self, step: int) -> SamplingSpec:
        return replace(self.sampling, seed=derived_seed(self.cfg.run.seed, "rollout", step))

    def sync_weights(self, version: int) -> None:
        self.learner.call("sync_weights", version)
        self.version, self.unsent = version, None

    @contextmanager
    def engines_asleep(self):
        """Colocated engines give the learner their GPU memory for its step."""
        if self.cfg.cluster.colocate:
            self.rollouts.sleep()
        try:
            yield
        finally:
            if self.cfg.cluster.colocate:
                self.learner.call("release_memory")  # before the engines re-map their share
                self.rollouts.wake_up()

    def shutdown(self) -> None:
        """Free this run's actors and CPUs (a Ray session may outlive the run: tests, notebooks)."""
        try:
            if self.learner:  # closes the transfer groups on both ends; bounded: a hung rank must not hang exit
                ray.get([r.close_weight_sync.remote() for r in self.learner.ranks], timeout=60)
        except Exception:  # noqa: BLE001 - an actor already dead must not hide the run's own error
            pass
        for _, actor in self._named_actors():
            ray.kill(actor)
        self.placement.remove()

    def rewards(self, rollout, rows) -> list[float]:
        return [self.verifier(self.fmt.text(c), r["answer"]) for c, r in zip(rollout.completions(), rows)]

    def skipped_rows_line(self) -> str:
        return "; ".join(f"{key} {sum(reasons.values())}" + (f" ({', '.join(f'{r}: {n}' for r, n in reasons.items())})"
                                                              if reasons else "")
                         for key, reasons in self.skipped_rows.items())

    def evaluate(self, run: RunDir, step: int) -> float | None:
        """Every eval set, logged at `step`; the headline eval/accuracy (None without eval data)."""
        if not self.evaluator.sets:
            return None
        t = time.time()
        metrics, acc = self.evaluator(self.rollouts, self.fmt)
        run.log(step, {**metrics, "time/eval_s": time.time() - t})
        return acc

    def checkpoint(self, run: RunDir, step: int, nonfinite_in_row: int) -> None:
        """Learner state, data position and weight version; the engines' sampling seeds are a function
        of the step and teachers hold no state, so this is all an exact resume needs."""
        state = {"step": step, "data": self.train.state_dict(), "weight_version": self.version,
                 "nonfinite_in_row": nonfinite_in_row}
        self.learner.call("save_checkpoint", str(run.checkpoints), step, state)
        run.prune_checkpoints()

    def resume(self, run: RunDir) -> int:
        if not run.resume_from:
            return 0
        state = run.resume_state
        self.learner.call("load_checkpoint", str(run.resume_from))
        self.train.load_state_dict(state["data"])
        self.sync_weights(state["weight_version"])
        return state["step"]
