"""Weight-sync transports are a registry (opd/weight_sync/transports.py): `auto` picks from what each
declares, and a transport registered by a test, in one file and one `register_transport` call, passes the
manifest check, is what the launcher resolves, opens the learner's sender and sets the vLLM engine's
environment and backend name."""
from __future__ import annotations

import pytest

from launch.cluster import sync_backend
from launch.config import ManifestError
from launch.manifest import load_manifest
from opd.vllm_llm import LLMSpec, engine_env
from opd.weight_sync import open_sender
from opd.weight_sync.transports import TRANSPORTS, Transport, default_transport, register_transport, transport


def test_auto_picks_gloo_on_cpus_ipc_beside_the_learner_and_nccl_on_gpus_of_their_own():
    layouts = [(False, False), (True, True), (True, False)]  # (on GPUs, colocated)
    assert [default_transport(gpus, colocate).name for gpus, colocate in layouts] == ["gloo", "ipc", "nccl"]
    assert transport("ipc").engine_env == {"VLLM_ALLOW_INSECURE_SERIALIZATION": "1"}
    assert transport("gloo").vllm_backend == "opd_gloo" and not transport("gloo").engine_env


class LoopbackSender:
    """A throwaway sender: remembers what open_sender gave it."""

    def __init__(self, stream, client, *, rank: int, address: str, port: int):
        self.stream, self.client, self.rank, self.address, self.port = stream, client, rank, address, port


@pytest.fixture
def loopback():
    """Registers the transport for one test, then forgets it."""
    t = register_transport(Transport("loopback", LoopbackSender, vllm_backend="opd_loopback",
                                     engine_env={"OPD_LOOPBACK": "1"}))
    yield t
    del TRANSPORTS["loopback"]


def test_a_registered_transport_is_checked_resolved_and_opened(loopback, write_manifest):
    cfg = load_manifest(write_manifest(), ["sync.backend=loopback"])
    assert sync_backend(cfg) == "loopback"
    sender = open_sender("loopback", "stream", ["engine"], [1], rank=0, address="127.0.0.1")
    # port 0: the transport binds one of its own (a port chosen here could be taken before it binds it)
    assert isinstance(sender, LoopbackSender) and sender.stream == "stream" and sender.port == 0
    assert open_sender("loopback", "stream", ["engine"], [1], rank=0, address="127.0.0.1", port=6123).port == 6123
    assert sender.client.targets == ["engine"] and sender.client.num_workers == 1
    assert engine_env(LLMSpec(model="m", dtype="float32", sync_backend="loopback"), cuda=False)["OPD_LOOPBACK"] == "1"


def test_an_unregistered_transport_is_refused_naming_the_registered_ones(write_manifest):
    with pytest.raises(ManifestError, match=r"sync.backend: 'loopback' is not one of \['auto', 'gloo', 'nccl', 'ipc'\]"):
        load_manifest(write_manifest(), ["sync.backend=loopback"])
    with pytest.raises(ValueError, match=r"sync.backend: 'loopback' is not one of \['gloo', 'nccl', 'ipc'\]"):
        open_sender("loopback", None, [], [], rank=0, address="127.0.0.1")
    with pytest.raises(ValueError, match="sync.backend 'gloo' is registered already"):
        register_transport(Transport("gloo", LoopbackSender, vllm_backend="opd_gloo"))
