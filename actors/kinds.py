"""Rollout-engine kinds as a registry: `rollout.engine` names an entry, and the entry says everything the
rest of the system asks about a kind: how one of its engines starts, which weight-sync receiver it is,
and whether it is a vLLM engine (the `rollout.vllm` keys apply: the GPUs one engine takes, the most
student top-k it returns, the context it samples in). No other module tests an engine kind by its name.

The project's kinds register themselves where their classes are: hf in actors/hf_engine.py, vllm in
actors/vllm_engine.py; `actors/__init__.py` imports both, so the registry is full whenever any actors
module is imported. Adding a kind is one file (the engine class, implementing actors/engine.py's
RolloutEngine, and a `register(EngineKind(...))` call) and one line in that import (docs/design.md §7;
tests/test_engine_kinds.py registers a throwaway kind).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from opd.actor_call import ActorCall  # a kind's module imports it from here, with the rest it registers with
from opd.contracts import SamplingSpec
from opd.registry import Registry

# The weight-sync receivers the learner knows (launch/cluster.py:connect_weight_sync): an HF model in the
# engine's process, which takes gloo in model.dtype (opd/weight_sync/gloo.py: HFModelReceiver), or a vLLM
# engine's workers, which take sync.backend in rollout.vllm.dtype (opd/vllm_llm.py: LLMWeightReceiver).
RECEIVERS = ("hf", "vllm")


@dataclass(frozen=True)
class EngineStart:
    """What the launcher resolved for one rollout engine, from the manifest (launch/cluster.py)."""
    path: str                     # model.path: the student's weights, which the learner then keeps in sync
    dtype: str                    # model.dtype
    seed: int                     # distinct per engine
    threads: int                  # cluster.threads_per_actor
    use_gpu: bool
    trust_remote_code: bool       # model.trust_remote_code
    sampling: SamplingSpec        # the training rollouts' sampling (a vLLM engine fixes its logprobs mode from it)
    pad_id: int
    llm: Any = None               # the vLLM engine's opd.vllm_llm.LLMSpec, for a kind with `vllm: True`


@dataclass(frozen=True)
class EngineKind:
    name: str                                    # the value of rollout.engine
    start: Callable[[EngineStart], ActorCall]    # how one of its engines starts
    receiver: str = "hf"                         # its weight-sync receiver, one of RECEIVERS
    vllm: bool = False             # a vLLM engine: rollout.vllm applies (tensor_parallel_size GPUs an engine,
    #                                max_logprobs student top-k, max_model_len, an exact logprobs mode)

    def __post_init__(self):
        if self.receiver not in RECEIVERS:
            raise ValueError(f"engine kind {self.name!r}: receiver {self.receiver!r} is not one of {list(RECEIVERS)}")

    def gpus(self, rc) -> int:
        """GPUs one engine of this kind takes (rollout config `rc`), when the run has GPUs."""
        return rc.vllm.tensor_parallel_size if self.vllm else 1

    def max_topk(self, rc) -> Optional[int]:
        """The most student top-k ids one of its engines returns per position; None: no limit."""
        return rc.vllm.max_logprobs if self.vllm else None


ENGINE_KINDS: Registry[EngineKind] = Registry("rollout.engine", "rollout engine kind")
register = ENGINE_KINDS.add
engine_kind = ENGINE_KINDS.lookup
