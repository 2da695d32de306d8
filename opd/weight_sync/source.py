"""The learner's weights as a stream: the one ZeRO-3 gather routine.

Every transport (gloo, NCCL, IPC) and the Hugging Face export read the student's weights through
`ParamStream`. Under ZeRO-3 each rank holds a shard of every parameter, so materialising a full
tensor is a collective: every learner rank must iterate the stream in the same order.
"""
from __future__ import annotations

import math
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Iterator, Optional

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


class ParamStream:
    """(name, full tensor) for every parameter of `module`, cast to the wire `dtype` (the receiving
    engine's dtype; None keeps the learner's). Iterating gathers ZeRO-3 shards `bucket_bytes` at
    a time, so peak extra memory is one bucket. Re-iterable: each `iter()` is a fresh pass.

    Duck-types vLLM's WeightSource (`metadata()`, `__iter__`); vllm_native.py wraps it for vLLM's
    own trainer engines."""

    def __init__(self, module: torch.nn.Module, dtype: Optional[torch.dtype] = None,
                 bucket_bytes: int = GATHER_BUCKET_BYTES):
        self.named = list(module.named_parameters())
        self.dtype, self.bucket_bytes = dtype, bucket_bytes

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, self.dtype or p.dtype, full_shape(p)) for n, p in self.named]

    def buckets(self) -> Iterator[list[tuple[str, torch.nn.Parameter]]]:
        """Consecutive parameters whose full size fits bucket_bytes (a larger one goes alone)."""
        bucket, size = [], 0
        for (name, p), meta in zip(self.named, self.metadata()):
            if bucket and size + meta.nbytes > self.bucket_bytes:
                yield bucket
                bucket, size = [], 0
            bucket.append((name, p))
            size += meta.nbytes
        if bucket:
            yield bucket

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        """A consumer may keep a yielded tensor past its bucket: re-partitioning swaps param.data
        for an empty tensor but does not free storage that is still referenced."""
        for bucket in self.buckets():
            params = [p for _, p in bucket]
            gathered = any(hasattr(p, "ds_id") for p in params)
            if gathered:
                import deepspeed
                ctx = deepspeed.zero.GatheredParameters(params, modifier_rank=None)
            else:
                ctx = nullcontext()
            with ctx:
                for name, p in bucket:
                    t = p.data.detach()
                    yield name, t if self.dtype in (None, t.dtype) else t.to(self.dtype)

    def to_cpu_dict(self) -> dict[str, torch.Tensor]:
        """The whole model as CPU tensors (a collective under ZeRO-3; used for the HF export)."""
        return {n: t.to("cpu", copy=True) for n, t in self}
