"""Colocated engines sleep for the learner's step and wake before the weight sync, after the learner has
handed back the memory its allocator caches (a GPU-only mode: vLLM's CPU build refuses sleep mode, so
here the driver's sequencing is checked on its own; benchmarks/gpu_smoke.py measures it on a GPU)."""
from types import SimpleNamespace

import pytest

from launch.session import Setup


class Learner:
    def __init__(self, log):
        self.log = log

    def call(self, method):
        self.log.append(method)


class Engines:
    def __init__(self, log):
        self.log = log

    def sleep(self):
        self.log.append("sleep")

    def wake_up(self):
        self.log.append("wake_up")


@pytest.mark.parametrize("colocate", [True, False])
def test_engines_sleep_through_the_learner_step_and_wake_even_if_it_fails(colocate):
    log = []
    setup = SimpleNamespace(cfg=SimpleNamespace(cluster=SimpleNamespace(colocate=colocate)), rollouts=Engines(log),
                            learner=Learner(log))
    with Setup.engines_asleep(setup):
        log.append("learner step")
    with pytest.raises(RuntimeError):
        with Setup.engines_asleep(setup):
            raise RuntimeError("learner died")
    expected = (["sleep", "learner step", "release_memory", "wake_up", "sleep", "release_memory", "wake_up"]
                if colocate else ["learner step"])
    assert log == expected
