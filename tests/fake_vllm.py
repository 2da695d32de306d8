"""A FAKE `vllm` package for the contract tests' behavioural part: a mock, not vLLM.

A tiny deterministic "model" (`logits_at`) behind classes shaped like vLLM 0.33.0's outputs, with
vLLM's documented semantics re-implemented: log-prob dicts built like
vllm.logprobs.append_logprobs_for_next_position, prompt_logprobs with None first, raw vs processed
logprobs_mode (processed = after temperature and top-p masking). Field and method names are checked
against the real source by test_contract_fakes_use_real_vllm_names; the semantics by
test_contract_vllm_behaviour_our_decisions_rely_on.
"""
from __future__ import annotations

import dataclasses
import sys
import types

import torch

V, EOS = 12, 1

@dataclasses.dataclass
class FakeLogprob:
    logprob: float
    rank: int


@dataclasses.dataclass
class FakeCompletionOutput:
    index: int
    token_ids: list
    logprobs: list
    finish_reason: str
    weight_versions: list


@dataclasses.dataclass
class FakeRequestOutput:
    request_id: str
    prompt_token_ids: list
    prompt_logprobs: list
    outputs: list
    prompt_token_id_logprobs: object = None


@dataclasses.dataclass
class FakeWeightVersionSpan:
    version: str
    start: int
    end: int


@dataclasses.dataclass
class FakeSamplingParams:
    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 16
    logprobs: object = None
    seed: object = None
    detokenize: bool = True
    prompt_logprobs: object = None
    prompt_logprob_token_ids: object = None
    prompt_logprob_start: object = None


def logits_at(ctx: list[int]) -> torch.Tensor:
    """The fake model: fixed pseudo-random logits per context."""
    return torch.randn(V, generator=torch.Generator().manual_seed(hash(tuple(ctx)) % 2**31)) * 2


def vllm_position(lps: torch.Tensor, tok: int, k: int) -> dict:
    """As vllm.logprobs.append_logprobs_for_next_position: the token at its rank, then ranks 1..k."""
    out = {tok: FakeLogprob(float(lps[tok]), int((lps >= lps[tok]).sum()))}
    top = lps.topk(k)
    out.update({int(i): FakeLogprob(float(v), r + 1) for r, (v, i) in enumerate(zip(top.values, top.indices))})
    return out


def top_p_mask(scaled: torch.Tensor, top_p: float) -> torch.Tensor:
    """vLLM's apply_top_k_top_p: logits outside the nucleus become -inf."""
    order = scaled.softmax(-1).sort(descending=True)
    drop = order.values.cumsum(-1) - order.values > top_p
    return scaled.scatter(-1, order.indices, scaled[order.indices].masked_fill(drop, -float("inf")))


class FakeLLM:
    def __init__(self, model, **kwargs):
        self.kwargs, self.calls, self.version = kwargs, [], "default"

    def generate(self, prompts, sampling_params=None, *, use_tqdm=True):
        self.last_params = list(sampling_params)
        return [self._one(str(i), p["prompt_token_ids"], sp)
                for i, (p, sp) in enumerate(zip(prompts, sampling_params))]

    def _one(self, rid, ids, sp):
        prompt_lps, tokens, lps, by_ids = None, [], [], None
        if sp.prompt_logprobs is not None:  # entry j scores prompt token j; the first has no context
            prompt_lps = [None] + [vllm_position(logits_at(ids[:j]).log_softmax(-1), ids[j], sp.prompt_logprobs)
                                   for j in range(1, len(ids))]
        if sp.prompt_logprob_token_ids is not None:  # row r scores prompt token start + r + 1
            by_ids = torch.stack([logits_at(ids[: sp.prompt_logprob_start + r + 1]).log_softmax(-1)[row]
                                  for r, row in enumerate(torch.as_tensor(sp.prompt_logprob_token_ids))])
        gen = torch.Generator().manual_seed(sp.seed or 0)
        raw = self.kwargs["logprobs_mode"] == "raw_logprobs" or sp.temperature == 0
        for _ in range(sp.max_tokens):
            logits = logits_at(ids + tokens)
            processed = top_p_mask(logits / max(sp.temperature, 1e-5), sp.top_p)  # temperature, then top-p
            if sp.temperature == 0:
                tok = int(logits.argmax())
            else:
                tok = int(torch.multinomial(processed.softmax(-1), 1, generator=gen))
            if sp.logprobs is not None:
                lps.append(vllm_position((logits if raw else processed).log_softmax(-1), tok, sp.logprobs))
            tokens.append(tok)
            if tok == EOS:
                break
        done = FakeCompletionOutput(0, tokens, None if sp.logprobs is None else lps,
                                    "stop" if tokens[-1] == EOS else "length",
                                    [FakeWeightVersionSpan(self.version, 0, len(tokens))])
        return FakeRequestOutput(rid, ids, prompt_lps, [done], None if by_ids is None else by_ids.numpy())

    def get_world_size(self, include_dp=True):
        return 1

    def _record(self, name):
        return lambda *a, **k: self.calls.append((name, a, k))

    def __getattr__(self, name):  # weight-sync calls, reset_prefix_cache, collective_rpc: recorded
        if name in FAKE_LLM_RECORDED:
            return self._record(name)
        raise AttributeError(name)

    def update_weight_version(self, new_version):
        self.version = new_version

    def finish_weight_update(self, weight_version=None):
        self.calls.append(("finish_weight_update", (), {"weight_version": weight_version}))
        self.version = weight_version or self.version


