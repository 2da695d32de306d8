"""The CPU transport: both ends of a gloo broadcast from learner rank 0 to every engine worker.

It runs the same call sequence as vLLM's NCCL engine (init -> start -> update concurrent with the
broadcast -> finish), so CI on CPU exercises the code path GPUs use. The sender and the receiver
cut the stream into the same buckets from the same metadata (`bucket_plan`); each bucket travels
as one flat byte buffer. Receivers: HF models directly (`HFModelReceiver`), vLLM workers through
the engine registered in vllm_native.py.
"""
from __future__ import annotations

import datetime
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from typing import Callable, Iterator, Optional

import torch

from opd.weight_sync.source import ParamMeta

WIRE_BUCKET_BYTES = 64 << 20  # one broadcast per bucket


@dataclass
class GlooInitInfo:
    """What each receiver needs to join the group (sent as a dict through the engines' RPC)."""
    master_address: str
    master_port: int
    world_size: int
    rank_offset: int = 1          # this engine's first worker's rank (the sender is rank 0)
    bucket_bytes: int = WIRE_BUCKET_BYTES
    timeout_s: float = 600.0


@dataclass
class UpdateInfo:
    """One round's parameters, in stream order (the same fields as vLLM's NCCL update info).
    complete: False when the round carries only some of the model's parameters (a LoRA student sends
    the modules its adapters touch; the others never change), so a receiver keeps the rest."""
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    complete: bool = True

    @classmethod
    def from_metadata(cls, meta: list[ParamMeta], complete: bool = True) -> "UpdateInfo":
        return cls([m.name for m in meta], [str(m.dtype).removeprefix("torch.") for m in meta],
                   [list(m.shape) for m in meta], complete)

    def metadata(self) -> list[ParamMeta]:
        return [ParamMeta(n, getattr(torch, d), tuple(s)) for n, d, s in zip(self.names, self.dtype_names, self.shapes)]


def bucket_plan(meta: list[ParamMeta], bucket_bytes: int) -> list[list[int]]:
    """Indices of consecutive parameters per broadcast (a parameter larger than a bucket goes alone)."""
    plan, size = [[]], 0
    for i, m in enumerate(meta):
        if plan[-1] and size + m.nbytes > bucket_bytes:
            plan.append([])
            size = 0
        plan[-1].append(i)
        size += m.nbytes
    return [b for b in plan if b]


def open_store(info: GlooInitInfo, rank: int):
    """The group's store: rank 0 hosts it, on info.master_port, or with 0 on a port the OS picks as it binds
    (store.port; held from the moment it is known, so nothing else can take it before the receivers join)."""
    from torch.distributed import TCPStore
    return TCPStore(info.master_address, info.master_port, info.world_size, is_master=rank == 0,
                    timeout=datetime.timedelta(seconds=info.timeout_s), wait_for_workers=False)


def open_group(info: GlooInitInfo, rank: int, store=None):
    """A gloo process group of its own (no global torch.distributed state, so it lives beside
    DeepSpeed's group in the learner and vLLM's in its workers), over `store` or one open_store opens."""
    from torch._C._distributed_c10d import ProcessGroupGloo
    from torch.distributed import PrefixStore
    store = store or open_store(info, rank)
    return ProcessGroupGloo(PrefixStore("opd-weight-sync", store), rank, info.world_size,
                            datetime.timedelta(seconds=info.timeout_s))


def _broadcast(group, buffer: torch.Tensor) -> None:
    from torch.distributed import BroadcastOptions
    opts = BroadcastOptions()
    opts.rootRank = 0
    group.broadcast([buffer], opts).wait()


