"""Remote calls that cannot hang and that say who failed, and actor pools that survive a lost actor.

Every call the driver makes to an actor goes through `gather` (or an `ActorPool`, which uses it):
each call carries a name ("rollout engine 1.generate"), and the whole batch of calls a deadline
(`cluster.call_timeout_s`). A call whose actor died or missed the deadline is *lost*; an exception
raised by the method itself is a bug and propagates as it is.

Rollout engines and teachers hold no state a step depends on (sampling seeds are a function of the
step, weights are re-sent), so a pool replaces a lost actor in its placement slot and retries its
share of the call: the step's result is the same as if nothing had happened.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import ray
from ray.exceptions import RayActorError, RayTaskError


class RunStopped(RuntimeError):
    """The run cannot go on (a learner rank failed, an actor keeps dying, too many non-finite steps).
    The message says what happened; the run's last complete checkpoint stays resumable."""


@dataclass
class Lost:
    """A call whose actor died or did not answer in time."""
    name: str
    why: str


def settle(calls: Sequence[tuple[str, Any]], timeout_s: float, stop_at_loss: bool = False) -> list:
    """Wait for every (name, ObjectRef) call, `timeout_s` in all. Returns each call's result or a
    `Lost`, in order (with stop_at_loss, returns at the first loss: the others may be waiting for the
    lost one in a collective). An exception raised by a method itself stops the run, by name."""
    out: list = [None] * len(calls)
    pending = {ref: i for i, (_, ref) in enumerate(calls)}
    deadline = time.monotonic() + timeout_s
    while pending:
        ready, _ = ray.wait(list(pending), num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not ready:
            for i in pending.values():
                out[i] = Lost(calls[i][0], f"no answer within cluster.call_timeout_s = {timeout_s:g}s")
            break
        i = pending.pop(ready[0])
        try:
            out[i] = ray.get(ready[0])
        except RayActorError as e:
            out[i] = Lost(calls[i][0], f"the actor died ({first_line(e)})")
            if stop_at_loss:
                break
        except RayTaskError as e:
            cause = getattr(e, "cause", None) or e
            raise RunStopped(f"{calls[i][0]} raised {type(cause).__name__}: {first_line(cause)}") from e
    return out


def gather(calls: Sequence[tuple[str, Any]], timeout_s: float) -> list:
    """Like settle, but the first lost call raises RunStopped naming the actor and method."""
    out = settle(calls, timeout_s, stop_at_loss=True)
    for r in out:
        if isinstance(r, Lost):
            raise RunStopped(f"{r.name}: {r.why}")
    return out


def first_line(e: BaseException) -> str:
    lines = [s for s in str(e).splitlines() if s.strip()]
    return lines[0][:300] if lines else type(e).__name__


@dataclass
class Pending:
    """Calls an ActorPool has sent and not yet collected: what to resend if one is lost."""
    method: str
    args: list
    calls: list  # (name, ObjectRef), one per actor


class ActorPool:
    """The actors of one role (rollout engines, teachers). `make(i)` starts actor i in its slot;
    `on_replace(indices)` runs after replacements (the driver re-sends the current weights)."""

    def __init__(self, role: str, make: Callable[[int], Any], n: int, timeout_s: float, retries: int = 2):
        self.role, self.make, self.timeout_s, self.retries = role, make, timeout_s, retries
        self.actors = [make(i) for i in range(n)]
        self.on_replace: Optional[Callable[[list[int]], None]] = None
        self.replaced = 0  # actors replaced since the pool started (faults/restarts in metrics)

    def call(self, method: str, args: Sequence[tuple]) -> list:
        """actor[i].method(*args[i]) on every actor at once; lost calls are retried on a replacement."""
        return self.collect(self.submit(method, args))

    def submit(self, method: str, args: Sequence[tuple]) -> "Pending":
        """Start actor[i].method(*args[i]) on the first len(args) actors (every actor, unless there is less
        work than actors) and return at once (collect() waits)."""
        return Pending(method, list(args), self._send(method, args, range(len(args))))

    def collect(self, pending: "Pending", retry: bool = True) -> Optional[list]:
        """The results of submitted calls, in actor order. The deadline counts from here, not from the
        submission. A lost call's actor is replaced (and on_replace run); then, with retry, its share
        is sent again; without, collect returns None and the caller decides what to do instead."""
        results: list = [None] * len(pending.calls)
        todo, calls, attempt = list(range(len(pending.calls))), pending.calls, 0
        while True:
            out = settle(calls, self.timeout_s)
            lost = [(i, r) for i, r in zip(todo, out) if isinstance(r, Lost)]
            for i, r in zip(todo, out):
                results[i] = r
            if not lost:
                return results
            if attempt == self.retries:
                raise RunStopped(f"{lost[0][1].name}: {lost[0][1].why}, after {self.retries} replacement(s)")
            attempt += 1
            for i, r in lost:
                print(f"opd: {r.name}: {r.why}; starting a new {self.role} {i} in its slot", flush=True)
                self.replace(i)
            if self.on_replace:
                self.on_replace([i for i, _ in lost])
            if not retry:
                return None
            todo = [i for i, _ in lost]
            calls = self._send(pending.method, pending.args, todo)

    def _send(self, method: str, args: Sequence[tuple], indices) -> list[tuple[str, Any]]:
        return [(f"{self.role} {i}.{method}", getattr(self.actors[i], method).remote(*args[i])) for i in indices]

    def replace_stuck(self, handles: Sequence[Any]) -> list[int]:
        """Replace the pool's actors among `handles` (receivers that did not close a transfer group in
        time: busy in a broadcast that will never finish, so no later call would reach them). Handles
        no longer in the pool (already replaced) are ignored. Returns the replaced indices."""
        stuck = [i for i, a in enumerate(self.actors) if a in handles]
        for i in stuck:
            print(f"opd: {self.role} {i} did not close its weight-sync group in time; starting a new one in its slot",
                  flush=True)
            self.replace(i)
        return stuck

    def replace(self, i: int) -> None:
        ray.kill(self.actors[i], no_restart=True)  # a hung actor must give its slot back
        self.actors[i] = self.make(i)
        gather([(f"{self.role} {i} (replacement).__ray_ready__", self.actors[i].__ray_ready__.remote())],
               self.timeout_s)
        self.replaced += 1
