"""The vLLM rollout engine (GPU) and both ends of vLLM's native weight sync (docs/vllm.md).

Written against vLLM 0.33.0 and imported lazily. tests/test_vllm_contract.py checks every vLLM name
used here against the real source; vLLM objects live in annotated names (`completion:
CompletionOutput`) so that test can tell which class an attribute belongs to.
"""
from __future__ import annotations

import itertools
import math
from contextlib import nullcontext
from functools import cached_property
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Optional, Sequence

import torch

from opd.contracts import Rollout, SamplingSpec, pad_rows

if TYPE_CHECKING:
    from vllm.entrypoints.llm import LLM
    from vllm.logprobs import Logprob
    from vllm.distributed.weight_transfer.base import TrainerWeightTransferEngine
    from vllm.outputs import CompletionOutput, RequestOutput, WeightVersionSpan

VLLM_VERSION = "0.33.0"
GATHER_BUCKET_BYTES = 256 << 20  # ZeRO-3 parameters gathered at once on each learner rank
WIRE_BUFFER_BYTES = 256 << 20    # vLLM packed-broadcast buffer (x2, double-buffered)


def logprobs_mode_for(spec: SamplingSpec) -> str:
    """The vLLM `logprobs_mode` whose sampled-token log-prob is log softmax(logits / T), untruncated:
    raw_logprobs is taken before temperature, processed_logprobs after temperature *and* top-k/top-p
    masking (renormalised over the nucleus); so T == 1 needs raw and top_p == 1 needs processed."""
    if spec.temperature in (0.0, 1.0):
        return "raw_logprobs"
    if spec.top_p >= 1.0:
        return "processed_logprobs"
    raise ValueError(f"sampling: temperature {spec.temperature} with top_p {spec.top_p} has no exact "
                     "vLLM logprobs mode (raw ignores T, processed renormalises over top-p)")


def build_llm(model: str, *, logprobs_mode: str, max_logprobs: int,
              weight_transfer_backend: Optional[str], **llm_kwargs: Any) -> "LLM":
    """The one place a vllm.LLM is constructed (rollout engines and teachers)."""
    from vllm.config.weight_transfer import WeightTransferConfig
    from vllm.entrypoints.llm import LLM
    transfer = WeightTransferConfig(backend=weight_transfer_backend) if weight_transfer_backend else None
    return LLM(model=model, logprobs_mode=logprobs_mode, max_logprobs=max_logprobs,
               weight_transfer_config=transfer, **llm_kwargs)


def split_position(entries: dict[int, "Logprob"], token: int, k: int) -> tuple[float, list[int], list[float]]:
    """One position of vLLM logprobs -> (log-prob of `token`, top-k ids, top-k log-probs). vLLM puts
    the scored token first (at its true rank), then ranks 1..k; inside the top-k it is the same key,
    so the dict holds k or k+1 entries and dict order is not rank order: sort by rank."""
    if token not in entries:
        raise RuntimeError(f"vLLM logprobs miss the scored token {token} (got ids {sorted(entries)})")
    lp: Logprob
    ranked = sorted((math.inf if lp.rank is None else lp.rank, -lp.logprob, tok, lp.logprob)
                    for tok, lp in entries.items())
    if len(ranked) < k:
        raise RuntimeError(f"vLLM returned {len(ranked)} log-probs at a position, asked for top-{k}")
    return entries[token].logprob, [r[2] for r in ranked[:k]], [r[3] for r in ranked[:k]]


def rollout_from_outputs(prompts: list[list[int]], outputs: Sequence["RequestOutput"], topk: int,
                         pad_id: int, version: int) -> Rollout:
    """vLLM RequestOutputs (one completion each, in prompt order) -> Rollout."""
    ids, logps, tops, reasons = [], [], [], []
    out: RequestOutput
    span: WeightVersionSpan
    for out in outputs:
        completion: CompletionOutput = out.outputs[0]
        tokens = list(completion.token_ids)
        if completion.finish_reason not in ("stop", "length"):  # abort / error / repetition
            raise RuntimeError(f"vLLM request {out.request_id} finished with {completion.finish_reason!r}")
        if completion.logprobs is None or len(completion.logprobs) != len(tokens):
            raise RuntimeError(f"vLLM request {out.request_id}: logprobs do not cover every sampled token")
        for span in completion.weight_versions or []:
            if span.version != str(version):  # our counter and vLLM's label must agree
                raise RuntimeError(f"tokens {span.start}:{span.end} sampled by weights {span.version!r}, "
                                   f"engine is at version {version}")
        per_pos = [split_position(completion.logprobs[t], tok, topk) for t, tok in enumerate(tokens)]
        ids.append(tokens)
        logps.append([p[0] for p in per_pos])
        tops.append([p[1] for p in per_pos])
        reasons.append(completion.finish_reason)
    width = max((len(r) for r in ids), default=0)
    student_topk = None if topk == 0 else torch.tensor(
        [r + [[0] * topk] * (width - len(r)) for r in tops], dtype=torch.long).view(len(ids), width, topk)
    return Rollout(prompt_ids=[list(p) for p in prompts], completion_ids=pad_rows(ids, pad_id, width=width),
                   completion_mask=pad_rows([[True] * len(r) for r in ids], False, torch.bool, width),
                   behaviour_logprobs=pad_rows(logps, 0.0, torch.float32, width),
                   finish_reasons=reasons, weight_version=version, student_topk_ids=student_topk)


