"""The training loop: generate -> score -> learn -> sync, with eval and checkpoints around it."""
from __future__ import annotations

import time
from contextlib import contextmanager

import ray
from launch.batches import (distill_batch, reward_batch, rollout_stats, score_request, sft_batch,
                            teacher_stats)
from launch.capabilities import build_configured_loss
from launch.cluster import LearnerGroup, RolloutGroup, TeacherGroup, connect_weight_sync, start_ray
from launch.config import ExperimentConfig, sampling_spec
from launch.inputs import Inputs, load_inputs
from launch.placement import Placement
from launch.run_dir import RunDir
from opd.contracts import SamplingSpec
from tasks.data import PromptStream
from tasks.verifiers import get_verifier


def train(cfg: ExperimentConfig) -> dict:
    inputs = load_inputs(cfg)  # bad tokenizers, data or templates stop here: no Ray, no run folder
    run, s = RunDir(cfg), Setup(cfg, inputs)
    try:
        return _loop(cfg, run, s)
    finally:
        s.shutdown()


def _loop(cfg: ExperimentConfig, run: RunDir, s: "Setup") -> dict:
    step = s.resume(run)
    start_acc = s.evaluate(run, step)
    for step in range(step + 1, cfg.run.steps + 1):
        timer, t0 = StageTimer(), time.time()
        rows = [r for r in s.train.next_batch(cfg.rollout.prompts_per_step)
                for _ in range(1 if cfg.algorithm == "sft" else cfg.rollout.samples_per_prompt)]
        metrics = {"data/skipped_rows": s.train_data.skipped}
        if cfg.algorithm == "sft":
            batch = sft_batch(s.fmt, rows, "answer")
        else:
            with timer("rollout"):
                rollout = s.rollouts.generate([s.fmt.student(r) for r in rows], s.sampling)
            rewards = s.rewards(rollout, rows)
            metrics.update(rollout_stats(rollout), **{"rollout/reward_mean": sum(rewards) / len(rewards)})
            if cfg.algorithm == "opd":
                with timer("teacher"):
                    scores = s.teachers.score([s.fmt.teacher(r) for r in rows], rollout, s.request)
                batch = distill_batch(rollout, scores)
                metrics.update(teacher_stats(rollout, scores, cfg.teacher.kind == "self"))
            else:
                batch = reward_batch(rollout, rewards, [i // cfg.rollout.samples_per_prompt for i in range(len(rows))])
        with timer("learner"), s.engines_asleep():
            metrics.update({f"train/{k}": v for k, v in s.learner.train_step(batch).items()})
        with timer("sync"):
            s.sync_weights(step)
        metrics.update(timer.metrics(), **{"perf/step_s": time.time() - t0,
                                           "perf/tokens_per_s": batch.loss_tokens / (time.time() - t0)})
        run.log(step, metrics)
        if cfg.eval.interval and step % cfg.eval.interval == 0 and step != cfg.run.steps:
            s.evaluate(run, step)
        if cfg.checkpoint.interval and step % cfg.checkpoint.interval == 0:
            s.checkpoint(run, step)
    end_acc = s.evaluate(run, cfg.run.steps)
    s.learner.call("save_hf", str(run.final), cfg.model.path)
    summary = {"run": cfg.run.name, "algorithm": cfg.algorithm, "loss": cfg.loss.name, "steps": cfg.run.steps,
               "start_eval_accuracy": start_acc, "end_eval_accuracy": end_acc, "final_model": str(run.final)}
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
        self.fmt, self.train_data, self.eval_rows = inputs.fmt, inputs.train, inputs.eval_rows
        self.train = PromptStream(self.train_data.rows, cfg.run.seed)
        start_ray(cfg)
        self.verifier = get_verifier(cfg.eval.verifier)
        needs = build_configured_loss(cfg).needs
        self.request = score_request(needs, rc.temperature)
        self.sampling = sampling_spec(cfg, return_topk=needs.student_topk)
        self.eval_sampling = SamplingSpec(max_new_tokens=cfg.eval.max_new_tokens or rc.max_new_tokens,
                                          temperature=cfg.eval.temperature, top_p=cfg.eval.top_p, seed=cfg.run.seed,
                                          behaviour_logprobs=False)
        self.placement = Placement(cfg, cfg.cluster.placement_timeout_s)
        self.learner = self.rollouts = self.teachers = None
        try:
            self._start_actors(inputs.tokenizer.pad_token_id)
        except BaseException:
            self.shutdown()  # a half-started run must not leave actors holding the cluster
            raise

    def _start_actors(self, pad_id: int) -> None:
        cfg, rc, placement = self.cfg, self.cfg.rollout, self.placement
        rows_per_step = rc.prompts_per_step * (1 if cfg.algorithm == "sft" else rc.samples_per_prompt)
        self.learner = LearnerGroup(cfg, rows_per_step, placement)  # first: its ranks rendezvous while the rest load
        self.rollouts = RolloutGroup.start(cfg, placement, self.sampling, pad_id)
        self.teachers = TeacherGroup.start(cfg, placement) if cfg.algorithm == "opd" else None
        # Wait for every actor to load, so step 1's stage timings measure work, not start-up.
        ray.get([a.__ray_ready__.remote() for a in self._actors()])
        targets = list(self.rollouts.actors)
        kinds = [rc.engine] * len(targets)
        if self.teachers and cfg.teacher.live:  # a live self-teacher follows the student
            targets += self.teachers.actors
            kinds += ["hf"] * len(self.teachers.actors)
        connect_weight_sync(cfg, self.learner, targets, kinds)

    def _actors(self) -> list:
        return [a for group in (self.learner and self.learner.ranks, self.rollouts and self.rollouts.actors,
                                self.teachers and self.teachers.actors) for a in group or []]

    def sync_weights(self, version: int) -> None:
        self.learner.call("sync_weights", version)

    @contextmanager
    def engines_asleep(self):
        """Colocated engines give the learner their GPU memory for its step."""
        if self.cfg.cluster.colocate:
            self.rollouts.sleep()
        try:
            yield
        finally:
            if self.cfg.cluster.colocate:
                self.rollouts.wake_up()

    def shutdown(self) -> None:
        """Free this run's actors and CPUs (a Ray session may outlive the run: tests, notebooks)."""
        try:
            if self.learner:  # closes the transfer groups on both ends; bounded: a hung rank must not hang exit
                ray.get([r.close_weight_sync.remote() for r in self.learner.ranks], timeout=60)
        except Exception:  # noqa: BLE001 - an actor already dead must not hide the run's own error
            pass
        for actor in self._actors():
            ray.kill(actor)
        self.placement.remove()

    def rewards(self, rollout, rows) -> list[float]:
        return [self.verifier(self.fmt.text(c), r["answer"]) for c, r in zip(rollout.completions(), rows)]

    def evaluate(self, run: RunDir, step: int) -> float | None:
        if not self.eval_rows:
            return None
        t = time.time()
        rollout = self.rollouts.generate([self.fmt.student(r) for r in self.eval_rows], self.eval_sampling)
        acc = sum(self.rewards(rollout, self.eval_rows)) / len(self.eval_rows)
        run.log(step, {"eval/accuracy": acc, "time/eval_s": time.time() - t})
        return acc

    def checkpoint(self, run: RunDir, step: int) -> None:
        state = {"step": step, "data": self.train.state_dict()}
        self.learner.call("save_checkpoint", str(run.checkpoints), f"step{step}", state)
        run.prune_checkpoints()

    def resume(self, run: RunDir) -> int:
        dirs = run.checkpoint_dirs()
        if not (self.cfg.run.resume and dirs):
            return 0
        state = self.learner.call("load_checkpoint", str(run.checkpoints), dirs[-1].name)
        self.train.load_state_dict(state["data"])
        self.sync_weights(state["step"])
        return state["step"]
