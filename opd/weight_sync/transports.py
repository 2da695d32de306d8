"""Weight-sync transports as a registry: `sync.backend` names an entry (or `auto`), and the entry says all
the rest of the system asks about a transport: how the learner opens its sender, the name vLLM's
WeightTransferEngineFactory knows its receiver by, whether it needs GPUs and which layout, and what
the vLLM engine's environment needs for it. The manifest check, `auto`, the learner's sender and the
vLLM engine read it; nothing else tests a transport by its name.

Adding a transport is one file (its sender, and its receiver inside vLLM registered by the
`vllm.general_plugins` entry point as opd_gloo is in vllm_native.py) and one `register_transport` below.
HF receivers always take gloo (opd/weight_sync/gloo.py: HFModelReceiver).
"""
from __future__ import annotations

import socket
from dataclasses import dataclass, field
from typing import Any, Callable, Optional

from opd.registry import Registry

# (stream, client, *, rank, address, port) -> a sender with send(version) and shutdown()
Opener = Callable[..., Any]


@dataclass(frozen=True)
class Transport:
    name: str                      # the value of sync.backend
    open: Opener                   # the learner's sender, on every rank (rank 0 hosts the group at address:port)
    vllm_backend: str              # its receiver's name in vLLM's WeightTransferEngineFactory
    gpus: bool = False             # moves weights between GPUs: refused with cluster.num_gpus: 0
    colocated: Optional[bool] = None  # True: only with the engines on the learner's GPUs; False: only without
    layout_problem: str = ""       # the manifest check's message when the layout is the other one
    engine_env: dict = field(default_factory=dict)  # environment a vLLM engine receiving it needs


TRANSPORTS: Registry[Transport] = Registry("sync.backend", "sync.backend", reserved=("auto",))
register_transport = TRANSPORTS.add
transport = TRANSPORTS.lookup


def default_transport(on_gpu: bool, colocate: bool) -> Transport:
    """sync.backend: auto, resolved: the first registered transport that fits the run's layout (gloo on
    CPUs, ipc for engines on the learner's GPUs, nccl for engines on GPUs of their own)."""
    return next(t for t in TRANSPORTS.values()
                if t.gpus == on_gpu and (t.colocated is None or t.colocated == colocate))


def free_port() -> int:
    """A port nobody listens on yet, on this node, for a rendezvous whose host binds it later (vLLM's NCCL
    group). Another process can take it in between: where the host can bind port 0 itself, it does."""
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def _open_gloo(stream, client, *, rank: int, address: str, port: int):
    from opd.weight_sync.gloo import GlooInitInfo, GlooSender
    info = GlooInitInfo(master_address=address, master_port=port, world_size=1 + client.num_workers)
    return GlooSender(stream, client, rank=rank, info=info if rank == 0 else None)


def _open_vllm_native(backend: str) -> Opener:
    def open_sender(stream, client, *, rank: int, address: str, port: int):
        from opd.weight_sync.vllm_native import VLLMNativeSender  # imports vLLM: only runs that use it
        port = port or (free_port() if rank == 0 and backend == "nccl" else 0)  # vLLM's group binds it later
        return VLLMNativeSender(stream, client, backend=backend, rank=rank, master_address=address, master_port=port)
    return open_sender


register_transport(Transport("gloo", _open_gloo, vllm_backend="opd_gloo"))  # CPU runs; HF receivers always
register_transport(Transport(
    "nccl", _open_vllm_native("nccl"), vllm_backend="nccl", gpus=True, colocated=False,
    layout_problem="sync.backend: nccl with cluster.colocate: true puts two NCCL ranks (learner and engine) on one "
                   "GPU, which NCCL refuses; use ipc (or auto) when colocated"))
register_transport(Transport(
    "ipc", _open_vllm_native("ipc"), vllm_backend="ipc", gpus=True, colocated=True,
    layout_problem="sync.backend: ipc shares CUDA memory within one GPU, so it needs the engines on the learner's "
                   "GPUs (cluster.colocate: true); use nccl (or auto) for engines on GPUs of their own",
    # IPC handles hold Python types that vLLM's msgpack refuses between its own processes unless told
    # otherwise; the channel is the actor's own engine, so allowing it is safe.
    engine_env={"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}))