FAKE_LLM_RECORDED = {"init_weight_transfer_engine": ["request"], "start_weight_update": [],
                     "update_weights": ["request"], "reset_prefix_cache": [],
                     "collective_rpc": ["method", "kwargs"]}


class FakeTrainerEngine:
    """Does what vLLM's NCCL trainer engine does with the client and the source, minus the wire."""
    @classmethod
    def trainer_init(cls, init_info, *, client, source):
        engine = cls()
        engine.info, engine.client, engine.source, engine.received = init_info, client, source, []
        if client is not None:
            # As nccl_common.build_worker_init_payload: every worker group starts at rank_offset 1.
            client.init_weight_transfer_engine({
                "master_address": init_info.master_address, "master_port": init_info.master_port,
                "rank_offset": 1, "world_size": init_info.world_size})
        return engine

    def send_weights(self):
        self.client.start_weight_update()
        for meta, (name, t) in zip(self.source.metadata, self.source.iter_full(), strict=True):
            assert (meta.name, meta.dtype, tuple(meta.shape)) == (name, t.dtype, tuple(t.shape))
            self.received.append((name, t.clone()))
        self.client.update_weights({"names": [n for n, _ in self.received]})
        self.client.finish_weight_update()


def make_dataclass(name, *fields):
    return dataclasses.make_dataclass(name, [(f, object, dataclasses.field(default=None)) for f in fields])


FAKES = {  # fake -> the real vLLM class it stands for
    FakeLogprob: ("vllm.logprobs", "Logprob"), FakeCompletionOutput: ("vllm.outputs", "CompletionOutput"),
    FakeRequestOutput: ("vllm.outputs", "RequestOutput"),
    FakeWeightVersionSpan: ("vllm.outputs", "WeightVersionSpan"),
    FakeSamplingParams: ("vllm.sampling_params", "SamplingParams")}
FAKE_MODULES = {
    "vllm.entrypoints.llm": {"LLM": FakeLLM}, "vllm.sampling_params": {"SamplingParams": FakeSamplingParams},
    "vllm.inputs": {"TokensPrompt": dict},
    "vllm.config.weight_transfer": {"WeightTransferConfig": make_dataclass("WeightTransferConfig", "backend")},
    "vllm.distributed.weight_transfer.base": {
        "WeightTransferInitRequest": make_dataclass("WeightTransferInitRequest", "init_info"),
        "WeightTransferUpdateRequest": make_dataclass("WeightTransferUpdateRequest", "update_info"),
        "ParamMeta": make_dataclass("ParamMeta", "name", "dtype", "shape"), "WeightSource": object},
    "vllm.distributed.weight_transfer.factory": {"WeightTransferTrainerFactory": FakeTrainerEngine},
    "vllm.distributed.weight_transfer.nccl_engine": {"NCCLTrainerInitInfo": make_dataclass(
        "NCCLTrainerInitInfo", "master_address", "master_port", "world_size", "packed",
        "packed_buffer_size_bytes", "packed_num_buffers", "rank")},
    "vllm.distributed.weight_transfer.ipc_engine": {"IPCTrainerInitInfo": make_dataclass(
        "IPCTrainerInitInfo", "packed", "packed_buffer_size_bytes", "rank")},
}




def install(monkeypatch) -> None:
    """Put the fake modules in sys.modules (undone by monkeypatch after the test)."""
    for mod in {".".join(m.split(".")[:i + 1]) for m in FAKE_MODULES for i in range(m.count(".") + 1)}:
        monkeypatch.setitem(sys.modules, mod, types.ModuleType(mod))
    for mod, names in FAKE_MODULES.items():
        for name, obj in names.items():
            setattr(sys.modules[mod], name, obj)
