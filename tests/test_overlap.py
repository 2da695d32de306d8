"""The overlapped loop (rollout.max_lag, launch/overlap.py), with real Ray, DeepSpeed and HF engines on
the tiny models: with max_lag 0 it logs exactly what the reference loop logs; with max_lag 1 each
step trains on samples one weight version old, whose behaviour log-probs are that version's; a weight
sync sent to an engine mid-generation waits for the generation; bad values stop before any work."""
import json
import math
import time

import pytest
import ray
import torch

import launch.driver
from launch.cli import main
from launch.cluster import LearnerGroup, RolloutGroup
from launch.config import ManifestError
from launch.derived import sampling_spec
from launch.manifest import load_manifest
from launch.overlap import overlapped_loop
from launch.remote import ActorPool, gather
from opd.contracts import SamplingSpec
from opd.modeling import completion_logits, load_model
from conftest import reference_sections

PROMPTS = [[1, 5, 6, 41, 7, 8, 44], [1, 9, 41, 4, 44], [1, 44], [1, 7, 41, 7, 44]]


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def without(rows, drop=("time/", "perf/", "rollout/lag")):
    return [{k: v for k, v in r.items() if not k.startswith(drop)} for r in rows]


def record_batches(monkeypatch) -> list:
    """Every TrainBatch the driver hands the learner, in order."""
    seen, original = [], LearnerGroup.submit_step

    def wrapped(self, batch):
        seen.append(batch)
        return original(self, batch)
    monkeypatch.setattr(LearnerGroup, "submit_step", wrapped)
    return seen


def test_max_lag_0_through_the_overlapped_loop_logs_what_the_reference_loop_logs(reference_run, write_manifest,
                                                                                 tmp_path, monkeypatch):
    monkeypatch.setattr(launch.driver, "_loop", overlapped_loop)  # train() calls _loop for max_lag 0
    manifest = write_manifest(**reference_sections("overlapped", tmp_path / "runs"))
    assert main(["train", str(manifest), "rollout.max_lag=0"]) == 0
    got, want = metrics(tmp_path / "runs" / "overlapped"), metrics(reference_run)
    assert [r["rollout/lag"] for r in got if "train/loss" in r] == [0, 0, 0, 0]
    assert [r["step"] for r in got if "eval/accuracy" in r] == [0, 2, 4]
    assert without(got) == without(want)


def test_max_lag_1_trains_on_samples_of_the_previous_weights(ray_session, write_manifest, assets, tmp_path,
                                                             monkeypatch):
    batches = record_batches(monkeypatch)
    run = tmp_path / "runs" / "lag1"
    manifest = write_manifest(run={"name": "lag1", "output_dir": str(tmp_path / "runs"), "steps": 3},
                              eval={"interval": 2, "size": 8}, rollout={"max_lag": 1},
                              teacher={"kind": "hf", "path": str(assets["teacher"])},  # not the student: it learns
                              learner={"micro_batch_size": 4, "lr": 1e-2, "schedule": "constant", "warmup_ratio": 0})
    assert main(["train", str(manifest)]) == 0
    rows = metrics(run)
    steps = [r for r in rows if "train/loss" in r]
    assert [r["rollout/lag"] for r in steps] == [0, 1, 1]
    assert [b.weight_version for b in batches] == [0, 0, 1]  # step n trains on samples of version n-2 (n > 1)
    assert all(math.isfinite(r["train/loss"]) and math.isfinite(r["train/grad_norm"]) for r in steps)
    assert [r["step"] for r in rows if "eval/accuracy" in r] == [0, 2, 3]
    assert all("time/rollout_wait_s" in r for r in steps[:2]) and "time/rollout_s" in steps[0]
    assert "time/rollout_s" not in steps[1]  # step 2's rollout was sampled during step 1
    # Step 2's samples came from version 0 (the model on disk), though the learner then held version 1:
    # their behaviour log-probs are version 0's, and the learner's importance ratio moves off 1.
    model, tok = load_model(str(assets["tiny"]), "float32", torch.device("cpu"), 1)
    for b in batches[:2]:
        with torch.no_grad():
            logits = completion_logits(model, b.prompt_ids, b.completion_ids, b.completion_mask, tok.pad_token_id)
        logp = torch.log_softmax(logits.float(), -1).gather(-1, b.completion_ids[..., None]).squeeze(-1)
        m = b.completion_mask
        assert torch.allclose(b.behaviour_logprobs[m], logp[m], atol=1e-5), (b.behaviour_logprobs[m] - logp[m]).abs().max()
    ratio = [r["train/importance_ratio"] for r in steps]
    assert abs(ratio[0] - 1) < 1e-4 and all(1e-3 < abs(x - 1) < 0.5 for x in ratio[1:]), ratio


