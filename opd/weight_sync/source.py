"""The learner's weights as a stream: the one ZeRO-3 gather routine.

Every transport (gloo, NCCL, IPC) and the Hugging Face export read the student's weights through
`ParamStream`. Under ZeRO-3 each rank holds a shard of every parameter, so materialising a full
tensor is a collective: every learner rank must iterate the stream in the same order.

A stream is a list of `Part`s: one tensor each, as the receivers name it. A plain part is one
parameter; a computed part (a LoRA student's merged weight, learner/lora.py) is a function of
several, gathered together.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Callable, Iterator, NamedTuple, Optional

import torch

GATHER_BUCKET_BYTES = 256 << 20  # ZeRO-3 parameters gathered at once on each learner rank


@dataclass(frozen=True)
class ParamMeta:
    """Name / wire dtype / full shape of one parameter (vLLM's ParamMeta has the same fields)."""
    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize


def full_shape(p: torch.nn.Parameter) -> tuple[int, ...]:
    return tuple(getattr(p, "ds_shape", p.shape))  # ZeRO-3 keeps the full shape in ds_shape


class Part(NamedTuple):
    """One tensor of a stream: `name` as the receivers know it; its value is `combine` of the full
    data of `params` (None: the one parameter itself). The result has params[0]'s full shape."""
    name: str
    params: tuple[torch.nn.Parameter, ...]
    combine: Optional[Callable[..., torch.Tensor]] = None

    def gathered_bytes(self) -> int:
        return sum(math.prod(full_shape(p)) * p.dtype.itemsize for p in self.params)


class ParamStream:
    """(name, full tensor) for every parameter of `module`, cast to the wire `dtype` (the receiving
    engine's dtype; None keeps the learner's). Iterating gathers ZeRO-3 shards `bucket_bytes` at
    a time, so peak extra memory is one bucket. Re-iterable: each `iter()` is a fresh pass.

    Duck-types vLLM's WeightSource (`metadata()`, `__iter__`); vllm_native.py wraps it for vLLM's
    own trainer engines."""

    def __init__(self, module: torch.nn.Module, dtype: Optional[torch.dtype] = None,
                 bucket_bytes: int = GATHER_BUCKET_BYTES, parts: Optional[list[Part]] = None,
                 complete: bool = True):
        """`parts`: what to stream (default: every parameter of `module`, by its own name). complete:
        whether they are every parameter of the receiving model (UpdateInfo.complete)."""
        self.named = list(parts) if parts is not None else [Part(n, (p,)) for n, p in module.named_parameters()]
        self.dtype, self.bucket_bytes, self.complete = dtype, bucket_bytes, complete

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(part.name, self.dtype or part.params[0].dtype, full_shape(part.params[0]))
                for part in self.named]

    def buckets(self) -> Iterator[list[Part]]:
        """Consecutive parts whose gathered size fits bucket_bytes (a larger one goes alone)."""
        bucket, size = [], 0
        for part, meta in zip(self.named, self.metadata()):
            nbytes = max(meta.nbytes, part.gathered_bytes())
            if bucket and size + nbytes > self.bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append(part)
            size += nbytes
        if bucket:
            yield bucket

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """A consumer may keep a yielded tensor past its bucket: re-partitioning swaps param.data
        for an empty tensor but does not free storage that is still referenced."""
        for bucket in self.buckets():
            params = [p for part in bucket for p in part.params]
            gathered = any(hasattr(p, "ds_id") for p in params)
            if gathered:
                import deepspeed
                ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            else:
                ctx = nullcontext()
            with ctx:
                for part in bucket:
                    if part.combine is None:
                        t = part.params[0].data.detach()
                    else:
                        t = part.combine(*(p.data.detach() for p in part.params))
                    want = self.dtype or part.params[0].dtype
                    yield part.name, t if t.dtype == want else t.to(want)

    def to_cpu_dict(self) -> dict[str, torch.Tensor]:
        """The whole model as CPU tensors (a collective under ZeRO-3; used for the HF export)."""
        return {n: t.to("cpu", copy=True) for n, t in self}
