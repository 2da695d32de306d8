"""opd/env.py: the one ninja that builds DeepSpeed's JIT ops. torch runs the first `ninja` on PATH; two
versions (the environment's and a system one) start each other's build log over, so the cached op was
rebuilt whenever a run's PATH began differently from the last one's (a `ray job` against a plain run)."""
import os
import sys

import pytest

import opd.env
from opd.env import own_ninja_first


def _interpreter_in(monkeypatch, folder, with_ninja: bool) -> str:
    folder.mkdir(exist_ok=True)
    if with_ninja:
        (folder / "ninja").write_text("")
    monkeypatch.setattr(opd.env.sys, "executable", str(folder / "python"))
    return str(folder)


def test_the_interpreters_ninja_comes_first_once(monkeypatch, tmp_path):
    scripts = _interpreter_in(monkeypatch, tmp_path / "bin", with_ninja=True)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    own_ninja_first()
    own_ninja_first()
    assert os.environ["PATH"].split(os.pathsep) == [scripts, "/usr/bin", "/bin"]


def test_an_interpreter_without_ninja_leaves_the_path_alone(monkeypatch, tmp_path):
    _interpreter_in(monkeypatch, tmp_path / "bin", with_ninja=False)
    monkeypatch.setenv("PATH", os.pathsep.join(["/usr/bin", "/bin"]))
    own_ninja_first()
    assert os.environ["PATH"] == os.pathsep.join(["/usr/bin", "/bin"])


def test_a_learner_builds_with_its_environments_ninja(monkeypatch, write_manifest, assets):
    """What the learner's DeepSpeed sees when it builds its op, whatever PATH started the process."""
    from launch.manifest import load_manifest
    from learner.worker import LearnerWorker
    scripts = os.path.dirname(sys.executable)
    if not os.path.isfile(os.path.join(scripts, "ninja")):
        pytest.skip(f"{scripts} has no ninja (the project's install puts pip's there)")
    monkeypatch.setenv("PATH", os.pathsep.join(p for p in os.environ["PATH"].split(os.pathsep) if p != scripts))
    LearnerWorker(load_manifest(write_manifest(learner={"micro_batch_size": 2})), 0, 1, rows_per_step=2)
    assert os.environ["PATH"].split(os.pathsep)[0] == scripts
