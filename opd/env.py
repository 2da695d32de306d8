"""The environment a run's processes share, in one place: quiet (no progress bars or info logs from
transformers and the Hub) and offline (models and tokenizers come from local folders; nothing is
downloaded mid-run); how the actors' OpenMP threads wait (openmp_env); and which ninja builds DeepSpeed's
ops (own_ninja_first). Read by the `opd` command (launch/cli.py), the actors Ray starts
(launch/cluster.py), the learner (learner/worker.py), the tests (tests/conftest.py) and the benchmarks; benchmarks/gpu_smoke.py keeps its
own, as it runs alone on a GPU machine with only torch."""
from __future__ import annotations

import os
import sys

QUIET_ENV = {"TRANSFORMERS_VERBOSITY": "error", "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
             "TOKENIZERS_PARALLELISM": "false"}

# The processes a run or a benchmark starts (Ray's actors, subprocesses) also ignore Python warnings, which
# would otherwise repeat once per actor; the `opd` process filters its own (launch/cli.py), and a test
# process keeps them for pytest to report.
CHILD_ENV = {**QUIET_ENV, "PYTHONWARNINGS": "ignore"}


def openmp_env() -> dict[str, str]:
    """How a run's actors' OpenMP threads wait between parallel regions: spin 10,000 rounds, then sleep
    (libgomp's default spins 300,000, the CPU torch wheels' OpenMP). Two busy processes beside a run on 2
    cores made 2-thread actors 1.4-1.6x slower than 1-thread ones with the default spin; with this
    setting they were as fast as 1 thread, and idle as fast as the default (docs/benchmarks.md, "Threads
    per actor"). That is what lets cluster.threads_per_actor default to auto. Nothing is set where the
    user has chosen (OMP_WAIT_POLICY or GOMP_SPINCOUNT in the environment)."""
    if "OMP_WAIT_POLICY" in os.environ or "GOMP_SPINCOUNT" in os.environ:
        return {}
    return {"GOMP_SPINCOUNT": "10000"}


def set_quiet_env() -> None:
    """QUIET_ENV into this process's environment, each variable only where it is not set (a user's own
    value wins)."""
    for key, value in QUIET_ENV.items():
        os.environ.setdefault(key, value)


def own_ninja_first() -> None:
    """Put this interpreter's scripts folder first on PATH when it holds a `ninja` (pip's, which DeepSpeed
    and vLLM require). torch builds DeepSpeed's JIT ops, such as the CPU communication op (30-40 s here),
    with the first `ninja` on PATH, and caches them in ~/.cache/torch_extensions. This machine also has a
    system ninja (1.11) beside the environment's (1.13), and each version starts the other's build log
    over, so a run whose PATH began with the environment (a `ray job`, an activated venv) and one started
    by the environment's python alone rebuilt the op in turn. Called before DeepSpeed builds anything: by
    the learner (learner/worker.py) and by `make install`'s build of the op."""
    scripts = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if os.path.isfile(os.path.join(scripts, "ninja")) and path.split(os.pathsep)[0] != scripts:
        os.environ["PATH"] = scripts + os.pathsep + path
