"""Ray: start or join it, start the rollout, teacher and learner actors, fan calls out to them,
and wire weight sync between them.

The actor classes are plain (HFEngine, VLLMEngine, HFTeacher, VLLMTeacher, LearnerWorker); this
file is the only place that knows they run under Ray. Where they run is launch/placement.py.
"""
from __future__ import annotations

import os
import random
import socket
from dataclasses import replace
from typing import Callable, Optional

import ray
import torch

from actors.kinds import EngineStart, engine_kind
from launch.capabilities import teacher_head_path
from launch.config import ExperimentConfig, ManifestError, VLLMConfig
from launch.placement import Placement, Slot
from launch.remote import ActorPool, Pending, first_line, gather
from opd.actor_call import ActorCall
from opd.batching import spread_by_tokens
from opd.contracts import (Rollout, SamplingSpec, ScoreRequest, TeacherScores, TrainBatch, concat_rollouts,
                           concat_scores)
from opd.env import CHILD_ENV, openmp_env
from opd.weight_sync.transports import default_transport
from teachers.kinds import TeacherStart, teacher_kind


def start_ray(cfg) -> None:
    """Local mode: a private Ray on loopback (nothing listens on the machine's network address) with
    no dashboard unless cluster.dashboard. Ray mode: join the cluster at cluster.address."""
    if ray.is_initialized():
        return
    env = dict(CHILD_ENV, **openmp_env(), **({"DS_ACCELERATOR": "cpu"} if cfg.cluster.num_gpus == 0 else {}))
    if cfg.cluster.mode == "local":
        # Ray maps a 127.0.0.1 node address back to the machine's network address unless clusters are
        # off, which is its own default on macOS and Windows; with it off every Ray server listens on
        # loopback only (tests/test_faults.py checks the sockets).
        from ray._private import ray_constants
        ray_constants.ENABLE_RAY_CLUSTER = False
        # The actors inherit this process's environment through the raylet it starts. A runtime_env would
        # start every worker through Ray's setup_worker.py, a second Python start: 1.2 s against 0.75 s
        # an actor here (docs/benchmarks.md, "A run's start-up").
        os.environ.update(env)
        ray.init(num_cpus=cfg.cluster.num_cpus, num_gpus=cfg.cluster.num_gpus, include_dashboard=cfg.cluster.dashboard,
                 _node_ip_address="127.0.0.1", log_to_driver=True, configure_logging=False)
        return
    try:  # check_address(cfg) has answered an unreachable host:port already (launch/driver.py)
        ray.init(address=cfg.cluster.address or "auto", runtime_env={"env_vars": env})
    except ConnectionError as e:
        raise ManifestError(f"cluster.address: {first_line(e)}") from None


def check_address(cfg) -> None:
    """Ray retries an unreachable head for minutes without a word; a plain TCP connect answers within
    cluster.connect_timeout_s. Only an explicit host:port is checked ("auto" finds a local head)."""
    address = (cfg.cluster.address or "auto").removeprefix("ray://")
    if cfg.cluster.mode != "ray" or address == "auto":
        return
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        raise ManifestError(f"cluster.address: {cfg.cluster.address!r} is not host:port (e.g. 10.0.0.1:6379) or auto")
    try:
        socket.create_connection((host, int(port)), timeout=cfg.cluster.connect_timeout_s).close()
    except OSError as e:
        raise ManifestError(f"cluster.address: no Ray head answers at {host}:{port} within "
                            f"cluster.connect_timeout_s = {cfg.cluster.connect_timeout_s:g}s "
                            f"({e.strerror or type(e).__name__}); start it with `ray start --head` or fix the address") \
            from None


def derived_seed(*parts) -> int:
    """A seed that is a pure function of its parts (run seed, step, actor index): whatever ran before,
    was retried or was resumed, the same step samples the same tokens, so no generator state is saved."""
    return random.Random("/".join(map(str, parts))).randrange(1 << 31)


