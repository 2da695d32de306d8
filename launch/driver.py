"""The training loop: generate -> score -> learn -> sync, with eval and checkpoints around it."""
from __future__ import annotations

import time
from contextlib import contextmanager

import ray
from transformers import AutoTokenizer

from actors.hf_engine import HFEngine
from launch.batches import PromptFormatter, distill_batch, reward_batch, rollout_stats, score_request, sft_batch
from launch.capabilities import build_configured_loss
from launch.cluster import LearnerGroup, Placement, RolloutGroup, TeacherGroup, start_ray, sync_weights
from launch.config import ExperimentConfig
from launch.run_dir import RunDir
from opd.contracts import SamplingSpec
from tasks.data import PromptStream, load_dataset, template_fields
from tasks.verifiers import get_verifier
from teachers.hf_teacher import HFTeacher


def train(cfg: ExperimentConfig) -> dict:
    run, s = RunDir(cfg), Setup(cfg)
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
            else:
                batch = reward_batch(rollout, rewards, [i // cfg.rollout.samples_per_prompt for i in range(len(rows))])
        with timer("learner"):
            metrics.update({f"train/{k}": v for k, v in s.learner.train_step(batch).items()})
        with timer("sync"):
            sync_weights(s.learner.export_weights(), s.sync_targets, version=step)
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

    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        dc = cfg.data
        start_ray(cfg)
        tok = AutoTokenizer.from_pretrained(cfg.model.path)
        self.fmt = PromptFormatter(tok, dc.prompt_template, cfg.teacher.prompt_template)
        fields = set(template_fields(dc.prompt_template) + template_fields(cfg.teacher.prompt_template))
        self.train_data = self._load(dc.train, fields | {"answer"})
        self.train = PromptStream(self.train_data.rows, cfg.run.seed)
        self.eval_rows = self._load(dc.eval, fields | {"answer"}).rows[:cfg.eval.size] if dc.eval else []
        self.verifier = get_verifier(cfg.eval.verifier)
        needs = build_configured_loss(cfg).needs
        self.request = score_request(needs, cfg.rollout.temperature)
        rc = cfg.rollout
        self.sampling = SamplingSpec(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature,
                                     top_p=rc.top_p, return_topk=needs.student_topk)
        self.eval_sampling = SamplingSpec(max_new_tokens=cfg.eval.max_new_tokens or rc.max_new_tokens,
                                          temperature=cfg.eval.temperature, seed=cfg.run.seed)
        has_teacher = cfg.algorithm == "opd"
        self.teachers = None
        self.placement = placement = Placement(cfg, rc.num_actors + cfg.learner.num_ranks + (cfg.teacher.num_actors if has_teacher else 0))
        rows_per_step = rc.prompts_per_step * (1 if cfg.algorithm == "sft" else rc.samples_per_prompt)
        self.learner = LearnerGroup(cfg, rows_per_step, placement)  # first: its ranks rendezvous while the rest load
        threads = cfg.cluster.threads_per_actor
        engine = ray.remote(HFEngine)
        self.rollouts = RolloutGroup([engine.options(**placement.options()).remote(
            cfg.model.path, cfg.model.dtype, seed=cfg.run.seed + i, threads=threads) for i in range(rc.num_actors)])
        self.sync_targets = list(self.rollouts.actors)
        if has_teacher:
            teacher_path = cfg.model.path if cfg.teacher.kind == "self" else cfg.teacher.path
            actor = ray.remote(HFTeacher)
            self.teachers = TeacherGroup([actor.options(**placement.options()).remote(
                teacher_path, cfg.model.dtype, student_path=cfg.model.path, threads=threads)
                for _ in range(cfg.teacher.num_actors)])
            if cfg.teacher.live:
                self.sync_targets += self.teachers.actors
        # Wait for every actor to load, so step 1's stage timings measure work, not start-up.
        ray.get([a.__ray_ready__.remote() for a in self._actors()])

    def _actors(self) -> list:
        return self.learner.ranks + self.rollouts.actors + (self.teachers.actors if self.teachers else [])

    def shutdown(self) -> None:
        """Free this run's actors and CPUs (a Ray session may outlive the run: tests, notebooks)."""
        for actor in self._actors():
            ray.kill(actor)
        self.placement.remove()

    def _load(self, source: str, required: set[str]):
        dc = self.cfg.data
        ds = load_dataset(source, sorted({dc.prompt_field if f == "prompt" else dc.answer_field if f == "answer"
                                          else f for f in required}))
        for row in ds.rows:  # canonical names, so templates and verifiers say {prompt} / answer
            row["prompt"], row["answer"] = row[dc.prompt_field], row.get(dc.answer_field, "")
        return ds

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
        sync_weights(self.learner.export_weights(), self.sync_targets, version=state["step"])
        return state["step"]
