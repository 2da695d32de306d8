"""Ray: start or join it, start the rollout, teacher and learner actors, fan calls out to them,
and wire weight sync between them.

The actor classes are plain (HFEngine, VLLMEngine, HFTeacher, VLLMTeacher, LearnerWorker); this
file is the only place that knows they run under Ray. Where they run is launch/placement.py.
"""
from __future__ import annotations

import ray

from launch.config import ExperimentConfig, VLLMConfig
from launch.placement import Placement
from opd.contracts import (Rollout, SamplingSpec, ScoreRequest, TeacherScores, TrainBatch, concat_rollouts,
                           concat_scores)
from opd.weight_sync import free_port

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


@ray.remote
class _Host:
    """Tells the driver where the learner's rank 0 lives (its IP and a free port for DeepSpeed's
    rendezvous) on any cluster. Weight sync opens its own port later, from rank 0 itself."""
    def address(self):
        return ray.util.get_node_ip_address(), free_port()


def _split(n: int, parts: int) -> list[slice]:
    bounds = [round(i * n / parts) for i in range(parts + 1)]
    return [slice(a, b) for a, b in zip(bounds, bounds[1:])]


def llm_spec(cfg: ExperimentConfig, side: str, path: str, seed: int, sync_backend=None):
    """The vLLM engine for one side (rollout / teacher), from its manifest section."""
    from opd.vllm_llm import LLMSpec
    v: VLLMConfig = getattr(cfg, side).vllm
    shared = cfg.cluster.colocate and side == "rollout"  # the learner needs the rest of the GPU
    return LLMSpec(model=path, dtype=v.dtype or cfg.model.dtype, tensor_parallel_size=v.tensor_parallel_size,
                   max_model_len=v.max_model_len,
                   gpu_memory_utilization=v.gpu_memory_utilization or (0.4 if shared else 0.85),
                   kv_cache_memory_gb=v.kv_cache_memory_gb, max_logprobs=v.max_logprobs,
                   enforce_eager=v.enforce_eager, seed=seed, sync_backend=sync_backend, sleep_mode=shared)


def sync_backend(cfg: ExperimentConfig) -> str:
    """sync.backend for vLLM receivers (HF receivers always use gloo)."""
    if cfg.sync.backend != "auto":
        return cfg.sync.backend
    return "gloo" if cfg.cluster.num_gpus == 0 else "ipc" if cfg.cluster.colocate else "nccl"


class RolloutGroup:
    def __init__(self, actors: list):
        self.actors = actors

    @classmethod
    def start(cls, cfg: ExperimentConfig, placement: Placement, sampling: SamplingSpec, pad_id: int):
        gpu = cfg.cluster.num_gpus > 0
        actors = []
        for i, slot in enumerate(placement.layout.rollout):
            opts = placement.options(slot)
            if cfg.rollout.engine == "vllm":
                from actors.vllm_engine import VLLMEngine
                spec = llm_spec(cfg, "rollout", cfg.model.path, cfg.run.seed + i, sync_backend(cfg))
                actors.append(ray.remote(VLLMEngine).options(**opts).remote(spec, sampling, pad_id))
            else:
                from actors.hf_engine import HFEngine
                actors.append(ray.remote(HFEngine).options(**opts).remote(
                    cfg.model.path, cfg.model.dtype, seed=cfg.run.seed + i, threads=cfg.cluster.threads_per_actor,
                    use_gpu=gpu))
        return cls(actors)

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> Rollout:
        refs = [a.generate.remote(prompts[s], spec) for a, s in zip(self.actors, _split(len(prompts), len(self.actors)))]
        return concat_rollouts(ray.get(refs))

    def sleep(self) -> None:
        ray.get([a.sleep.remote() for a in self.actors])

    def wake_up(self) -> None:
        ray.get([a.wake_up.remote() for a in self.actors])


class TeacherGroup:
    def __init__(self, actors: list):
        self.actors = actors

    @classmethod
    def start(cls, cfg: ExperimentConfig, placement: Placement):
        tc = cfg.teacher
        path = cfg.model.path if tc.kind == "self" else tc.path
        actors = []
        for i, slot in enumerate(placement.layout.teacher):
            opts = placement.options(slot)
            if tc.kind == "vllm":
                from teachers.vllm_teacher import VLLMTeacher
                spec = llm_spec(cfg, "teacher", path, cfg.run.seed + i)
                actors.append(ray.remote(VLLMTeacher).options(**opts).remote(spec, student_path=cfg.model.path))
            else:
                from teachers.hf_teacher import HFTeacher
                actors.append(ray.remote(HFTeacher).options(**opts).remote(
                    path, cfg.model.dtype, student_path=cfg.model.path, threads=cfg.cluster.threads_per_actor,
                    use_gpu=cfg.cluster.num_gpus > 0))
        return cls(actors)

    def score(self, teacher_prompts, rollout: Rollout, request: ScoreRequest) -> TeacherScores:
        def args(s):
            topk = None if rollout.student_topk_ids is None else rollout.student_topk_ids[s]
            return teacher_prompts[s], rollout.completion_ids[s], rollout.completion_mask[s], request, topk
        refs = [a.score.remote(*args(s)) for a, s in zip(self.actors, _split(len(rollout), len(self.actors)))]
        return concat_scores(ray.get(refs))


class LearnerGroup:
    def __init__(self, cfg, rows_per_step: int, placement: Placement):
        from learner.worker import LearnerWorker
        opts = [placement.options(slot) for slot in placement.layout.learner]
        n = len(opts)
        host = _Host.options(num_cpus=0, scheduling_strategy=opts[0]["scheduling_strategy"]).remote()
        addr, port = ray.get(host.address.remote())
        ray.kill(host)
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


def connect_weight_sync(cfg: ExperimentConfig, learner: LearnerGroup, targets: list, kinds: list[str]) -> None:
    """Open the learner's transfer groups to every receiver: HF receivers over gloo, vLLM receivers
    over sync.backend, each in the dtype it holds its weights in."""
    workers = ray.get([t.weight_sync_workers.remote() for t in targets])
    groups = []
    for kind, backend, dtype in (("hf", "gloo", cfg.model.dtype),
                                 ("vllm", sync_backend(cfg), cfg.rollout.vllm.dtype or cfg.model.dtype)):
        members = [i for i, k in enumerate(kinds) if k == kind]
        if members:
            groups.append({"backend": backend, "dtype": dtype, "targets": [targets[i] for i in members],
                           "workers": [workers[i] for i in members]})
    learner.call("init_weight_sync", groups)