def test_an_engine_lost_in_flight_is_replaced_and_its_step_samples_again(ray_session, write_manifest, tmp_path,
                                                                          monkeypatch, capsys):
    """Killed while step 2 is sampled ahead: replaced when collected, and step 2 samples again with the
    weights of that time (lag 0); step 3 runs ahead again."""
    original, submits = RolloutGroup.submit, []

    def kill_then_submit(self, prompts, spec):
        submits.append(1)
        if len(submits) == 3:  # eval at step 0, step 1 (blocking), then step 2: sampled ahead during step 1
            ray.kill(self.actors[0], no_restart=True)
        return original(self, prompts, spec)
    monkeypatch.setattr(RolloutGroup, "submit", kill_then_submit)
    run = tmp_path / "runs" / "lost"
    manifest = write_manifest(run={"name": "lost", "output_dir": str(tmp_path / "runs"), "steps": 3},
                              eval={"interval": 0, "size": 8}, rollout={"max_lag": 1})
    assert main(["train", str(manifest)]) == 0
    assert "rollout engine 0.generate: the actor died" in capsys.readouterr().out
    steps = [r for r in metrics(run) if "train/loss" in r]
    assert [r["rollout/lag"] for r in steps] == [0, 0, 1]
    assert [r["faults/restarts"] for r in steps] == [1, 0, 0] and "time/rollout_s" in steps[1]


@pytest.mark.parametrize("engine", ["hf", "vllm"])
def test_a_sync_sent_to_an_engine_mid_generation_waits_for_it(ray_session, placed, write_manifest, assets, engine):
    """Engines as the driver starts them run one method at a time: a weight-sync method sent while
    generate() runs is answered after it, and the rollout carries the version it began with."""
    cfg = load_manifest(write_manifest(), [f"model.path={assets['student']}", f"rollout.engine={engine}",
                                           "rollout.vllm.kv_cache_memory_gb=0.0625", "rollout.vllm.enforce_eager=true"])
    placement = placed(cfg)
    group = RolloutGroup.start(cfg, placement, sampling_spec(cfg), pad_id=0)
    try:
        gather([("engine.__ray_ready__", group.actors[0].__ray_ready__.remote())], 600)
        pending = group.submit(PROMPTS * 8, SamplingSpec(max_new_tokens=48, seed=1))
        sync_call = group.actors[0].weight_sync_workers.remote()  # the first call of every weight sync
        generating = pending.calls[0][1]
        ready, _ = ray.wait([generating, sync_call], num_returns=1, timeout=300)
        assert ready == [generating]
        assert group.collect(pending).weight_version == 0 and ray.get(sync_call) == 1
    finally:
        for a in group.actors:
            ray.kill(a)


@ray.remote(num_cpus=0)
class Napper:
    def nap(self, seconds: float) -> str:
        import time
        time.sleep(seconds)
        return "rested"


def test_a_lost_submitted_call_is_replaced_then_retried_or_handed_back(ray_session):
    pool = ActorPool("napper", lambda i: Napper.remote(), 2, timeout_s=30)
    replaced = []
    pool.on_replace = replaced.extend
    pending = pool.submit("nap", [(0,), (2,)])
    ray.kill(pool.actors[1], no_restart=True)
    assert pool.collect(pending) == ["rested", "rested"] and replaced == [1]
    pending = pool.submit("nap", [(2,), (0,)])  # the killed actor is the one still napping: a 0 s nap may
    ray.kill(pool.actors[0], no_restart=True)     # finish before the kill lands (it did once, in a full run)
    assert pool.collect(pending, retry=False) is None and replaced == [1, 0] and pool.replaced == 2
    assert pool.call("nap", [(0,), (0,)]) == ["rested", "rested"]
    for a in pool.actors:
        ray.kill(a)