@ray.remote(num_cpus=0)
class _MeetingPoint:
    """A multi-rank learner's rendezvous mailbox: rank 0 posts the address of the store it bound (on a port
    the OS picked, learner/worker.py: join_process_group), the other ranks wait for it."""
    def __init__(self):
        import asyncio
        self.posted = asyncio.Event()  # async methods: a waiting rank does not block the post
        self.address: tuple[str, int] = ("", 0)

    async def post(self, host: str, port: int) -> None:
        self.address = (host, port)
        self.posted.set()

    async def wait(self) -> tuple[str, int]:
        await self.posted.wait()
        return self.address


class RayMeeting:
    """learner/worker.py's Meeting over a _MeetingPoint actor (the worker does not see Ray)."""
    def __init__(self, point, timeout_s: float):
        self.point, self.timeout_s = point, timeout_s

    def post(self, host: str, port: int) -> None:
        ray.get(self.point.post.remote(host, port), timeout=self.timeout_s)

    def wait(self) -> tuple[str, int]:
        return ray.get(self.point.wait.remote(), timeout=self.timeout_s)


def _split(n: int, parts: int) -> list[slice]:
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def llm_spec(cfg: ExperimentConfig, side: str, path: str, seed: int, sync_backend=None, teacher=None):
    """The vLLM engine for one side (rollout / teacher), from its manifest section (`teacher`: which
    TeacherConfig, default `teacher:`)."""
    from opd.vllm_llm import LLMSpec
    tc = teacher or cfg.teacher
    v: VLLMConfig = cfg.rollout.vllm if side == "rollout" else tc.vllm
    shared = cfg.cluster.colocate and side == "rollout"  # the learner needs the rest of the GPU
    return LLMSpec(model=path, dtype=v.dtype or cfg.model.dtype, tensor_parallel_size=v.tensor_parallel_size,
                   max_model_len=v.max_model_len,
                   gpu_memory_utilization=v.gpu_memory_utilization or (0.4 if shared else 0.85),
                   kv_cache_memory_gb=v.kv_cache_memory_gb, max_logprobs=v.max_logprobs,
                   enforce_eager=v.enforce_eager, seed=seed, sync_backend=sync_backend, sleep_mode=shared,
                   trust_remote_code=(cfg.model if side == "rollout" else tc).trust_remote_code)


def teacher_start(cfg: ExperimentConfig, tc, seed: int) -> TeacherStart:
    """What one actor of teacher `tc` starts from (teachers/kinds.py: its kind's `start` builds it)."""
    kind = teacher_kind(tc.kind)
    path = kind.weights_path(cfg, tc)
    return TeacherStart(path=path, student_path=cfg.model.path, dtype=cfg.model.dtype, seed=seed,
                        threads=cfg.cluster.threads_per_actor, use_gpu=cfg.cluster.num_gpus > 0,
                        trust_remote_code=(cfg.model if kind.student_weights else tc).trust_remote_code,
                        max_tokens_per_batch=tc.max_tokens_per_batch,
                        llm=llm_spec(cfg, "teacher", path, seed, teacher=tc) if kind.vllm else None)


def engine_start(cfg: ExperimentConfig, seed: int, sampling: SamplingSpec, pad_id: int) -> EngineStart:
    """What one rollout engine starts from (actors/kinds.py: its kind's `start` builds it)."""
    kind = engine_kind(cfg.rollout.engine)
    return EngineStart(path=cfg.model.path, dtype=cfg.model.dtype, seed=seed, threads=cfg.cluster.threads_per_actor,
                       use_gpu=cfg.cluster.num_gpus > 0, trust_remote_code=cfg.model.trust_remote_code,
                       sampling=sampling, pad_id=pad_id,
                       llm=llm_spec(cfg, "rollout", cfg.model.path, seed, sync_backend(cfg)) if kind.vllm else None)


