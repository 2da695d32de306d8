"""The live session of a run: data, prompts, actors and the loss's needs, built once from the manifest,
and the state the loop moves forward (the weight version the engines hold, the step whose weights they
lack), changed only through its methods."""
from __future__ import annotations

import time
from contextlib import contextmanager
from dataclasses import replace
from typing import Optional

import ray
import torch

from actors.kinds import engine_kind
from launch.batches import score_request, sft_batch
from launch.capabilities import build_configured_loss, check_built_teacher, check_loss
from launch.cluster import LearnerGroup, RolloutGroup, connect_weight_sync, derived_seed, start_ray
from launch.config import ExperimentConfig
from launch.derived import (reference_rows, resolve, resolve_teacher_head_thread, rows_per_step, sampling_spec,
                            threads_per_actor)
from launch.evaluation import Evaluator
from launch.inputs import Inputs
from launch.placement import Placement
from launch.routing import teacher_specs
from launch.teacher_set import TeacherSet
from launch.remote import gather
from launch.run_dir import RunDir
from opd.contracts import SamplingSpec, TrainBatch
from tasks.data import PromptStream
from tasks.verifiers import get_verifier
from teachers.kinds import teacher_kind


class Setup:
    """Data, prompts, actors and the loss's needs, built once from the manifest."""

    def __init__(self, cfg: ExperimentConfig, inputs: Inputs):
        self.cfg, rc = cfg, cfg.rollout
        self.fmt, self.train_data = inputs.fmt, inputs.train
        self.teacher_fmts, self.router = inputs.teacher_fmts, inputs.router
        self.skipped_rows = inputs.skipped_rows
        self.train = PromptStream(self.train_data.rows, cfg.run.seed)
        start_ray(cfg)
        if cfg.cluster.mode == "ray":  # the autos from the nodes (local mode resolved them with the manifest)
            cpus = [n["Resources"].get("CPU", 0) for n in ray.nodes() if n.get("Alive")]
            cores = int(min(cpus)) if cpus else 1
            if cfg.cluster.threads_per_actor == "auto":
                cfg.cluster.threads_per_actor = threads_per_actor(cfg, cores)
            resolve_teacher_head_thread(cfg, cores)
        self.verifier = get_verifier(cfg.eval.verifier, cfg.eval.verify_timeout_s)  # GRPO's rewards
        self.evaluator = Evaluator(inputs.eval_sets, cfg.run.seed, cfg.eval.verify_timeout_s,
                                   named=bool(cfg.eval.sets), stop_ids=inputs.special.stop)
        needs = build_configured_loss(cfg).needs
        self.specs = teacher_specs(cfg) if cfg.algorithm == "opd" else []
        if any(t.config.full_vocab_transport == "auto" for t in self.specs):
            check_loss(cfg)  # `auto` left open by a check made before an earlier stage wrote the teacher
            resolve(cfg)
        self.requests = [score_request(needs, rc.temperature, t.config.full_vocab_transport,
                                       teacher_kind(t.config.kind).student_weights)
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
        kinds = [engine_kind(self.cfg.rollout.engine).receiver] * len(targets)
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

    def trained(self, step: int) -> None:
        """The learner took `step`: it holds weights the engines lack until a sync."""
        self.unsent = step

    def synced(self, version: int) -> None:
        """The engines hold weight version `version` (sent by the learner on its own, or by sync_weights)."""
        self.version, self.unsent = version, None

    def sync_weights(self, version: int) -> None:
        self.learner.call("sync_weights", version)
        self.synced(version)

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
