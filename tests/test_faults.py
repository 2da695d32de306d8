"""Faults survived or reported by name, with real Ray actors and DeepSpeed: a rollout engine and a
teacher killed mid-step are replaced and the run's metrics do not change; a learner rank that dies
stops the run naming it, and the last checkpoint resumes; a non-finite step is skipped without
touching the weights; too many stop the run; a call past its deadline names the actor; an
unreachable cluster answers in bounded time; local Ray listens on loopback only."""
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray
import torch

import launch.step
from launch.cli import main
from launch.cluster import LearnerGroup, RolloutGroup, TeacherGroup, check_address
from launch.config import ManifestError
from launch.manifest import load_manifest
from launch.remote import ActorPool, RunStopped, gather
from conftest import reference_sections

REPO = Path(__file__).resolve().parents[1]


def metrics(run_dir, drop=("time/", "perf/", "faults/")):
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]


def kill_before(monkeypatch, cls, method, at_calls, actor_index=0):
    """Kill actor `actor_index` of the group just as its `at_calls`-th call (1-based) starts."""
    original, calls = getattr(cls, method), []

    def wrapped(self, *args, **kw):
        calls.append(1)
        if len(calls) in at_calls:
            ray.kill(self.actors[actor_index], no_restart=True)
        return original(self, *args, **kw)
    monkeypatch.setattr(cls, method, wrapped)


def test_killed_rollout_engine_and_teacher_are_replaced_and_change_nothing(reference_run, write_manifest, tmp_path,
                                                                          monkeypatch, capsys):
    # Calls to generate: eval at step 0, then one per step (and evals). Kill engine 1 as step 2 samples,
    # and the teacher as step 3 scores.
    kill_before(monkeypatch, RolloutGroup, "generate", at_calls={3}, actor_index=1)
    kill_before(monkeypatch, TeacherGroup, "score", at_calls={3})
    assert main(["train", str(write_manifest(**reference_sections("faulty", tmp_path / "runs")))]) == 0
    out = capsys.readouterr().out
    assert "rollout engine 1.generate: the actor died" in out and "teacher 0.score: the actor died" in out
    faulty = tmp_path / "runs" / "faulty"
    assert metrics(faulty) == metrics(reference_run)
    restarts = {r["step"]: r["faults/restarts"] for r in metrics(faulty, drop=()) if "faults/restarts" in r}
    assert restarts == {1: 0, 2: 1, 3: 1, 4: 0}
    assert json.loads((faulty / "summary.json").read_text())["actor_restarts"] == 2


def test_learner_rank_failure_stops_the_run_by_name_and_the_checkpoint_resumes(ray_session, write_manifest,
                                                                               tmp_path, monkeypatch, capsys):
    manifest = write_manifest(run={"name": "t", "output_dir": str(tmp_path / "runs"), "steps": 3},
                              checkpoint={"interval": 1}, eval={"interval": 0})
    original, calls = LearnerGroup.train_step, []

    def dies_at_step_2(self, batch):
        calls.append(1)
        if len(calls) == 2:
            ray.kill(self.ranks[0], no_restart=True)
        return original(self, batch)
    monkeypatch.setattr(LearnerGroup, "train_step", dies_at_step_2)
    assert main(["train", str(manifest)]) == 1
    err = capsys.readouterr().err
    assert "opd: run stopped: learner rank 0.train_step: the actor died" in err
    assert "step1: continue with run.resume=true" in err
    monkeypatch.setattr(LearnerGroup, "train_step", original)
    assert main(["train", str(manifest), "run.resume=true"]) == 0
    steps = [r["step"] for r in metrics(tmp_path / "runs" / "t") if "train/loss" in r]
    assert steps == [1, 2, 3]


def nan_teacher_at(monkeypatch, steps):
    """Teacher log-probs of NaN in the batches of the given steps (so the loss is NaN there)."""
    original, calls = launch.step.distill_batch, []

    def poisoned(rollout, scores):
        calls.append(1)
        if len(calls) in steps:
            scores.sampled_logprobs = torch.full_like(scores.sampled_logprobs, float("nan"))
        return original(rollout, scores)
    monkeypatch.setattr(launch.step, "distill_batch", poisoned)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_nonfinite_step_is_skipped_without_touching_the_weights(ray_session, write_manifest, tmp_path, monkeypatch,
                                                                zero_stage):
    nan_teacher_at(monkeypatch, {2})
    manifest = write_manifest(run={"name": "t", "output_dir": str(tmp_path / "runs"), "steps": 3},
                              checkpoint={"interval": 1, "keep": 3}, eval={"interval": 0},
                              learner={"micro_batch_size": 4, "lr": 1e-3, "zero_stage": zero_stage})
    assert main(["train", str(manifest)]) == 0
    run = tmp_path / "runs" / "t"
    steps = {r["step"]: r for r in metrics(run) if "train/loss" in r}
    assert [steps[s]["train/skipped_nonfinite"] for s in (1, 2, 3)] == [0.0, 1.0, 0.0]
    assert torch.isnan(torch.tensor(steps[2]["train/loss"])) and torch.isfinite(torch.tensor(steps[3]["train/loss"]))

    def weights(step):
        return torch.load(run / "checkpoints" / f"step{step}" / "mp_rank_00_model_states.pt",
                          weights_only=False)["module"]
    w1, w2, w3 = weights(1), weights(2), weights(3)
    assert all(torch.equal(w1[k], w2[k]) for k in w1)  # the skipped step changed nothing
    assert any(not torch.equal(w2[k], w3[k]) for k in w2)  # and the next one trained
    assert json.loads((run / "summary.json").read_text())["skipped_nonfinite_steps"] == 1


