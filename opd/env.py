"""The environment a run's processes share, in one place: quiet (no progress bars or info logs from
transformers and the Hub) and offline (models and tokenizers come from local folders; nothing is
downloaded mid-run). Read by the `opd` command (launch/cli.py), the actors Ray starts
(launch/cluster.py), the tests (tests/conftest.py) and the benchmarks; benchmarks/gpu_smoke.py keeps its
own, as it runs alone on a GPU machine with only torch."""
from __future__ import annotations

import os

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