class VLLMWeightReceiver:
    """Weight updates for a vllm.LLM, shared by rollout engines and a live self-teacher. The native
    transfer's steps are called by `WeightSyncClient` (names chosen to avoid update_weights)."""
    llm: LLM
    weight_version: int

    def weight_sync_workers(self) -> int:  # vLLM workers (TP x PP) this engine adds to the NCCL group
        return self.llm.get_world_size(include_dp=False)

    def init_weight_transfer(self, init_info: dict) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferInitRequest
        self.llm.init_weight_transfer_engine(WeightTransferInitRequest(init_info=init_info))

    def start_weight_update(self) -> None:
        self.llm.start_weight_update()

    def receive_weights(self, update_info: dict) -> None:
        from vllm.distributed.weight_transfer.base import WeightTransferUpdateRequest
        self.llm.update_weights(WeightTransferUpdateRequest(update_info=update_info))

    def finish_weight_update(self, version: int) -> None:
        self.llm.finish_weight_update(weight_version=str(version))
        self._weights_changed(version)

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]], version: int) -> None:
        """RolloutEngine / live-teacher object-store path: CPU tensors through vLLM's RPC to each
        worker. Simple and slow; WeightSender is the fast path."""
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": list(named_tensors),
                                                          "is_checkpoint_format": True})
        self.llm.update_weight_version(str(version))
        self._weights_changed(version)

    def _weights_changed(self, version: int) -> None:
        # vLLM keeps prefix-cache blocks across weight updates: the old policy's KV would be reused.
        self.llm.reset_prefix_cache()
        self.weight_version = version


class VLLMEngine(VLLMWeightReceiver):
    """RolloutEngine on vllm.LLM. `logprobs_mode` must suit the SamplingSpec (logprobs_mode_for);
    generate() refuses a spec whose behaviour log-probs this engine cannot report exactly."""

    def __init__(self, model: str, *, logprobs_mode: str = "raw_logprobs", max_topk: int = 20,
                 weight_transfer_backend: Optional[str] = "nccl", pad_id: int = 0, version: int = 0,
                 **llm_kwargs: Any):
        self.llm = build_llm(model, logprobs_mode=logprobs_mode, max_logprobs=max_topk,
                             weight_transfer_backend=weight_transfer_backend, **llm_kwargs)
        self.logprobs_mode, self.max_topk, self.pad_id = logprobs_mode, max_topk, pad_id
        self.llm.update_weight_version(str(version))
        self.weight_version = version

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> Rollout:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import SamplingParams
        needed = logprobs_mode_for(spec)  # raises when no mode is exact
        both_exact = spec.temperature == 0.0 or (spec.temperature == 1.0 and spec.top_p >= 1.0)
        if self.logprobs_mode != needed and not both_exact:
            raise ValueError(f"sampling: temperature {spec.temperature}, top_p {spec.top_p} needs "
                             f"logprobs_mode={needed!r}, engine has {self.logprobs_mode!r}")
        if spec.return_topk > self.max_topk:
            raise ValueError(f"sampling.return_topk {spec.return_topk} > engine max_topk {self.max_topk}")
        # One seed per row: repeated prompts with one shared seed would give identical samples.
        params = [SamplingParams(n=1, temperature=spec.temperature, top_p=spec.top_p,
                                 max_tokens=spec.max_new_tokens, logprobs=spec.return_topk,
                                 seed=None if spec.seed is None else spec.seed + i, detokenize=False)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False)
        return rollout_from_outputs(prompts, outputs, spec.return_topk, self.pad_id, self.weight_version)