def test_too_many_nonfinite_steps_in_a_row_stop_the_run(ray_session, write_manifest, tmp_path, monkeypatch, capsys):
    nan_teacher_at(monkeypatch, {2, 3, 4})
    manifest = write_manifest(run={"name": "t", "output_dir": str(tmp_path / "runs"), "steps": 4},
                              learner={"micro_batch_size": 4, "max_nonfinite_steps": 2}, eval={"interval": 0})
    assert main(["train", str(manifest)]) == 1
    err = capsys.readouterr().err
    assert "opd: run stopped: step 3: train/loss is nan, 2 non-finite steps in a row " \
           "(learner.max_nonfinite_steps = 2)" in err


@ray.remote
class Napper:
    def nap(self, seconds: float) -> str:
        time.sleep(seconds)
        return "rested"


def test_a_call_past_its_deadline_names_the_actor_and_method(ray_session):
    a = Napper.remote()
    with pytest.raises(RunStopped, match=r"^napper 0.nap: no answer within cluster.call_timeout_s = 0.5s$"):
        gather([("napper 0.nap", a.nap.remote(30))], timeout_s=0.5)
    ray.kill(a)


def test_pool_replaces_a_dead_actor_and_retries_and_names_a_late_one(ray_session):
    made = []

    def make(i):
        made.append(i)
        return Napper.options(num_cpus=0).remote()
    pool = ActorPool("napper", make, 2, timeout_s=5)
    replaced = []
    pool.on_replace = replaced.extend
    ray.kill(pool.actors[0], no_restart=True)
    assert pool.call("nap", [(0,), (0,)]) == ["rested", "rested"]
    assert made == [0, 1, 0] and replaced == [0] and pool.replaced == 1
    strict = ActorPool("napper", make, 2, timeout_s=60, retries=0)
    strict.call("nap", [(0,), (0,)])  # started
    strict.timeout_s = 1
    with pytest.raises(RunStopped, match=r"^napper 1.nap: no answer within cluster.call_timeout_s = 1s, after 0"):
        strict.call("nap", [(0,), (30,)])
    for a in pool.actors + strict.actors:
        ray.kill(a)


def test_unreachable_cluster_address_fails_fast_before_the_run_folder(write_manifest, tmp_path, capsys):
    t = time.monotonic()
    manifest = write_manifest()
    assert main(["train", str(manifest), "cluster.mode=ray", "cluster.address=127.0.0.1:1"]) == 2
    assert "opd: bad input: cluster.address: no Ray head answers at 127.0.0.1:1" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()
    with pytest.raises(ManifestError, match=r"cluster.address: 'head' is not host:port \(e.g. 10.0.0.1:6379\) or auto"):
        check_address(load_manifest(manifest, ["cluster.mode=ray", "cluster.address=head"]))
    assert time.monotonic() - t < 20


def test_local_ray_listens_on_loopback_only_and_starts_no_dashboard(write_manifest):
    script = """
import json, sys, psutil, ray
from launch.cluster import start_ray
from launch.manifest import load_manifest
start_ray(load_manifest(sys.argv[1], ["cluster.num_cpus=1"]))
me = psutil.Process()
pids = {me.pid} | {p.pid for p in me.children(recursive=True)}
listening = sorted({c.laddr.ip for c in psutil.net_connections("tcp") if c.status == "LISTEN" and c.pid in pids})
print(json.dumps({"node": ray.nodes()[0]["NodeManagerAddress"], "listening": listening,
                  "dashboard": ray._private.worker.global_worker.node.address_info.get("webui_url")}))
"""
    out = subprocess.run([sys.executable, "-c", script, str(write_manifest())], cwd=REPO, capture_output=True,
                         text=True, timeout=240, env={**os.environ, "PYTHONPATH": str(REPO)})
    got = json.loads(out.stdout.strip().splitlines()[-1])
    assert got["node"] == "127.0.0.1"
    assert got["listening"] and set(got["listening"]) <= {"127.0.0.1", "::ffff:127.0.0.1", "::1"}
    assert not got["dashboard"]
