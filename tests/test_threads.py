"""cluster.threads_per_actor: auto (launch/derived.py), the default: the cores over the actors that work at
once, at least one each; explicit numbers stay as they are; anything else is refused naming the key. The
actors' OpenMP threads spin briefly, then sleep, when out of work (opd/env.py: openmp_env)."""
from pathlib import Path

import pytest
import yaml

import launch.derived
from launch.config import ManifestError
from launch.derived import actors_at_once, auto_threads, local_cores, resolve_teacher_head_thread
from launch.manifest import load_manifest
from opd.env import openmp_env


@pytest.mark.parametrize("cores,busy,threads", [(2, 1, 2), (2, 3, 1), (16, 3, 5), (16, 4, 4), (1, 1, 1), (8, 0, 8)])
def test_the_rule(cores, busy, threads):
    assert auto_threads(cores, busy) == threads


@pytest.mark.parametrize("over,busy", [
    ([], 1),  # rollout, then teacher, then learner: one actor computes at a time
    (["rollout.num_actors=2", "teacher.num_actors=3"], 3),  # the busiest stage
    (["rollout.max_lag=1"], 3),  # every stage at once
    (["rollout.pipeline_chunks=2", "learner.micro_batch_size=2"], 3),
    (["rollout.max_lag=1", "rollout.num_actors=2", "learner.num_ranks=2", "learner.micro_batch_size=2"], 5),
    (["algorithm=sft", "loss.name=sft", "teacher.kind=none", "learner.micro_batch_size=2"], 1),
    (["algorithm=grpo", "loss.name=grpo", "teacher.kind=none", "rollout.max_lag=1"], 2),  # no teacher
])
def test_actors_at_once(write_manifest, over, busy):
    assert actors_at_once(load_manifest(write_manifest(), over)) == busy


def test_auto_is_resolved_from_the_cores_and_numbers_are_kept(write_manifest, monkeypatch):
    monkeypatch.setattr(launch.derived.os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    cfg = load_manifest(write_manifest(), ["cluster.threads_per_actor=auto", "cluster.num_cpus=6"])
    assert local_cores(cfg) == 6  # at most what Ray may use
    assert cfg.cluster.threads_per_actor == 6  # on-policy: one stage at a time
    cfg = load_manifest(write_manifest(), ["cluster.threads_per_actor=auto", "cluster.num_cpus=6", "rollout.max_lag=1"])
    assert cfg.cluster.threads_per_actor == 2
    cfg = load_manifest(write_manifest(), ["cluster.threads_per_actor=auto", "cluster.num_cpus=16", "rollout.max_lag=1"])
    assert cfg.cluster.threads_per_actor == 2  # the affinity (8 cores) bounds it too
    assert load_manifest(write_manifest(), ["cluster.threads_per_actor=3"]).cluster.threads_per_actor == 3
    cfg = load_manifest(write_manifest(), ["cluster.threads_per_actor=auto", "cluster.mode=ray"])
    assert cfg.cluster.threads_per_actor == "auto"  # ray mode: resolved by the run from the nodes' CPUs


@pytest.mark.parametrize("over,thread", [
    ([], "false"),  # on-policy: auto gives the learner both cores
    (["rollout.max_lag=1"], "true"),  # 1 thread an actor, and a core the learner's second thread can have
    (["rollout.pipeline_chunks=2", "learner.micro_batch_size=2"], "true"),
    (["rollout.max_lag=1", "learner.num_ranks=2", "learner.micro_batch_size=2"], "false"),  # 2 ranks: 2 cores
    (["cluster.threads_per_actor=1"], "true"),
    (["learner.teacher_head_thread=false", "rollout.max_lag=1"], "false"),  # a user's choice is kept
    (["learner.teacher_head_thread=true"], "true"),
    (["cluster.mode=ray"], "auto"),  # resolved by the run, from the nodes' CPUs (launch/session.py)
])
def test_teacher_head_thread_auto(write_manifest, monkeypatch, over, thread):
    """learner.teacher_head_thread: auto is on where the learner's threads leave as many cores again."""
    monkeypatch.setattr(launch.derived.os, "sched_getaffinity", lambda pid: set(range(2)), raising=False)
    cfg = load_manifest(write_manifest(), ["cluster.threads_per_actor=auto", "cluster.num_cpus=2", *over])
    assert cfg.learner.teacher_head_thread == thread


def test_teacher_head_thread_auto_is_off_for_a_learner_on_a_gpu(write_manifest):
    cfg = load_manifest(write_manifest(), ["cluster.mode=ray", "rollout.max_lag=1", "cluster.threads_per_actor=1"])
    cfg.cluster.num_gpus = 1  # (local mode refuses GPUs this machine lacks; ray mode resolves it in the run)
    resolve_teacher_head_thread(cfg, 16)
    assert cfg.learner.teacher_head_thread == "false"
    cfg.cluster.num_gpus, cfg.learner.teacher_head_thread = 0, "auto"
    resolve_teacher_head_thread(cfg, 16)
    assert cfg.learner.teacher_head_thread == "true"


def test_a_bad_teacher_head_thread_is_refused(write_manifest):
    with pytest.raises(ManifestError, match=r"^learner.teacher_head_thread: "):
        load_manifest(write_manifest(), ["learner.teacher_head_thread=sometimes"])


@pytest.mark.parametrize("value", ["0", "-1", "fast", "1.5", "true"])
def test_bad_values_are_refused(write_manifest, value):
    with pytest.raises(ManifestError, match=r"^cluster.threads_per_actor: .* is not a positive number of threads or auto"):
        load_manifest(write_manifest(), [f"cluster.threads_per_actor={value}"])


def test_auto_is_the_default(write_manifest, monkeypatch):
    monkeypatch.setattr(launch.derived.os, "sched_getaffinity", lambda pid: set(range(4)), raising=False)
    path = write_manifest()
    doc = yaml.safe_load(path.read_text())
    del doc["cluster"]["threads_per_actor"]  # the tests' manifests pin 1 (tests/conftest.py)
    path.write_text(yaml.safe_dump(doc))
    assert load_manifest(path).cluster.threads_per_actor == 2  # num_cpus 2, one stage at a time
    assert load_manifest(path, ["rollout.max_lag=1"]).cluster.threads_per_actor == 1  # three actors at once
    doc["extends"] = str(Path(__file__).resolve().parent.parent / "configs" / "base.yaml")
    path.write_text(yaml.safe_dump(doc))
    assert load_manifest(path).cluster.threads_per_actor == 2  # configs/base.yaml says auto too


def test_actors_threads_spin_briefly_unless_the_user_has_chosen(monkeypatch):
    monkeypatch.delenv("OMP_WAIT_POLICY", raising=False)
    monkeypatch.delenv("GOMP_SPINCOUNT", raising=False)
    assert openmp_env() == {"GOMP_SPINCOUNT": "10000"}
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert openmp_env() == {}
    monkeypatch.delenv("OMP_WAIT_POLICY")
    monkeypatch.setenv("GOMP_SPINCOUNT", "INFINITY")
    assert openmp_env() == {}
