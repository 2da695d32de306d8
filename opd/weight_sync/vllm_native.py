"""vLLM's native weight-transfer API, both directions.

* Learner side: `VLLMNativeSender` builds vLLM's own trainer engine (NCCL between separate GPUs,
  IPC when vLLM is colocated on the learner's GPU) through `WeightTransferTrainerFactory`, over
  our `ParamStream`; vLLM packs, broadcasts and drives the engines through our client.
* Engine side: `GlooWeightTransferEngine`, our CPU backend inside vLLM's workers. vLLM builds it
  through `WeightTransferEngineFactory` when an LLM is created with
  `weight_transfer_config=WeightTransferConfig(backend="opd_gloo")`; `register` puts it there. It
  is a `vllm.general_plugins` entry point (pyproject.toml), so every vLLM process, workers
  included, registers it at start-up.

Imports vLLM at module level: only code that runs vLLM imports this file.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import asdict
from typing import Iterator

import torch
from vllm.distributed.weight_transfer.base import ParamMeta as VLLMParamMeta
from vllm.distributed.weight_transfer.base import WeightSource, WeightTransferEngine
from vllm.distributed.weight_transfer.factory import WeightTransferEngineFactory, WeightTransferTrainerFactory

from opd.weight_sync.gloo import GlooInitInfo, GlooReceiver, UpdateInfo
from opd.weight_sync.source import ParamMeta, ParamStream

GLOO_BACKEND = "opd_gloo"  # our name in vLLM's registry (vLLM's own names: nccl, ipc, ...)
WIRE_BUFFER_BYTES = 256 << 20  # at least: vLLM packs NCCL broadcasts into 2 such buffers (its default: 2 x 1 GiB)


def register() -> None:
    """vllm.general_plugins entry point: runs in every vLLM process; must be idempotent."""
    if GLOO_BACKEND not in WeightTransferEngineFactory._registry:
        WeightTransferEngineFactory.register_engine(GLOO_BACKEND, GlooWeightTransferEngine)


class GlooWeightTransferEngine(WeightTransferEngine[GlooInitInfo, UpdateInfo]):
    """vLLM worker side of the gloo transport: weights arrive in checkpoint (HF) format and load
    through vLLM's layerwise reload, exactly as its NCCL engine loads them."""
    init_info_cls = GlooInitInfo
    update_info_cls = UpdateInfo

    receiver: GlooReceiver | None = None
    complete: bool = True  # the round carried every parameter (else the rest keep their weights)

    def init_transfer_engine(self, init_info: GlooInitInfo) -> None:
        pc = self.parallel_config  # a unique rank per worker across TP x PP (x DP) within the engine
        local_rank = pc.data_parallel_index * pc.world_size + pc.rank
        self.receiver = GlooReceiver(asdict(init_info), local_rank)

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload
        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict) -> None:
        # The base class adds torch.accelerator.synchronize(), which a CPU-only process lacks.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: UpdateInfo) -> None:
        self.complete = update_info.complete
        if self.receiver is None:
            raise RuntimeError("opd_gloo: receive_weights before init_weight_transfer_engine")
        self.receiver.receive(asdict(update_info), lambda pairs: self.model.load_weights(
            [(n, t.to(self.device)) for n, t in pairs]))

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload
        with _quiet_unloaded_layers(not self.complete):
            finalize_layerwise_reload(self.model, self.model_config)
        _repack_tied_heads(self.model)

    def shutdown(self) -> None:
        if self.receiver is not None:
            self.receiver.close()
            self.receiver = None


@contextmanager
def _quiet_unloaded_layers(quiet: bool):
    """A partial round (UpdateInfo.complete False) leaves most layers without weights on purpose: the
    layerwise reload puts their own tensors back and warns once per layer; that warning is noise then."""
    import logging
    log = logging.getLogger("vllm.model_executor.model_loader.reload.layerwise")
    level = log.level
    if quiet:
        log.setLevel(logging.ERROR)
    try:
        yield
    finally:
        log.setLevel(level)


def _repack_tied_heads(model: torch.nn.Module) -> None:
    """vLLM's CPU build prepacks lm_head's matrix when a model loads. A head tied to the embedding
    receives no weights of its own (they arrive as embed_tokens), so the layerwise reload never
    re-packs it and the head keeps computing with the old weights. Re-pack it (a no-op on GPUs)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
    for head in [m for m in model.modules() if isinstance(m, ParallelLMHead)]:
        tied = any(m is not head and getattr(m, "weight", None) is head.weight for m in model.modules())
        if tied and getattr(head, "quant_method", None) is not None:
            head.quant_method.process_weights_after_loading(head)


class _Source(WeightSource):
    """vLLM's WeightSource over our ParamStream (same metadata, same iteration)."""

    def __init__(self, stream: ParamStream):
        self.stream = stream

    def metadata(self) -> list[VLLMParamMeta]:
        return [VLLMParamMeta(m.name, m.dtype, m.shape) for m in self.stream.metadata()]

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return iter(self.stream)


def wire_buffer_bytes(meta: list[ParamMeta], floor: int = WIRE_BUFFER_BYTES) -> int:
    """The packed buffer for a stream: `floor`, or the stream's largest tensor if that is larger.
    vLLM's IPC packer raises on a tensor larger than its buffer (Qwen3-0.6B's embedding in bf16 is
    311 MB) and its NCCL packer only warns; both keep every other tensor within the buffer."""
    return max([floor, *(m.nbytes for m in meta)])


def trainer_init_info(backend: str, *, rank: int, master_address: str = "", master_port: int = 0,
                      world_size: int = 0, wire_bytes: int = WIRE_BUFFER_BYTES):
    """The trainer init info vLLM's factory dispatches on (its `backend` class attribute)."""
    if backend == "nccl":
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo
        return NCCLTrainerInitInfo(master_address=master_address, master_port=master_port,
                                   world_size=world_size, packed=True, packed_buffer_size_bytes=wire_bytes,
                                   packed_num_buffers=2, rank=rank)
    if backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
        return IPCTrainerInitInfo(packed=True, packed_buffer_size_bytes=wire_bytes, rank=rank)
    raise ValueError(f"sync.backend: {backend!r} is not a vLLM-native transport (nccl, ipc)")


class VLLMNativeSender:
    """Learner side of NCCL / IPC. Built on every learner rank; rank 0 is vLLM's sender."""

    def __init__(self, stream: ParamStream, client, *, backend: str, rank: int, master_address: str = "",
                 master_port: int = 0, wire_floor: int = WIRE_BUFFER_BYTES):
        self.client = client
        info = trainer_init_info(backend, rank=rank, master_address=master_address, master_port=master_port,
                                 world_size=1 + client.num_workers,
                                 wire_bytes=wire_buffer_bytes(stream.metadata(), wire_floor))
        self.engine = WeightTransferTrainerFactory.trainer_init(info, client=client, source=_Source(stream))

    def send(self, version: int) -> None:
        self.client.version = version  # vLLM's engines call finish_weight_update() without one
        self.engine.send_weights()

    def shutdown(self) -> list:
        """Close the engines' ends (bounded), then ours; returns the receivers that did not close."""
        unclosed = self.client.close_weight_transfer() if self.engine.is_sender else []
        self.engine.shutdown()
        return unclosed