class WeightSyncClient:
    """vLLM's VLLMWeightSyncClient protocol (the four calls its trainer engine makes) over our
    engines: Ray actor handles of a VLLMWeightReceiver (calls fan out in parallel) or local objects."""

    def __init__(self, engines: Sequence[Any], workers_per_engine: Sequence[int]):
        self.engines = list(engines)
        self.rank_starts = [0, *itertools.accumulate(workers_per_engine)][: len(self.engines)]
        self.num_workers = sum(workers_per_engine)
        self.version: Optional[int] = None  # set by WeightSender before each send

    def _call(self, method: str, per_engine: Sequence[tuple] = ()) -> None:
        args = list(per_engine) or [()] * len(self.engines)
        fns = [getattr(e, method) for e in self.engines]
        if all(hasattr(f, "remote") for f in fns):
            import ray
            ray.get([f.remote(*a) for f, a in zip(fns, args)])
        else:
            for f, a in zip(fns, args):
                f(*a)

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        if "rank_offset" in init_info:
            # NCCL: vLLM gives every engine rank_offset 1 (one DP deployment); ours are independent
            # LLMs, so each one's workers take the ranks after those of the engines before it.
            per = [({**init_info, "rank_offset": init_info["rank_offset"] + s},) for s in self.rank_starts]
        else:
            per = [(init_info,)] * len(self.engines)
        self._call("init_weight_transfer", per)

    def start_weight_update(self) -> None:
        self._call("start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        self._call("receive_weights", [(update_info,)] * len(self.engines))

    def finish_weight_update(self, weight_version: Optional[str] = None) -> None:
        version = self.version if weight_version is None else int(weight_version)
        if version is None:
            raise RuntimeError("WeightSyncClient: no weight version set before finish_weight_update")
        self._call("finish_weight_update", [(version,)] * len(self.engines))


def param_buckets(named_params: list[tuple[str, torch.nn.Parameter]], bucket_bytes: int,
                  dtype: Optional[torch.dtype]) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
    """Consecutive parameters whose full (gathered) size fits bucket_bytes (a larger one goes alone)."""
    bucket, size = [], 0
    for name, p in named_params:
        nbytes = math.prod(full_shape(p)) * (dtype or p.dtype).itemsize
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, p))
        size += nbytes
    if bucket:
        yield bucket


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape in ds_shape


def iter_gathered(named_params: list[tuple[str, torch.nn.Parameter]], bucket_bytes: int,
                  dtype: Optional[torch.dtype] = None) -> Iterator[tuple[str, torch.Tensor]]:
    """Full tensors, one ZeRO-3 all-gather per bucket (a collective: every learner rank iterates).
    The consumer may keep a yielded tensor past its bucket: re-partitioning swaps param.data for
    an empty tensor but does not free storage that is still referenced."""
    for bucket in param_buckets(named_params, bucket_bytes, dtype):
        params = [p for _, p in bucket]
        if any(hasattr(p, "ds_id") for p in params):
            import deepspeed
            ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
        else:
            ctx = nullcontext()
        with ctx:
            for name, p in bucket:
                yield name, p.data if dtype is None else p.data.to(dtype)


def zero3_weight_source(module: torch.nn.Module, bucket_bytes: int = GATHER_BUCKET_BYTES,
                        dtype: Optional[torch.dtype] = None):
    """A vLLM WeightSource over a (possibly ZeRO-3 partitioned) HF module; names as in its state_dict."""
    from vllm.distributed.weight_transfer.base import ParamMeta, WeightSource

    named = list(module.named_parameters())

    class Zero3WeightSource(WeightSource):
        @cached_property
        def metadata(self) -> list:
            return [ParamMeta(name=n, dtype=dtype or p.dtype, shape=full_shape(p)) for n, p in named]

        def iter_full(self) -> Iterator[tuple[str, torch.Tensor]]:
            return iter_gathered(named, bucket_bytes, dtype)

    return Zero3WeightSource()


class WeightSender:
    """Learner side. Build it and call send(version) on every rank (the gathers are collective);
    rank 0 alone talks to vLLM. backend "nccl": rollout GPUs separate from the learner's (one
    NCCL group: rank 0 + every vLLM worker); "ipc": vLLM colocated on each learner GPU."""
    engine: TrainerWeightTransferEngine

    def __init__(self, module: torch.nn.Module, *, rank: int, client: Optional[WeightSyncClient],
                 backend: str = "nccl", master_address: str = "", master_port: int = 0,
                 bucket_bytes: int = GATHER_BUCKET_BYTES, wire_bytes: int = WIRE_BUFFER_BYTES,
                 dtype: Optional[torch.dtype] = None):
        from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo
        if rank == 0 and client is None:
            raise ValueError("WeightSender: rank 0 sends and needs a WeightSyncClient")
        if backend == "nccl":
            world = 1 + (client.num_workers if client is not None else 0)
            info = NCCLTrainerInitInfo(master_address=master_address, master_port=master_port,
                                       world_size=world, packed=True, packed_buffer_size_bytes=wire_bytes,
                                       packed_num_buffers=2, rank=rank)
        elif backend == "ipc":
            info = IPCTrainerInitInfo(packed=True, packed_buffer_size_bytes=wire_bytes, rank=rank)
        else:
            raise ValueError(f"weight_sync.backend: {backend!r} is not 'nccl' or 'ipc'")
        self.client = client
        self.engine = WeightTransferTrainerFactory.trainer_init(
            info, client=client, source=zero3_weight_source(module, bucket_bytes, dtype))

    def send(self, version: int) -> None:
        if self.client is not None:
            self.client.version = version
        self.engine.send_weights()

    def shutdown(self) -> None:
        self.engine.shutdown()
