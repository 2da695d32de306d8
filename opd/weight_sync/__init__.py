"""Weight sync: the learner pushes new student weights to every engine that samples or scores with them.

One call sequence for every transport, vLLM's native RL API:
    init (once: the learner's rank 0 opens a group; every receiver joins at its rank offset)
    per step: start_weight_update -> update_weights (concurrent with the broadcast) -> finish_weight_update(version)
Pieces, one idea per file:
    source.py       ParamStream: the student's weights, ZeRO-3 shards gathered per bucket (the one gather)
    client.py       EngineGroupClient: the learner's fan-out to every receiver, all at once
    gloo.py         CPU transport, both ends (HF models receive it; vLLM's CPU build through vllm_native.py)
    vllm_native.py  NCCL / IPC through vLLM's own trainer engines; registers gloo inside vLLM's workers
    transports.py   the registry: one entry per transport (sync.backend), what it needs and how it opens
Receivers implement init_weight_transfer / start_weight_update / receive_weights /
finish_weight_update / close_weight_transfer (+ weight_sync_workers): HFModelReceiver (gloo.py) for
HF models, LLMWeightReceiver (opd/vllm_llm.py) for vLLM.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

from opd.weight_sync.client import CLOSE_TIMEOUT_S, EngineGroupClient
from opd.weight_sync.source import ParamStream
from opd.weight_sync.transports import free_port, transport  # noqa: F401 - free_port re-exported


def open_sender(backend: str, stream: ParamStream, targets: Sequence[Any], workers: Sequence[int], *,
                rank: int, address: str, port: Optional[int] = None, close_timeout_s: float = CLOSE_TIMEOUT_S):
    """A sender for `targets` over `backend`, built on every learner rank (rank 0 drives the
    receivers; the others join the ZeRO-3 gathers). Rank 0 hosts the group at `address`, on `port`
    or one of its own (0). Has send(version) and shutdown(), which waits at most close_timeout_s
    for the receivers and returns those that did not close."""
    opener = transport(backend).open  # an unknown backend is refused before any group opens
    client = EngineGroupClient(targets, workers, close_timeout_s)
    return opener(stream, client, rank=rank, address=address, port=port or 0)
