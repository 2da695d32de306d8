"""Weight sync over the gloo transport, in-process: HF receivers, several at once, wire dtypes,
buckets, errors, shutdown, and the ZeRO-3 gather every transport shares."""
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.hf_engine import HFEngine
from opd.contracts import SamplingSpec
from opd.weight_sync import open_sender
from opd.weight_sync.gloo import GlooInitInfo, GlooSender, UpdateInfo, bucket_plan
from opd.weight_sync.client import EngineGroupClient
from opd.weight_sync.source import ParamMeta, ParamStream

REPO = Path(__file__).resolve().parents[1]


def within(seconds: float, fn, *args):
    """Run fn in a thread; a hang (a rendezvous nobody joins) fails the test instead of stalling it."""
    out: dict = {}

    def run():
        try:
            out["value"] = fn(*args)
        except BaseException as e:  # noqa: BLE001 - re-raised below
            out["error"] = e
    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(seconds)
    assert not t.is_alive(), f"{fn.__name__} did not finish within {seconds}s (deadlock?)"
    if "error" in out:
        raise out["error"]
    return out["value"]


def sender_for(model, targets, dtype=None, bucket_bytes=None):
    stream = ParamStream(model, dtype)
    if bucket_bytes is None:
        return open_sender("gloo", stream, targets, [1] * len(targets), rank=0, address="127.0.0.1")
    info = GlooInitInfo("127.0.0.1", 0, 1 + len(targets), bucket_bytes=bucket_bytes)
    return GlooSender(stream, EngineGroupClient(targets, [1] * len(targets)), rank=0, info=info)


def test_two_receivers_sync_at_once_and_generate_like_the_source(assets):
    """Two in-process engines: the client must call them concurrently (one after another, the first
    blocks in the rendezvous forever), and both end up generating exactly what the source model does."""
    engines = [HFEngine(str(assets["student"])), HFEngine(str(assets["student"]))]
    source = AutoModelForCausalLM.from_pretrained(assets["teacher"])  # same shapes, other weights
    sender = within(60, sender_for, source, engines)
    within(60, sender.send, 3)
    ref = HFEngine(str(assets["teacher"]))
    greedy = SamplingSpec(max_new_tokens=4, temperature=0)
    prompts = [[1, 5, 6, 41], [1, 9, 44]]
    for e in engines:
        assert e.weight_version == 3
        assert all(torch.equal(w, ref.get_weights()[k]) for k, w in e.get_weights().items())
        assert torch.equal(e.generate(prompts, greedy).completion_ids, ref.generate(prompts, greedy).completion_ids)
    within(60, sender.shutdown)
    assert all(e._receiver is None for e in engines)


def test_wire_dtype_is_the_receivers_and_buckets_split_the_stream(assets):
    """A bf16 engine receives bf16 (half the bytes of the learner's float32), in several buckets,
    one parameter larger than a bucket going alone."""
    engine = HFEngine(str(assets["tiny"]), dtype="bfloat16")
    source = AutoModelForCausalLM.from_pretrained(assets["tiny"])
    with torch.no_grad():
        for p in source.parameters():
            p.add_(0.25)
    meta = ParamStream(source, torch.bfloat16).metadata()
    assert {m.dtype for m in meta} == {torch.bfloat16}
    assert set(UpdateInfo.from_metadata(meta).dtype_names) == {"bfloat16"}
    plan = bucket_plan(meta, bucket_bytes=2048)
    assert len(plan) > 2 and sorted(i for b in plan for i in b) == list(range(len(meta)))
    assert any(len(b) == 1 and meta[b[0]].nbytes > 2048 for b in plan)
    sender = within(60, sender_for, source, [engine], torch.bfloat16, 2048)
    within(60, sender.send, 1)
    for name, p in source.named_parameters():
        assert torch.equal(engine.get_weights()[name], p.detach().to(torch.bfloat16)), name
    within(60, sender.shutdown)


def test_bucket_plan_is_deterministic_from_metadata():
    meta = [ParamMeta(f"p{i}", torch.float32, (n,)) for i, n in enumerate([10, 10, 100, 1, 1])]
    assert bucket_plan(meta, bucket_bytes=80) == [[0, 1], [2], [3, 4]]


