"""Rollout engine on Hugging Face transformers: batched sampling with a KV cache, on CPU or GPU.

This is the engine for local debugging, tests and CPU demos; `actors/vllm_engine.py` implements the
same interface on vLLM for GPU clusters. Both receive weights through opd/weight_sync.
"""
from __future__ import annotations

import torch

from actors.kinds import ActorCall, EngineKind, EngineStart, register
from opd.contracts import Rollout, SamplingSpec
from opd.modeling import actor_device, load_model
from opd.sampling import generate
from opd.tokens import special_ids
from opd.weight_sync.gloo import HFModelReceiver


class HFEngine(HFModelReceiver):
    """Rollout engine. A plain class: Ray wraps it as an actor, tests build it in-process."""

    def __init__(self, model_path: str, dtype: str = "float32", seed: int = 0, threads: int = 0,
                 use_gpu: bool = False, trust_remote_code: bool = False):
        self.device = actor_device(use_gpu)
        self.model, tok = load_model(model_path, dtype, self.device, threads, trust_remote_code)
        ids = special_ids(tok, model_path)
        self.pad_id, self.eos_id = ids.pad, ids.eos
        self.weight_version = 0
        self.gen = torch.Generator(self.device).manual_seed(seed)

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> Rollout:
        return generate(self.model, prompts, spec, self.gen, self.pad_id, self.eos_id, self.weight_version)

    def get_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.named_parameters()}

    def sleep(self) -> None:  # colocation hooks: an HF engine keeps its memory
        pass

    def wake_up(self, tags=None) -> None:
        pass


def start(s: EngineStart) -> ActorCall:
    return ActorCall(HFEngine, (s.path, s.dtype), dict(seed=s.seed, threads=s.threads, use_gpu=s.use_gpu,
                                                      trust_remote_code=s.trust_remote_code))


register(EngineKind("hf", start, receiver="hf"))