@pytest.mark.parametrize("over,match", [
    (["rollout.max_lag=2"], r"^rollout.max_lag: 2 is not allowed; use 0 .* or 1 "),
    (["rollout.max_lag=-1"], r"^rollout.max_lag: -1 is not allowed"),
    (["rollout.max_lag=1", "cluster.mode=ray", "cluster.num_gpus=1", "cluster.colocate=true"],
     r"^rollout.max_lag: 1 needs the engines awake .* cluster.colocate: true"),
    (["rollout.max_lag=1", "teacher.kind=self", "teacher.live=true"],
     r"^rollout.max_lag: 1 with teacher.live: true is refused"),
])
def test_bad_max_lag_is_refused_naming_the_key(write_manifest, over, match):
    with pytest.raises(ManifestError, match=match):
        load_manifest(write_manifest(), over)


def test_max_lag_is_ignored_by_sft_and_refused_by_train_before_any_work(write_manifest, tmp_path, capsys):
    assert load_manifest(write_manifest(), ["algorithm=sft", "loss.name=sft", "rollout.max_lag=1"]).rollout.max_lag == 1
    assert main(["train", str(write_manifest()), "rollout.max_lag=3"]) == 2
    assert "rollout.max_lag: 3 is not allowed" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_teachers_score_a_submitted_rollout_as_they_score_a_collected_one(ray_session, assets):
    """TeacherGroup.submit_score chains scoring onto generation the driver has not collected (two engines,
    two teachers, so teacher slices cross engine slices); the scores equal scoring the collected rollout."""
    from launch.cluster import TeacherGroup
    from actors.hf_engine import HFEngine
    from opd.contracts import ScoreRequest
    from teachers.hf_teacher import HFTeacher
    engines = RolloutGroup(ActorPool("rollout engine", lambda i: ray.remote(HFEngine).remote(
        str(assets["student"]), seed=i), 2, timeout_s=120))
    teachers = TeacherGroup(ActorPool("teacher", lambda i: ray.remote(HFTeacher).remote(str(assets["teacher"])),
                                      2, timeout_s=120))
    prompts = PROMPTS + PROMPTS[:1]  # 5 rows: engine slices 2+3 (rows 0-1, 2-4), teacher slices the same
    teacher_prompts = [[1, 9] + p[1:] for p in prompts]
    request = ScoreRequest(topk=3, temperature=0.9)
    spec = SamplingSpec(max_new_tokens=6, temperature=0.9, seed=3)
    try:
        pending = engines.submit(prompts, spec)
        scored_ahead = teachers.collect_score(teachers.submit_score(teacher_prompts, pending, request))
        rollout = engines.collect(pending)
        scored_now = teachers.score(teacher_prompts, rollout, request)
        for field in ("sampled_logprobs", "topk_ids", "topk_logprobs", "sampled_rank", "entropy"):
            assert torch.equal(getattr(scored_ahead, field), getattr(scored_now, field)), field
        assert scored_now.sampled_logprobs.shape == rollout.completion_ids.shape
    finally:
        for a in engines.actors + teachers.actors:
            ray.kill(a)


def test_the_learner_syncs_after_its_step_only_when_the_step_and_the_generation_succeeded(
        ray_session, write_manifest, assets):
    """LearnerWorker.sync_after_step, in-process (no receivers: the sending itself is test_weight_sync's):
    it waits for the replies it is given, sends when the step changed the weights and every reply
    exists, and answers None (sends nothing) after a skipped step or a failed generation."""
    from learner.worker import LearnerWorker

    @ray.remote(num_cpus=0)
    def fails():
        raise RuntimeError("an engine died")

    cfg = load_manifest(write_manifest(model={"path": str(assets["student"])}))
    worker = LearnerWorker(cfg, 0, 1, rows_per_step=8)
    sent = []
    worker.sync_weights = sent.append
    slow = Napper.remote().nap.remote(1.0)
    t = time.perf_counter()
    assert worker.sync_after_step(3, [slow, ray.put("rollout")]) is not None
    assert time.perf_counter() - t >= 0.9 and sent == [3]  # it waited for the generation in flight
    assert worker.sync_after_step(4, [fails.remote()]) is None and sent == [3]
    worker.last_step_skipped = True
    assert worker.sync_after_step(5, [ray.put("rollout")]) is None and sent == [3]
