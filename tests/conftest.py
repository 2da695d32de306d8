"""Shared fixtures: tiny HF models, the arithmetic task, manifests, and one Ray session."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import yaml

from opd.env import openmp_env, set_quiet_env

set_quiet_env()
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.update(openmp_env())  # as a local run's actors get it (launch/cluster.py: start_ray)


@pytest.fixture(scope="session")
def assets(tmp_path_factory) -> dict[str, Path]:
    """Tiny models (random init, saved in HF format) and a small arithmetic task."""
    from tasks.arithmetic import write_task
    from tasks.tiny import write_tiny_models
    root = tmp_path_factory.mktemp("assets")
    models = write_tiny_models(root / "models")
    data = write_task(root / "data", digits=2, n_train=512, n_eval=16)
    return {**models, **data}


@pytest.fixture(scope="session")
def qwen3_assets(tmp_path_factory) -> dict[str, Path]:
    """The tiny Qwen3 family (`opd make-tiny --family qwen3`): student, teacher (small vocabulary rows),
    student-151936, teacher-151936 (Qwen3's row count), and the chat-math task's train / eval."""
    from tasks.tiny_qwen3 import write_family
    return write_family(tmp_path_factory.mktemp("tiny-qwen3"), n_train=512, n_eval=32)


def tiny_manifest(assets: dict[str, Path], folder: Path, **over) -> Path:
    """folder/manifest.yaml: a runnable tiny OPD manifest (runs under folder/runs) with `over`'s sections
    merged in."""
    doc = {
        "algorithm": "opd",
        "run": {"name": "t", "output_dir": str(folder / "runs"), "steps": 2},
        # 1 thread, not the default auto: tests compare runs whose stages overlap or not (auto gives them
        # 1 and 2 threads here, so different float sums) and actors' sums against in-process ones
        "cluster": {"mode": "local", "num_cpus": 2, "threads_per_actor": 1},
        "model": {"path": str(assets["tiny"])},
        "teacher": {"kind": "hf", "path": str(assets["tiny"])},
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 4},
        "learner": {"micro_batch_size": 4, "lr": 1e-3},
        "loss": {"name": "sampled_token_rkl"},
        "data": {"train": str(assets["train"]), "eval": str(assets["eval"])},
        "eval": {"interval": 1, "size": 8},
        "logging": {"tensorboard": True},
    }
    for section, value in over.items():
        if isinstance(value, dict) and isinstance(doc.get(section), dict):
            doc[section].update(value)
        else:
            doc[section] = value
    path = folder / "manifest.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def write_manifest(tmp_path, assets):
    """write_manifest(**sections) -> path of a runnable tiny OPD manifest with those overrides."""
    return lambda **over: tiny_manifest(assets, tmp_path, **over)


# The reference run that the fault and overlap tests compare theirs against: 4 steps on 2 rollout engines,
# evaluations at 0, 2 and 4, checkpoints at 2 and 4 (no metric depends on either).
REFERENCE = dict(run={"name": "reference", "steps": 4}, rollout={"num_actors": 2}, eval={"interval": 2, "size": 8},
                 checkpoint={"interval": 2})


def reference_sections(name: str, runs: Path) -> dict:
    """REFERENCE's sections with another run name, writing under `runs`."""
    return {**REFERENCE, "run": {**REFERENCE["run"], "name": name, "output_dir": str(runs)}}


@pytest.fixture(scope="session")
def reference_run(ray_session, assets, tmp_path_factory) -> Path:
    """The run folder of REFERENCE, trained once per session (the tests that compare against it would
    otherwise each train it again)."""
    from launch.cli import main
    folder = tmp_path_factory.mktemp("reference")
    assert main(["train", str(tiny_manifest(assets, folder, **reference_sections("reference", folder / "runs")))]) == 0
    return folder / "runs" / "reference"


@pytest.fixture(scope="session")
def ray_session():
    """One Ray session per test process: under pytest-xdist (make test's default) each worker starts its
    own local cluster on its own ports."""
    import ray
    # the workers inherit QUIET_ENV, DS_ACCELERATOR and GOMP_SPINCOUNT (set above) from this process, as a
    # local run's do (launch/cluster.py: start_ray); a runtime_env would cost every actor a second Python start
    ray.init(num_cpus=2, include_dashboard=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture
def placed(ray_session):
    """Placement(cfg) for a test that starts actors by hand. Every group it made is removed at teardown, which
    kills the actors placed in it, whatever the test raised: a failed test must not leave the shared Ray
    session's CPUs held, so that the tests after it time out placing theirs."""
    from launch.placement import Placement
    made = []

    def place(cfg):
        made.append(Placement(cfg))
        return made[-1]
    yield place
    for placement in made:
        placement.remove()


# ---------------------------------------------------------------- tiers
# `make check` runs the fast tier (-m "not slow"): in-process tests of losses, configs, data, verifiers and
# models. A test is slow when it starts Ray (the ray_session fixture), builds a vLLM engine or a DeepSpeed
# learner, or runs whole experiments: those fixtures and modules mark it here, so a new test lands in the
# right tier by what it uses. `make test` (CI) runs both tiers.
SLOW_FIXTURES = {"ray_session", "placed", "reference_run", "chat_student", "engines", "vllm_teacher"}
SLOW_MODULES = {"test_vllm", "test_faults", "test_overlap", "test_resume", "test_end_to_end", "test_experiment",
                "test_ray_job", "test_paper_keys_end_to_end", "test_learner_paper_keys", "test_learner_sync",
                "test_weight_sync", "test_colocation", "test_gpu_smoke", "test_paper_cpu", "test_in_process"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())) or item.module.__name__.split(".")[-1] in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
