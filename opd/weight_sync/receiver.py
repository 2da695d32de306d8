"""What every engine that receives the student's weights implements: the calls the learner's
EngineGroupClient (client.py) fans out. HFModelReceiver (gloo.py) implements it for an HF model,
LLMWeightReceiver (opd/vllm_llm.py) for a vllm.LLM; tests/test_protocols.py and mypy hold both to it."""
from __future__ import annotations

from typing import Protocol


class WeightReceiver(Protocol):
    weight_version: int  # the version of the weights it holds

    def weight_sync_workers(self) -> int:
        """Ranks it joins the transfer group with (a vLLM engine: one per worker)."""
        ...

    def init_weight_transfer(self, init_info: dict) -> None:
        """Join the learner's transfer group (init_info: the transport's, with this receiver's rank_offset)."""
        ...

    def start_weight_update(self) -> None: ...

    def receive_weights(self, update_info: dict) -> None:
        """Receive one round (update_info: the parts' names, dtypes and shapes, and whether it is complete)."""
        ...

    def finish_weight_update(self, version: int) -> None:
        """The round is over: hold `version` from now on."""
        ...

    def close_weight_transfer(self) -> None: ...
