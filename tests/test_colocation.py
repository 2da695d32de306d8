"""Colocated engines sleep for the learner's step and wake before the weight sync (a GPU-only mode:
vLLM's CPU build refuses sleep mode, so here the driver's sequencing is checked on its own)."""
from types import SimpleNamespace

import pytest

from launch.driver import Setup


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
    setup = SimpleNamespace(cfg=SimpleNamespace(cluster=SimpleNamespace(colocate=colocate)), rollouts=Engines(log))
    with Setup.engines_asleep(setup):
        log.append("learner step")
    with pytest.raises(RuntimeError):
        with Setup.engines_asleep(setup):
            raise RuntimeError("learner died")
    expected = ["sleep", "learner step", "wake_up", "sleep", "wake_up"] if colocate else ["learner step"]
    assert log == expected