class GlooSender:
    """Learner side. Built on every learner rank (the ZeRO-3 gather is collective); only rank 0
    opens the group and talks to the engines through `client` (an EngineGroupClient)."""

    def __init__(self, source, client, *, rank: int, info: Optional[GlooInitInfo]):
        self.source, self.client, self.rank, self.info = source, client, rank, info
        self.group = None
        if rank != 0:
            return
        store = open_store(info, 0)  # bound first: the receivers are told the port it holds
        self.info = info = replace(info, master_port=store.port)
        with ThreadPoolExecutor(1) as pool:  # receivers block in the rendezvous until rank 0 joins
            joined = pool.submit(client.init_weight_transfer_engine, asdict(info))
            self.group = open_group(info, 0, store)
            joined.result()

    def send(self, version: int) -> None:
        meta = self.source.metadata()
        if self.rank != 0:
            for _ in self.source:  # join the gather; nothing to send
                pass
            return
        self.client.start_weight_update()
        pool = ThreadPoolExecutor(1)  # receivers block inside update_weights until the last bucket
        try:
            info = UpdateInfo.from_metadata(meta, getattr(self.source, "complete", True))
            received = pool.submit(self.client.update_weights, asdict(info))
            stream = iter(self.source)
            for bucket in bucket_plan(meta, self.info.bucket_bytes):
                parts = []
                for i in bucket:
                    name, tensor = next(stream)
                    if name != meta[i].name or tuple(tensor.shape) != meta[i].shape:
                        raise RuntimeError(f"weight sync: stream yielded {name!r} {tuple(tensor.shape)}, "
                                           f"metadata declared {meta[i].name!r} {meta[i].shape}")
                    parts.append(tensor.detach().to("cpu").contiguous().view(-1).view(torch.uint8))
                if received.done():  # a receiver failed before the broadcast: surface it, don't hang
                    received.result()
                _broadcast(self.group, torch.cat(parts))
            received.result()
        finally:
            # On a failure the receivers wait for buckets that will not come: do not wait with them
            # (shutdown() reports them; the driver replaces them).
            pool.shutdown(wait=False)
        self.client.finish_weight_update(str(version))

    def shutdown(self) -> list:
        """Close the group; returns the receivers that did not close (see EngineGroupClient)."""
        if self.group is None:
            return []
        unclosed = self.client.close_weight_transfer()  # ours last, as vLLM's engines close theirs
        self.group = None
        return unclosed


class GlooReceiver:
    """Engine side, one per worker process: joins the group at `rank_offset + local_rank` and turns
    each broadcast bucket back into (name, tensor) pairs for `load` (views into the bucket buffer,
    valid until `load` returns)."""

    def __init__(self, init_info: dict, local_rank: int = 0):
        self.info = GlooInitInfo(**init_info)
        self.group = open_group(self.info, self.info.rank_offset + local_rank)

    def receive(self, update_info: dict, load: Callable[[list[tuple[str, torch.Tensor]]], None]) -> None:
        meta = UpdateInfo(**update_info).metadata()
        failed = None
        for bucket in bucket_plan(meta, self.info.bucket_bytes):
            buffer = torch.empty(sum(meta[i].nbytes for i in bucket), dtype=torch.uint8)
            _broadcast(self.group, buffer)
            if failed is None:
                try:
                    load(list(_unpack(buffer, [meta[i] for i in bucket])))
                except Exception as e:  # noqa: BLE001 - keep receiving so the sender never hangs
                    failed = e
        if failed is not None:
            raise failed

    def close(self) -> None:
        self.group = None


def _unpack(buffer: torch.Tensor, metas: list[ParamMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    offset = 0
    for m in metas:
        yield m.name, buffer[offset: offset + m.nbytes].view(m.dtype).view(m.shape)
        offset += m.nbytes


class HFModelReceiver:
    """The receiver protocol for an actor holding an HF model in `self.model` (HF rollout engine,
    HF teacher following live weights). HF models receive over gloo only."""
    model: torch.nn.Module
    weight_version: int
    _receiver: Optional[GlooReceiver] = None

    def weight_sync_workers(self) -> int:
        return 1

    def init_weight_transfer(self, init_info: dict) -> None:
        self._receiver = GlooReceiver(init_info)

    def start_weight_update(self) -> None:
        self._loaded: set[str] = set()
        self._complete = True

    def receive_weights(self, update_info: dict) -> None:
        from opd.modeling import load_named_tensors
        if self._receiver is None:
            raise RuntimeError("weight sync: receive_weights before init_weight_transfer")
        self._complete = update_info.get("complete", True)
        self._receiver.receive(update_info, lambda pairs: self._loaded.update(
            load_named_tensors(self.model, pairs, complete=False)))

    def finish_weight_update(self, version: int) -> None:
        missing = {n for n, _ in self.model.named_parameters()} - self._loaded
        if missing and self._complete:
            raise KeyError(f"weight sync: parameters not sent: {sorted(missing)[:5]}")
        self.weight_version = int(version)

    def close_weight_transfer(self) -> None:
        if self._receiver is not None:
            self._receiver.close()
            self._receiver = None