def sync_backend(cfg: ExperimentConfig) -> str:
    """sync.backend for vLLM receivers (HF receivers always use gloo)."""
    if cfg.sync.backend != "auto":
        return cfg.sync.backend
    return default_transport(cfg.cluster.num_gpus > 0, cfg.cluster.colocate).name


class EngineGroup:
    """The actors of one role that sample or score (rollout engines, one teacher's actors), one per
    placement slot, in an ActorPool: a lost actor is replaced and its share of the call sent again."""

    def __init__(self, pool: ActorPool):
        self.pool = pool

    @property
    def actors(self) -> list:
        return self.pool.actors

    @classmethod
    def _start(cls, cfg: ExperimentConfig, role: str, placement: Placement, slots: list[Slot],
               call: Callable[[int], ActorCall]):
        """Actor i in slots[i], as its kind's registry entry says it starts (`call(i)`)."""
        def make(i: int):
            c = call(i)
            return ray.remote(c.cls).options(**placement.options(slots[i])).remote(*c.args, **c.kwargs)
        return cls(ActorPool(role, make, len(slots), cfg.cluster.call_timeout_s))

    def _fan_out(self, method: str, items: list, spec: SamplingSpec) -> Pending:
        """Start `method(items[part], spec)` on every actor and return at once: actor i takes the i-th of
        near-equal runs of `items` in order, with a seed derived from (spec.seed, i), so what each row
        samples does not depend on which actor ran before or was replaced."""
        parts = _split(len(items), len(self.actors))
        specs = [spec if spec.seed is None else replace(spec, seed=derived_seed(spec.seed, i)) for i in range(len(parts))]
        return self.pool.submit(method, [(items[s], sp) for s, sp in zip(parts, specs)])


class RolloutGroup(EngineGroup):
    """Rollout engines, one per placement slot; a lost engine is replaced and its prompts retried."""

    @classmethod
    def start(cls, cfg: ExperimentConfig, placement: Placement, sampling: SamplingSpec, pad_id: int):
        kind = engine_kind(cfg.rollout.engine)
        return cls._start(cfg, "rollout engine", placement, placement.layout.rollout,
                          lambda i: kind.start(engine_start(cfg, cfg.run.seed + i, sampling, pad_id)))

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> Rollout:
        """Engine i samples its slice with a seed derived from (spec.seed, i)."""
        return self.collect(self.submit(prompts, spec))

    def submit(self, prompts: list[list[int]], spec: SamplingSpec) -> Pending:
        """Start generate() on every engine and return at once. Each engine is a Ray actor running one
        method at a time, so a weight sync sent to it later waits until this generation is done."""
        return self._fan_out("generate", prompts, spec)

    def collect(self, pending: Pending, retry: bool = True) -> Optional[Rollout]:
        """The submitted rollout. A lost engine is replaced; with retry its slice is sampled again (same
        seed), without, the answer is None (see ActorPool.collect)."""
        parts = self.pool.collect(pending, retry)
        return None if parts is None else concat_rollouts(parts)

    def sleep(self) -> None:
        self.pool.call("sleep", [()] * len(self.actors))

    def wake_up(self) -> None:
        self.pool.call("wake_up", [()] * len(self.actors))


