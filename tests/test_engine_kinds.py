"""Rollout-engine kinds are a registry (actors/kinds.py): a kind registered by a test, in one file and one
`register` call, passes the manifest check with what it declares (the vLLM-only checks skip it), and builds
in-process from what the launcher resolves for its engines, as RolloutGroup.start builds it under Ray."""
from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from actors.hf_engine import HFEngine
from actors.kinds import ENGINE_KINDS, ActorCall, EngineKind, EngineStart, engine_kind, register
from launch.cli import main
from launch.cluster import engine_start
from launch.config import ManifestError
from launch.derived import sampling_spec
from launch.manifest import load_manifest
from launch.placement import layout


class GreedyEngine(HFEngine):
    """A throwaway engine: the HF engine, decoding greedily whatever the spec's temperature."""

    def generate(self, prompts, spec):
        return super().generate(prompts, replace(spec, temperature=0.0))


def start_greedy(s: EngineStart) -> ActorCall:
    return ActorCall(GreedyEngine, (s.path, s.dtype), {"seed": s.seed, "threads": s.threads})


@pytest.fixture
def greedy_kind():
    """Registers the kind for one test, then forgets it."""
    kind = register(EngineKind("greedy", start_greedy, receiver="hf"))
    yield kind
    del ENGINE_KINDS["greedy"]


def test_a_registered_engine_kind_passes_the_manifest_check_and_builds_in_process(greedy_kind, write_manifest):
    # temperature 0.7 with top_p 0.9 has no exact vLLM logprobs mode: refused for rollout.engine: vllm, not
    # for a kind that declares no vLLM
    path = write_manifest(rollout={"engine": "greedy", "num_actors": 2, "temperature": 0.7, "top_p": 0.9})
    cfg = load_manifest(path)
    assert main(["check", str(path)]) == 0  # `opd check` reads the same registry
    assert len(layout(cfg).rollout) == 2 and engine_kind("greedy").gpus(cfg.rollout) == 1
    assert engine_kind("greedy").max_topk(cfg.rollout) is None and greedy_kind.receiver == "hf"

    sampling = sampling_spec(cfg)
    engines = [greedy_kind.start(engine_start(cfg, cfg.run.seed + i, sampling, pad_id=0)).build() for i in range(2)]
    assert all(isinstance(e, GreedyEngine) for e in engines)
    prompts = [[1, 2, 3], [4, 5]]
    a, b = (e.generate(prompts, replace(sampling, seed=i)) for i, e in enumerate(engines))
    assert torch.equal(a.completion_ids, b.completion_ids)  # greedy: the seed changes nothing
    assert a.weight_version == 0 and len(a) == 2


def test_an_unregistered_engine_kind_is_refused_naming_the_registered_ones(write_manifest):
    with pytest.raises(ManifestError, match=r"rollout.engine: 'greedy' is not one of \['hf', 'vllm'\]"):
        load_manifest(write_manifest(rollout={"engine": "greedy"}))
    with pytest.raises(ValueError, match="rollout engine kind 'hf' is registered already"):
        register(EngineKind("hf", ENGINE_KINDS["hf"].start))
    with pytest.raises(ValueError, match=r"receiver 'nccl' is not one of \['hf', 'vllm'\]"):
        EngineKind("mine", start_greedy, receiver="nccl")
