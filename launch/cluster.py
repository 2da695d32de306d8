"""Ray placement: start or join Ray, place rollout, teacher and learner actors, and fan calls out.

The actor classes are plain (HFEngine, HFTeacher, LearnerWorker); this file is the only place that
knows they run under Ray.
"""
from __future__ import annotations

import socket

import ray
from ray.util.placement_group import placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from opd.contracts import (Rollout, SamplingSpec, ScoreRequest, TeacherScores, TrainBatch, concat_rollouts,
                           concat_scores)

QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TOKENIZERS_PARALLELISM": "false", "PYTHONWARNINGS": "ignore"}


def start_ray(cfg) -> None:
    if ray.is_initialized():
        return
    env = dict(QUIET_ENV, **({"DS_ACCELERATOR": "cpu"} if cfg.cluster.num_gpus == 0 else {}))
    if cfg.cluster.mode == "local":
        ray.init(num_cpus=cfg.cluster.num_cpus, num_gpus=cfg.cluster.num_gpus, include_dashboard=False,
                 log_to_driver=True, configure_logging=False, runtime_env={"env_vars": env})
    else:
        ray.init(address=cfg.cluster.address or "auto", runtime_env={"env_vars": env})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


@ray.remote
class _Host:
    """Tells the driver where the learner's rank 0 lives (its IP and a free port) on any cluster."""
    def address(self):
        return ray.util.get_node_ip_address(), _free_port()


class Placement:
    """One bundle per actor, packed. Local CPU mode shares the machine's CPUs out fractionally
    (Ray's CPU counts are logical); on GPUs each actor gets one GPU."""

    def __init__(self, cfg, n_actors: int):
        gpus = cfg.cluster.num_gpus > 0
        cpus = 1.0 if cfg.cluster.mode == "ray" else cfg.cluster.num_cpus / n_actors
        self.per_actor = {"num_cpus": cpus, "num_gpus": 1 if gpus else 0}
        bundle = {"CPU": cpus, **({"GPU": 1} if gpus else {})}
        self.pg = placement_group([dict(bundle) for _ in range(n_actors)], strategy="PACK")
        ray.get(self.pg.ready())
        self.next = 0

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group
        remove_placement_group(self.pg)

    def options(self) -> dict:
        opts = dict(self.per_actor, scheduling_strategy=PlacementGroupSchedulingStrategy(
            placement_group=self.pg, placement_group_bundle_index=self.next))
        self.next += 1
        return opts


def _split(n: int, parts: int) -> list[slice]:
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


class RolloutGroup:
    def __init__(self, actors: list):
        self.actors = actors

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> Rollout:
        refs = [a.generate.remote(prompts[s], spec) for a, s in zip(self.actors, _split(len(prompts), len(self.actors)))]
        return concat_rollouts(ray.get(refs))


class TeacherGroup:
    def __init__(self, actors: list):
        self.actors = actors

    def score(self, teacher_prompts, rollout: Rollout, request: ScoreRequest) -> TeacherScores:
        def args(s):
            topk = None if rollout.student_topk_ids is None else rollout.student_topk_ids[s]
            return teacher_prompts[s], rollout.completion_ids[s], rollout.completion_mask[s], request, topk
        refs = [a.score.remote(*args(s)) for a, s in zip(self.actors, _split(len(rollout), len(self.actors)))]
        return concat_scores(ray.get(refs))


class LearnerGroup:
    def __init__(self, cfg, rows_per_step: int, placement: Placement):
        from learner.worker import LearnerWorker
        n = cfg.learner.num_ranks
        opts = [placement.options() for _ in range(n)]
        addr, port = ray.get(_Host.options(**opts[0]).remote().address.remote())
        remote = ray.remote(LearnerWorker)
        self.ranks = [remote.options(**o).remote(cfg, r, n, addr, port, rows_per_step) for r, o in enumerate(opts)]

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        shards = [batch.select(list(range(len(batch)))[s]) for s in _split(len(batch), len(self.ranks))]
        return ray.get([w.train_step.remote(sh, batch.loss_tokens) for w, sh in zip(self.ranks, shards)])[0]

    def export_weights(self):
        """ObjectRef to rank 0's full weights (every rank takes part in the gather)."""
        refs = [w.export_weights.remote() for w in self.ranks]
        ray.wait(refs, num_returns=len(refs))
        return refs[0]

    def call(self, method: str, *args):
        """Run a collective method on every rank; rank 0's answer."""
        return ray.get([getattr(w, method).remote(*args) for w in self.ranks])[0]


def sync_weights(weights_ref, targets: list, version: int) -> None:
    """CPU weight sync through the Ray object store: one put on the learner, zero-copy reads by
    every rollout actor (and a live self-teacher). The vLLM path uses vLLM's NCCL transfer instead."""
    ray.get([t.update_weights.remote(weights_ref, version) for t in targets])