class TeacherGroup(EngineGroup):
    """Teachers, one per placement slot; a lost teacher is replaced and its rows scored again."""

    @classmethod
    def start(cls, cfg: ExperimentConfig, placement: Placement, index: int = 0, tc=None, role: str = "teacher"):
        """The teachers of one TeacherConfig (`tc`, default `teacher:`), in layout.teacher_groups[index]."""
        tc = tc or cfg.teacher
        kind = teacher_kind(tc.kind)
        first = sum(len(g) for g in placement.layout.teacher_groups[:index])  # seeds differ across teachers
        return cls._start(cfg, role, placement, placement.layout.teacher_groups[index],
                          lambda i: kind.start(teacher_start(cfg, tc, cfg.run.seed + first + i)))

    def generate(self, teacher_prompts: list[list[int]], spec: SamplingSpec) -> Rollout:
        """Completions the teachers write from their own prompts (reference rows for an SFT mix)."""
        return concat_rollouts(self.pool.collect(self._fan_out("generate", teacher_prompts, spec)))

    def score(self, teacher_prompts, rollout: Rollout, request: ScoreRequest) -> TeacherScores:
        def args(s):
            topk = None if rollout.student_topk_ids is None else rollout.student_topk_ids[s]
            return teacher_prompts[s], rollout.completion_ids[s], rollout.completion_mask[s], request, topk
        return concat_scores(self.pool.call("score", [args(s) for s in _split(len(rollout), self._share(len(rollout)))]))

    def submit_score(self, teacher_prompts, rollout: Pending, request: ScoreRequest,
                     rows: Optional[list[int]] = None) -> Pending:
        """Score a rollout still being generated: each teacher gets the engines' reply references and starts
        when they exist, without the rollout passing through the driver. collect_score() waits.
        `rows`: the rollout rows teacher_prompts belong to (default all, in order)."""
        parts = [ref for _, ref in rollout.calls]
        rows = list(range(len(teacher_prompts))) if rows is None else rows
        return self.pool.submit("score_rollout", [(teacher_prompts[s], request, rows[s], *parts)
                                                  for s in _split(len(teacher_prompts), self._share(len(rows)))])

    def collect_score(self, pending: Pending) -> TeacherScores:
        return concat_scores(self.pool.collect(pending))

    def _share(self, rows: int) -> int:
        """How many teachers get rows: all, unless a routed teacher has fewer rows than actors (none gets 0)."""
        return max(1, min(rows, len(self.actors)))


