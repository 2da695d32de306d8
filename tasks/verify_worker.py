"""A long-lived child process that scores (completion, answer) pairs with one function, so that an answer
whose work never ends is killed at its time limit instead of waited on.

Why a process: math-verify's own timeout is signal.alarm, which works only on a process's main thread
(Ray actor threads and the driver's helpers are not), and no thread can be interrupted inside a
C-level big-integer operation (sympy building 9^(9^9)). A process can always be killed.

The worker starts on the first call (importing this module starts nothing), waits for its imports
before the clock of the first answer starts, answers one pair at a time over pipes (JSON lines), and
is killed when an answer runs past its limit: that answer scores 0, and the next call starts a fresh
worker. It exits by itself when its parent goes (its stdin closes).
"""
from __future__ import annotations

import atexit
import importlib
import json
import logging
import os
import select
import subprocess
import sys
import threading
from pathlib import Path
from typing import Optional

_ROOT = Path(__file__).resolve().parent.parent  # the repository: the worker imports `tasks` from it
START_TIMEOUT_S = 120.0  # imports only (sympy); not part of any answer's limit


class BoundedScorer:
    """`scorer(completion, answer, timeout_s) -> float`: `target` ("module:function") run in the worker,
    0.0 for an answer it does not finish within timeout_s seconds. Thread-safe: calls take turns."""

    def __init__(self, target: str):
        self.target = target
        self.calls = 0     # answers scored
        self.timeouts = 0  # answers cut off at their limit (each one restarted the worker)
        self.starts = 0    # workers started
        self._proc: Optional[subprocess.Popen] = None
        self._lock = threading.Lock()
        atexit.register(self.close)

    def __call__(self, completion: str, answer: str, timeout_s: float) -> float:
        with self._lock:
            self.calls += 1
            proc = self._send(json.dumps([completion, answer]) + "\n")
            readable, _, _ = select.select([proc.stdout], [], [], timeout_s)
            line = proc.stdout.readline() if readable else ""
            if not line:  # over the limit (or the worker died on this answer: out of memory)
                self.timeouts += bool(not readable)
                self._kill()
                return 0.0
            return float(json.loads(line))

    def _send(self, request: str) -> subprocess.Popen:
        """Write the request to a live worker, starting one first if there is none (or it has died)."""
        for attempt in (0, 1):
            proc = self._started()
            try:
                proc.stdin.write(request)
                proc.stdin.flush()
                return proc
            except (BrokenPipeError, OSError):
                self._kill()
                if attempt:
                    raise
        raise AssertionError("unreachable")

    def _started(self) -> subprocess.Popen:
        if self._proc is not None and self._proc.poll() is None:
            return self._proc
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(_ROOT), os.environ.get("PYTHONPATH")]))}
        # A session of its own: a Ctrl-C at the terminal is the parent's to handle, not the worker's.
        self._proc = subprocess.Popen([sys.executable, "-m", "tasks.verify_worker", self.target], env=env,
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                                      start_new_session=True)
        self.starts += 1
        readable, _, _ = select.select([self._proc.stdout], [], [], START_TIMEOUT_S)
        if not readable or self._proc.stdout.readline().strip() != "ready":
            self._kill()
            raise RuntimeError(f"{self.target}: its worker process did not start within {START_TIMEOUT_S:g} s "
                               f"(run `{sys.executable} -m tasks.verify_worker {self.target}` to see why)")
        return self._proc

    def _kill(self) -> None:
        proc, self._proc = self._proc, None
        if proc is None:
            return
        proc.kill()
        proc.wait()
        for pipe in (proc.stdin, proc.stdout):
            try:
                pipe.close()
            except OSError:  # a pipe to a killed worker may fail to flush
                pass

    def close(self) -> None:
        with self._lock:
            self._kill()


def _serve(target: str) -> None:
    out, sys.stdout = sys.stdout, sys.stderr  # a library's print must not corrupt the replies
    module, name = target.split(":")
    score = getattr(importlib.import_module(module), name)
    logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled": this process is the timeout
    score("\\boxed{\\frac{1}{2}}", "0.5")  # lazy set-up (the LaTeX grammar) belongs to start-up, not to an answer
    out.write("ready\n")
    out.flush()
    for line in sys.stdin:
        completion, answer = json.loads(line)
        try:
            value = float(score(completion, answer))
        except Exception:  # noqa: BLE001 - a verifier failure on odd text is a wrong answer
            value = 0.0
        out.write(json.dumps(value) + "\n")
        out.flush()


if __name__ == "__main__":
    _serve(sys.argv[1])
