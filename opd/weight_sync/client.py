"""The learner's handle on every engine that receives weights (vLLM's VLLMWeightSyncClient protocol).

Targets are Ray actor handles or, in unit tests, local objects; both implement the receiver
methods (`init_weight_transfer`, `start_weight_update`, `receive_weights`, `finish_weight_update`,
`close_weight_transfer`). Every call fans out to all targets *at once*: a transport's rendezvous and
broadcast block until every receiver has joined, so calling engines one after another deadlocks.
"""
from __future__ import annotations

import itertools
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Optional, Sequence


CLOSE_TIMEOUT_S = 30.0


class EngineGroupClient:
    def __init__(self, targets: Sequence[Any], workers_per_target: Sequence[int], close_timeout_s: float = CLOSE_TIMEOUT_S):
        self.targets = list(targets)
        self.close_timeout_s = close_timeout_s
        # Each target is an independent engine; its workers take the group ranks after those of
        # the targets before it (rank 0 is the learner). vLLM's own client gives every engine
        # rank_offset 1, which is right only for one data-parallel deployment.
        self.rank_offsets = [1 + s for s in itertools.accumulate([0, *workers_per_target[:-1]])]
        self.num_workers = sum(workers_per_target)
        self.version: Optional[int] = None  # set by senders whose engine finishes without a version

    def _fan_out(self, method: str, per_target: Optional[list[tuple]] = None) -> None:
        args = per_target or [()] * len(self.targets)
        calls = [getattr(t, method) for t in self.targets]
        if all(hasattr(c, "remote") for c in calls):
            import ray
            ray.get([c.remote(*a) for c, a in zip(calls, args)])
            return
        with ThreadPoolExecutor(max(1, len(calls))) as pool:
            for f in [pool.submit(c, *a) for c, a in zip(calls, args)]:
                f.result()

    def init_weight_transfer_engine(self, init_info: dict) -> None:
        if "rank_offset" not in init_info:  # IPC: no group to join, nothing to shift
            self._fan_out("init_weight_transfer", [(init_info,)] * len(self.targets))
            return
        self._fan_out("init_weight_transfer", [({**init_info, "rank_offset": off},) for off in self.rank_offsets])

    def start_weight_update(self) -> None:
        self._fan_out("start_weight_update")

    def update_weights(self, update_info: dict) -> None:
        self._fan_out("receive_weights", [(update_info,)] * len(self.targets))

    def finish_weight_update(self, weight_version: Optional[str] = None) -> None:
        version = self.version if weight_version is None else int(weight_version)
        if version is None:
            raise RuntimeError("weight sync: no version set before finish_weight_update")
        self._fan_out("finish_weight_update", [(version,)] * len(self.targets))

    def close_weight_transfer(self) -> list:
        """Ask every target to close its end, waiting `close_timeout_s` in all. Returns the targets that
        did not close: dead, failed, or still busy. A Ray actor runs one call at a time, so one stuck in a
        broadcast that will never finish (its sender failed mid-round; vLLM also refuses to shut its
        transfer engine down while an update is active) never reaches this call: its caller replaces
        it rather than waiting on it."""
        calls = [t.close_weight_transfer for t in self.targets]
        if all(hasattr(c, "remote") for c in calls):
            import ray
            refs = [c.remote() for c in calls]
            done, _ = ray.wait(refs, num_returns=len(refs), timeout=self.close_timeout_s)
            closed = set()
            for ref in done:
                try:
                    ray.get(ref)
                    closed.add(ref)
                except Exception:  # noqa: BLE001 - a dead or failing receiver: reported, not raised
                    pass
            return [t for t, ref in zip(self.targets, refs) if ref not in closed]
        pool = ThreadPoolExecutor(max(1, len(calls)))
        futures = [pool.submit(c) for c in calls]
        wait(futures, timeout=self.close_timeout_s)
        pool.shutdown(wait=False)  # a stuck receiver's thread must not hold the caller
        return [t for t, f in zip(self.targets, futures) if not f.done() or f.exception() is not None]