class LearnerGroup:
    def __init__(self, cfg, rows_per_step: int, placement: Placement):
        from learner.worker import LearnerWorker
        opts = [placement.options(slot) for slot in placement.layout.learner]
        n = len(opts)
        self.point, meeting = None, None  # one rank: it rendezvouses with itself, on a loopback port
        if n > 1:  # the ranks meet through a mailbox actor (zero CPUs), which lives as long as this group
            self.point = _MeetingPoint.remote()
            meeting = RayMeeting(self.point, cfg.cluster.call_timeout_s)
        remote = ray.remote(LearnerWorker)
        head = teacher_head_path(cfg)
        self.ranks = [remote.options(**o).remote(cfg, r, n, rows_per_step, head, meeting) for r, o in enumerate(opts)]
        self.timeout_s = cfg.cluster.call_timeout_s
        self.updates, self.reduction = cfg.learner.updates_per_step, cfg.loss.reduction
        self.by_tokens = cfg.learner.max_tokens_per_micro_batch is not None

    def train_step(self, batch: TrainBatch) -> dict[str, float]:
        return self.collect(self.submit_step(batch))

    def submit_step(self, batch: TrainBatch) -> list:
        """Start train_step on every rank, each on its share of the rows, and return at once. With
        learner.updates_per_step n, update j takes the j-th of n equal runs of rows in order (slime's
        mini-batches), split over the ranks like a whole step, so what an update holds does not depend on
        the rank count; each rank gets its parts in update order, with every update's global denominators."""
        size = len(batch) // self.updates
        parts = [list(range(j * size, (j + 1) * size)) for j in range(self.updates)]
        counts = [batch.denominators(self.reduction, slice(p[0], p[-1] + 1)) for p in parts]
        counts_arg = counts[0] if self.updates == 1 else counts
        if len(self.ranks) == 1:
            return self._submit("train_step", [(batch, counts_arg)])
        if not self.by_tokens:
            shards = [batch.select([i for p in parts for i in p[s]]) for s in _split(size, len(self.ranks))]
            return self._submit("train_step", [(sh, counts_arg) for sh in shards])
        # learner.max_tokens_per_micro_batch: each update's rows spread so every rank gets near-equal tokens
        tokens = (batch.completion_mask.sum(-1) + torch.tensor([len(p) for p in batch.prompt_ids])).tolist()
        spread = [[[p[i] for i in rows] for rows in spread_by_tokens([tokens[i] for i in p], len(self.ranks))]
                  for p in parts]  # [update][rank] -> batch rows
        return self._submit("train_step", [(batch.select([i for u in spread for i in u[r]]), counts_arg,
                                            [len(u[r]) for u in spread]) for r in range(len(self.ranks))])

    def submit_chunk(self, chunk: TrainBatch, counts: tuple[int, int], last: bool) -> list:
        """Start accumulate (a pipelined step's chunk, launch/pipeline.py) on every rank, each on its share of
        the chunk's rows as submit_step splits a step (in order, or by tokens), with the whole step's
        denominators `counts`; `last`: the step's final chunk. Calls to a rank run in the order sent, so
        the chunks queue behind each other and apply_step behind the last."""
        if len(self.ranks) == 1:
            shards = [chunk]
        elif not self.by_tokens:
            shards = [chunk.select(list(range(len(chunk)))[s]) for s in _split(len(chunk), len(self.ranks))]
        else:
            tokens = (chunk.completion_mask.sum(-1) + torch.tensor([len(p) for p in chunk.prompt_ids])).tolist()
            shards = [chunk.select(rows) for rows in spread_by_tokens(tokens, len(self.ranks))]
        return self._submit("accumulate", [(sh, counts, last) for sh in shards])

    def submit(self, method: str, *args) -> list:
        """Start a collective method on every rank and return at once. Calls from the driver to a
        rank run in the order they were sent, so one sent after submit_step runs right behind it."""
        return self._submit(method, [args] * len(self.ranks))

    def collect(self, calls: list):
        """Rank 0's answer to submitted calls (see _submit for failures)."""
        return gather(calls, self.timeout_s)[0]

    def export_weights(self):
        """ObjectRef to rank 0's full weights (every rank takes part in the gather)."""
        refs = [w.export_weights.remote() for w in self.ranks]
        ray.wait(refs, num_returns=len(refs))
        return refs[0]

    def call(self, method: str, *args):
        """Run a collective method on every rank; rank 0's answer."""
        return self.collect(self.submit(method, *args))

    def _submit(self, method: str, args: list[tuple]) -> list:
        """(name, reference) per rank. The ranks move in lockstep, so a rank cannot be replaced mid-run:
        at collect, the first rank that died, raised or missed the deadline stops the run, by name."""
        return [(f"learner rank {r}.{method}", getattr(w, method).remote(*a))
                for r, (w, a) in enumerate(zip(self.ranks, args))]


def connect_weight_sync(cfg: ExperimentConfig, learner: LearnerGroup, targets: list, kinds: list[str]) -> None:
    """Open the learner's transfer groups to every receiver: HF receivers over gloo, vLLM receivers
    over sync.backend, each in the dtype it holds its weights in (`kinds`: each target's receiver,
    actors/kinds.py:RECEIVERS)."""
    workers = gather([(f"sync receiver {i}.weight_sync_workers", t.weight_sync_workers.remote())
                      for i, t in enumerate(targets)], cfg.cluster.call_timeout_s)
    groups = []
    for kind, backend, dtype in (("hf", "gloo", cfg.model.dtype),
                                 ("vllm", sync_backend(cfg), cfg.rollout.vllm.dtype or cfg.model.dtype)):
        members = [i for i, k in enumerate(kinds) if k == kind]
        if members:
            groups.append({"backend": backend, "dtype": dtype, "targets": [targets[i] for i in members],
                           "workers": [workers[i] for i in members]})
    learner.call("init_weight_sync", groups)