def test_a_receiver_missing_parameters_fails_at_finish(assets):
    """A sender whose stream lacks parameters the engine has is an error, not a half-updated model."""
    engine = HFEngine(str(assets["tiny"]))
    source = AutoModelForCausalLM.from_pretrained(assets["tiny"])
    sender = within(60, sender_for, source, [engine])
    sender.source.named = sender.source.named[:-1]  # drop lm_head
    with pytest.raises(KeyError, match="parameters not sent: \\['lm_head.weight'\\]"):
        within(60, sender.send, 1)


def test_a_receiver_with_other_shapes_is_refused(assets):
    engine = HFEngine(str(assets["tiny"]))
    source = AutoModelForCausalLM.from_pretrained(assets["student"])  # 128 wide, the engine 64
    sender = within(60, sender_for, source, [engine])
    with pytest.raises(ValueError, match="has shape"):
        within(60, sender.send, 1)


ZERO3_SCRIPT = """
import torch, deepspeed
from learner.worker import join_process_group
join_process_group(0, 1, "gloo")
deepspeed.init_distributed(dist_backend="gloo")
from opd.weight_sync.source import ParamStream
with deepspeed.zero.Init(config_dict_or_path={"train_batch_size": 1, "zero_optimization": {"stage": 3}}):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
named = list(model.named_parameters())
assert all(p.numel() == 0 for _, p in named), "not partitioned"
with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0):
    for i, (_, p) in enumerate(named):
        p.data.copy_(torch.arange(p.numel()).view_as(p.data) + i)
stream = ParamStream(model, torch.bfloat16, bucket_bytes=300)
assert len(list(stream.buckets())) > 1
got = list(stream)  # several gathers; tensors kept past each one
for i, ((name, p), (gname, t), m) in enumerate(zip(named, got, stream.metadata(), strict=True)):
    assert name == gname == m.name and tuple(t.shape) == m.shape == tuple(p.ds_shape), name
    assert t.dtype == torch.bfloat16 and torch.equal(t, (torch.arange(t.numel()).view_as(t) + i).to(t.dtype)), name
print("ZERO3-OK")
"""


def test_zero3_parameters_are_gathered_per_bucket():
    """Real DeepSpeed ZeRO-3 (CPU, gloo, one rank), in a subprocess so torch.distributed stays clean."""
    proc = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert "ZERO3-OK" in proc.stdout, proc.stderr[-3000:]


class FailsMidRound(ParamStream):
    """A learner whose stream breaks after the first bucket: the receivers wait in a broadcast that
    will never come (with NCCL, forever)."""

    def __iter__(self):
        stream = super().__iter__()
        yield next(stream)
        raise RuntimeError("learner failed mid-round")


def test_closing_is_bounded_and_a_receiver_stuck_in_a_broadcast_is_replaced(ray_session, assets):
    """Real Ray actors (HF engines) stuck in a real gloo broadcast: the failed send returns at once,
    closing returns within sync.close_timeout_s naming both receivers, and the pool replaces them with
    engines that answer (a close that waited would wait for the transport's own timeout)."""
    import ray
    from launch.remote import ActorPool
    pool = ActorPool("rollout engine", lambda i: ray.remote(HFEngine).options(num_cpus=0).remote(str(assets["tiny"])),
                     2, timeout_s=120)
    model = AutoModelForCausalLM.from_pretrained(assets["tiny"])

    def connect(stream):
        info = GlooInitInfo("127.0.0.1", 0, 3, bucket_bytes=1024)
        return GlooSender(stream, EngineGroupClient(pool.actors, [1, 1], close_timeout_s=3.0), rank=0, info=info)

    sender = within(120, connect, ParamStream(model))
    within(60, sender.send, 1)
    assert within(30, sender.shutdown) == []  # a healthy group closes with nobody left behind

    sender = within(120, connect, FailsMidRound(model))
    with pytest.raises(RuntimeError, match="learner failed mid-round"):
        within(30, sender.send, 2)
    t0 = time.monotonic()
    stuck = within(30, sender.shutdown)
    assert set(stuck) == set(pool.actors) and time.monotonic() - t0 < 10
    old = list(pool.actors)
    assert pool.replace_stuck(stuck + [old[0]]) == [0, 1] and pool.replace_stuck(old) == []  # replaced once
    greedy = SamplingSpec(max_new_tokens=2, temperature=0)
    assert all(r.completion_mask.any() for r in pool.call("generate", [([[1, 5, 6]], greedy)] * 2))
    for a in pool.actors:
        ray.kill(a)
