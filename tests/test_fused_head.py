"""The fused output layer (the loss from hidden states: learner.fused_head) and the hidden-state teacher
(teacher.full_vocab_transport: hidden_states) against the logits / log-prob paths they replace."""
import json
import threading
import dataclasses

import pytest
import torch

from launch.capabilities import teacher_head_path
from launch.config import ManifestError

from launch.manifest import load_manifest
from losses import REGISTRY, LossBatch, build_loss
from losses.reduce import Head, compute_loss, compute_loss_from_hidden
from losses.synthetic import synthetic_batch
from opd.contracts import ScoreRequest
from opd.modeling import completion_hidden, completion_logits, load_output_head, output_head

CASES = [("full_reverse_kl", {}), ("full_forward_kl", {}), ("generalized_jsd", {"beta": 0.3}),
         ("topk_reverse_kl_biased", {"k": 3}), ("topk_reverse_kl_sg", {"k": 3, "support": "student"}),
         ("topk_reverse_kl_tail", {"k": 3, "support": "student"}),
         ("topk_reverse_kl_renorm", {"k": 6, "support": "intersection"}), ("topk_forward_kl", {"k": 3, "tail": True}),
         ("sampled_token_rkl", {"gamma": 0.9, "clip_eps": 0.2}), ("sampled_log_ratio_direct_zero_grad", {}),
         ("grpo", {}), ("sft", {}),
         ("topk_reverse_kl_biased", {"k": 3, "support": "student_masked", "teacher_k": 4}),
         ("weighted_sum", {"components": [{"name": "topk_reverse_kl_sg", "weight": 1.0, "params": {"k": 3}},
                                          {"name": "sft", "weight": 0.5}]})]


def test_every_registered_loss_is_covered():
    assert {n for n, _ in CASES} == set(REGISTRY)


def _hidden_and_head(m: int, vocab: int, hidden: int = 6, seed: int = 3, bias: bool = True):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(m, hidden, generator=g, dtype=torch.float64)
    w = torch.randn(vocab, hidden, generator=g, dtype=torch.float64) * 0.7
    b = torch.randn(vocab, generator=g, dtype=torch.float64) if bias else None
    return h, w, b


def _leaves(*xs):
    return [None if x is None else x.clone().requires_grad_() for x in xs]


@pytest.mark.parametrize("name,params", CASES, ids=[n for n, _ in CASES])
def test_loss_from_hidden_equals_loss_from_logits(name, params):
    """Value, every diagnostic, and the gradients reaching hidden states, head weight and bias."""
    z, b = synthetic_batch(5, 4, 13, k=6, ks=6, seed=11, n_reference=2)  # M = 20 rows, V = 13
    fn = build_loss(name, params).fn
    # hidden states and a head that give exactly the batch's logits (so its top-k ids, tokens etc. fit them)
    w = torch.linalg.qr(torch.randn(13, 13, generator=torch.Generator().manual_seed(1), dtype=torch.float64))[0]
    bias = torch.linspace(-1, 1, 13, dtype=torch.float64)
    h = (z.detach() - bias) @ w
    h1, w1, b1 = _leaves(h, w, bias)
    v1, d1 = compute_loss(fn, h1 @ w1.T + b1, b, 0.7, chunk_size=7)
    v1.backward()
    h2, w2, b2 = _leaves(h, w, bias)
    v2, d2 = compute_loss_from_hidden(fn, h2, Head(w2, b2), b, 0.7, chunk_size=7)  # 7: chunks split sequences
    (2.0 * v2).backward()  # an upstream scale must reach every gradient
    torch.testing.assert_close(v2, v1, rtol=1e-12, atol=1e-14)
    assert d1.keys() == d2.keys() and d1
    for k in d1:
        torch.testing.assert_close(d2[k], d1[k], rtol=1e-12, atol=1e-14)
    for got, want in ((h2, h1), (w2, w1), (b2, b1)):
        torch.testing.assert_close(got.grad, 2.0 * want.grad, rtol=1e-10, atol=1e-13)
    assert h1.grad.abs().sum() > 0 and w1.grad.abs().sum() > 0


def test_fused_head_gradient_reaches_tied_embeddings():
    """A tied head is the embedding matrix: its gradient from the loss adds to the embedding lookup's."""
    torch.manual_seed(0)
    emb = torch.nn.Embedding(13, 6).double()
    _, b = synthetic_batch(4, 3, 13, seed=5, empty_seq=False)
    tokens = torch.randint(0, 13, (12,))
    grads = []
    for fused in (False, True):
        emb.zero_grad()
        h = torch.tanh(emb(tokens))
        head = Head(emb.weight)
        v, _ = (compute_loss_from_hidden(build_loss("full_reverse_kl").fn, h, head, b) if fused
                else compute_loss(build_loss("full_reverse_kl").fn, head(h), b))
        v.backward()
        grads.append(emb.weight.grad.clone())
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-10, atol=1e-13)


@pytest.mark.parametrize("name", ["full_reverse_kl", "full_forward_kl", "generalized_jsd"])
@pytest.mark.parametrize("fused", [False, True])
def test_hidden_state_teacher_equals_full_logprob_teacher(name, fused):
    """The teacher's head applied inside the loss gives what shipping log softmax(head(h) / T) gives."""
    _, b = synthetic_batch(4, 5, 17, seed=2, teacher_full=False)
    h, w, bias = _hidden_and_head(20, 17, seed=4)
    th, tw, tb = _hidden_and_head(20, 17, hidden=9, seed=8)
    temp = 0.8
    logq = torch.log_softmax((th @ tw.T + tb) / temp, -1)
    fn = build_loss(name).fn
    out = []
    for teacher in ("logprobs", "hidden"):
        batch = (LossBatch(**{**b.__dict__, "teacher_full_logprobs": logq}) if teacher == "logprobs"
                 else LossBatch(**{**b.__dict__, "teacher_hidden": th}))
        teacher_head = Head(tw, tb) if teacher == "hidden" else None
        x, wx = _leaves(h, w)
        v, d = (compute_loss_from_hidden(fn, x, Head(wx), batch, temp, 6, teacher_head) if fused
                else compute_loss(fn, x @ wx.T, batch, temp, 6, teacher_head))
        v.backward()
        out.append((v, d, x.grad, wx.grad))
    (v1, d1, g1, gw1), (v2, d2, g2, gw2) = out
    torch.testing.assert_close(v2, v1, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g2, g1, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(gw2, gw1, rtol=1e-10, atol=1e-13)
    assert all(torch.allclose(d1[k], d2[k]) for k in d1)
    # the teacher's token statistics, which a teacher sending log-probs reports itself (launch/batches.py)
    w = b.weights
    at = logq.gather(-1, b.tokens[:, None]).squeeze(-1)
    rank = 1 + (logq > at[:, None]).sum(-1).double()
    want = {"teacher/logprob_sampled": (w * at).sum(), "teacher/rank_sampled": (w * rank).sum(),
            "teacher/top1_fraction": (w * (rank == 1)).sum(), "teacher/entropy": -(w * (logq.exp() * logq).sum(-1)).sum()}
    assert set(d2) - set(d1) == set(want)
    for k, v in want.items():
        torch.testing.assert_close(d2[k], v, rtol=1e-10, atol=1e-12)


@dataclasses.dataclass(frozen=True)
class _ThreadRecordingHead(Head):
    """A teacher head that notes the thread each call runs on."""
    threads: list = dataclasses.field(default_factory=list)

    def __call__(self, hidden):
        self.threads.append(threading.get_ident())
        return super().__call__(hidden)


@pytest.mark.parametrize("name", ["full_reverse_kl", "generalized_jsd", "topk_reverse_kl_sg"])
def test_teacher_head_thread_gives_the_same_bits(name):
    """learner.teacher_head_thread: the teacher's log-probs made on a second thread, chunks ahead, give the
    same loss, gradients and diagnostics (teacher/* included) to the bit, over several chunks; the head
    really runs on that thread (and on the caller's without it)."""
    _, b = synthetic_batch(4, 5, 17, seed=2, teacher_full=False)
    b.is_reference = torch.arange(20) % 7 == 0  # the teacher's statistics count on-policy rows only
    th, tw, tb = _hidden_and_head(20, 17, hidden=9, seed=8)
    h, w, _ = _hidden_and_head(20, 17, seed=4)
    fn = build_loss(name, {"k": 4} if name.startswith("topk") else {}).fn
    out = {}
    for thread in (False, True):
        head = _ThreadRecordingHead(tw, tb)
        x, wx = _leaves(h, w)
        v, d = compute_loss_from_hidden(fn, x, Head(wx), LossBatch(**{**b.__dict__, "teacher_hidden": th}), 0.8, 3,
                                        head, teacher_thread=thread)
        v.backward()
        out[thread] = v, d, x.grad, wx.grad
        assert len(head.threads) == 7  # one call a chunk of 3 rows
        assert (threading.get_ident() in head.threads) != thread
    (v1, d1, g1, gw1), (v2, d2, g2, gw2) = out[False], out[True]
    assert torch.equal(v1, v2) and torch.equal(g1, g2) and torch.equal(gw1, gw2)
    assert list(d1) == list(d2) and "teacher/entropy" in d1
    assert all(torch.equal(d1[k], d2[k]) for k in d1)


def test_a_failure_on_the_teacher_head_thread_is_raised_to_the_caller():
    _, b = synthetic_batch(2, 3, 7, seed=1, teacher_full=False)
    b.teacher_hidden = torch.zeros(6, 4, dtype=torch.float64)
    hidden = torch.zeros(6, 5, dtype=torch.float64, requires_grad=True)
    with pytest.raises(ValueError, match="no teacher head"):
        compute_loss_from_hidden(build_loss("full_reverse_kl").fn, hidden, Head(torch.zeros(7, 5, dtype=torch.float64)),
                                 b, chunk_size=2, teacher_thread=True)


def test_hidden_teacher_without_a_head_is_a_clear_error():
    _, b = synthetic_batch(2, 3, 7, seed=1, teacher_full=False)
    b.teacher_hidden = torch.zeros(6, 4, dtype=torch.float64)
    with pytest.raises(ValueError, match="no teacher head"):
        compute_loss(build_loss("full_reverse_kl").fn, torch.zeros(6, 7, dtype=torch.float64, requires_grad=True), b)


def test_hf_teacher_hidden_states_reproduce_its_log_probs(assets):
    """HFTeacher with hidden_states=True: [N, T, H] that, through the head loaded from disk, give the
    full log-probs it would have shipped; other fields unchanged; H/V of the bytes."""
    from teachers.hf_teacher import HFTeacher
    teacher = HFTeacher(str(assets["teacher"]))
    prompts = [[1, 5, 6], [1, 7]]
    ids = torch.tensor([[8, 9, 10, 2], [11, 12, 0, 0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    full = teacher.score(prompts, ids, mask, ScoreRequest(full_vocab=True, temperature=0.7))
    hid = teacher.score(prompts, ids, mask, ScoreRequest(hidden_states=True, temperature=0.7))
    assert hid.full_logprobs is None and hid.hidden_states.shape == (2, 4, 128)
    head = load_output_head(str(assets["teacher"]))
    logq = torch.log_softmax(head(hid.hidden_states) / 0.7, -1)
    torch.testing.assert_close(logq[mask], full.full_logprobs[mask], rtol=1e-5, atol=1e-5)
    for field in ("sampled_logprobs", "sampled_rank", "entropy"):
        torch.testing.assert_close(getattr(hid, field), getattr(full, field), rtol=1e-5, atol=1e-5)
    assert (hid.hidden_states[~mask] == 0).all()
    assert hid.hidden_states.nbytes * 55 == full.full_logprobs.nbytes * 128  # [.., H] against [.., V]
    # sampled=False: the hidden states alone, and no output layer run
    bare = teacher.score(prompts, ids, mask, ScoreRequest(hidden_states=True, sampled=False, temperature=0.7))
    assert bare.sampled_logprobs is None and bare.entropy is None and torch.equal(bare.hidden_states, hid.hidden_states)


def test_output_head_loaded_from_disk_matches_the_model(assets, tmp_path):
    """Read by name from safetensors, for an untied head and a tied one (saved under the embedding's name)."""
    from transformers import AutoModelForCausalLM
    untied = AutoModelForCausalLM.from_pretrained(assets["tiny"])
    assert torch.equal(load_output_head(str(assets["tiny"])).weight, untied.lm_head.weight)
    untied.config.tie_word_embeddings = True
    tied = AutoModelForCausalLM.from_config(untied.config)
    tied.save_pretrained(tmp_path / "tied")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert torch.equal(load_output_head(str(tmp_path / "tied")).weight, tied.model.embed_tokens.weight)


def test_completion_hidden_through_the_head_gives_completion_logits(assets):
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(assets["tiny"]).eval()
    ids = torch.tensor([[8, 9, 10], [11, 0, 0]])
    mask = ids != 0
    with torch.no_grad():
        logits = completion_logits(model, [[1, 5, 6, 7], [1]], ids, mask, 0)
        hidden = completion_hidden(model, [[1, 5, 6, 7], [1]], ids, mask, 0)
    torch.testing.assert_close(output_head(model)(hidden), logits, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("over,match", [
    ({"teacher": {"full_vocab_transport": "hidden_states"}}, "does not use it"),  # sampled_token_rkl
    ({"teacher": {"full_vocab_transport": "hidden"}}, "teacher.full_vocab_transport"),
    ({"learner": {"fused_head": "yes"}}, "learner.fused_head"),
    ({"learner": {"fused_head": True, "zero_stage": 3}}, "ZeRO stage 3"),
])
def test_bad_transport_or_fused_settings_stop_before_work(write_manifest, over, match):
    with pytest.raises(ManifestError, match=match):
        load_manifest(write_manifest(**over))


def test_learner_steps_agree_across_head_paths_and_teacher_transports(write_manifest, assets, tmp_path):
    """One real DeepSpeed learner step, four ways (logits or fused head x log-prob or hidden-state teacher),
    from the same weights on the same batch: the same loss, diagnostics, gradient norm and new weights;
    and the fused head with a hidden-state teacher with and without the teacher-head thread: the same bits."""
    from learner.worker import LearnerWorker
    from opd.contracts import TrainBatch
    from teachers.hf_teacher import HFTeacher
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (8, 5), generator=g)
    mask = torch.ones(8, 5, dtype=torch.bool)
    mask[2, 3:] = mask[5, 1:] = False
    prompts = [[1, 5 + i, 6] for i in range(8)]
    teacher = HFTeacher(str(assets["teacher"]), student_path=str(assets["student"]))
    results = {}
    ways = [(f, t, "false") for f in ("false", "true") for t in ("logprobs", "hidden_states")]
    for fused, transport, thread in ways + [("true", "hidden_states", "true")]:
        cfg = load_manifest(write_manifest(
            model={"path": str(assets["student"])}, teacher={"kind": "hf", "path": str(assets["teacher"]),
                                                             "full_vocab_transport": transport},
            loss={"name": "full_reverse_kl"},  # SGD: the weight change is lr x the gradient
            learner={"micro_batch_size": 4, "lr": 1.0, "optimizer": "sgd", "fused_head": fused,
                     "teacher_head_thread": thread}))
        request = ScoreRequest(full_vocab=transport == "logprobs", hidden_states=transport == "hidden_states")
        scores = teacher.score(prompts, ids, mask, request)
        batch = TrainBatch(prompt_ids=prompts, completion_ids=ids, completion_mask=mask, teacher=scores)
        worker = LearnerWorker(cfg, 0, 1, rows_per_step=8, teacher_head=teacher_head_path(cfg))
        assert worker.fused_head == (fused == "true") and worker.teacher_thread == (thread == "true")
        metrics = worker.train_step(batch, batch.token_counts)
        weights = {k: v.clone() for k, v in worker.engine.module.state_dict().items()}
        results[fused, transport, thread] = metrics, weights
        del worker
    (m1, w1), (m2, w2) = results["true", "hidden_states", "false"], results.pop(("true", "hidden_states", "true"))
    assert m2 == {k: v for k, v in m1.items() if k != "compute_s"} | {"compute_s": m2["compute_s"]}
    assert all(torch.equal(w1[k], w2[k]) for k in w1)
    (m0, w0), *others = results.values()
    assert m0["loss"] > 0 and m0["grad_norm"] > 0
    for m, w in others:
        for key in ("loss", "grad_norm", "reverse_kl", "entropy"):
            assert m[key] == pytest.approx(m0[key], rel=1e-5), key
        for k in w0:
            torch.testing.assert_close(w[k], w0[k], rtol=1e-5, atol=1e-6)
    (tmp_path / "ok").write_text(json.dumps({k[0] + k[1]: v[0]["loss"] for k, v in results.items()}))


def test_score_request_skips_the_teacher_head_only_when_nothing_else_needs_it():
    from launch.batches import score_request
    from losses import build_loss as b
    full, mixed = b("full_reverse_kl").needs, b("weighted_sum", {"components": [
        {"name": "full_reverse_kl"}, {"name": "sampled_token_rkl"}]}).needs
    assert score_request(full, 1.0).full_vocab and score_request(full, 1.0).sampled
    r = score_request(full, 1.0, "hidden_states")
    assert r.hidden_states and not r.full_vocab and not r.sampled
    assert score_request(mixed, 1.0, "hidden_states").sampled  # sampled_token_rkl reads log q(y_t)
    assert score_request(full, 1.0, "hidden_states", self_teacher=True).sampled  # opsd/pi_gap_nats


def test_training_run_with_hidden_state_teacher_matches_log_prob_teacher(ray_session, write_manifest, assets,
                                                                          tmp_path):
    """`opd train` end to end (Ray actors, DeepSpeed): two steps with each transport log the same losses,
    gradient norms and teacher statistics (the hidden-state run's come from the learner)."""
    from launch.cli import main
    logs = {}
    for transport in ("logprobs", "hidden_states"):
        manifest = write_manifest(model={"path": str(assets["student"])}, loss={"name": "full_reverse_kl"},
                                  teacher={"kind": "hf", "path": str(assets["teacher"]),
                                           "full_vocab_transport": transport},
                                  run={"name": transport, "output_dir": str(tmp_path / "runs"), "steps": 2})
        assert main(["train", str(manifest)]) == 0
        rows = (tmp_path / "runs" / transport / "metrics.jsonl").read_text().splitlines()
        logs[transport] = [r for r in map(json.loads, rows) if "train/loss" in r]
    for a, b in zip(*logs.values()):
        for key in ("train/loss", "train/grad_norm", "train/reverse_kl", "teacher/logprob_sampled",
                    "teacher/rank_sampled", "teacher/entropy", "rollout/response_length"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key


def test_the_teacher_head_is_the_teachers_folder_by_its_kind(write_manifest, assets):
    """The launcher gives the learner the folder of the head it applies to hidden states, from the teacher's
    kind (teachers/kinds.py: weights_path): an HF teacher's own, a frozen self-teacher's the student's; none
    for a live self-teacher (the student's current head) or when the teacher sends log-probs."""
    full = {"loss": {"name": "full_reverse_kl"}}
    hf = load_manifest(write_manifest(teacher={"kind": "hf", "path": str(assets["teacher"])}, **full))
    assert (hf.teacher.full_vocab_transport, teacher_head_path(hf)) == ("hidden_states", hf.teacher.path)
    own = load_manifest(write_manifest(model={"path": str(assets["student"])}, teacher={"kind": "self"}, **full))
    assert (own.teacher.full_vocab_transport, teacher_head_path(own)) == ("hidden_states", own.model.path)
    live = load_manifest(write_manifest(teacher={"kind": "self", "live": True}, **full))
    sent = load_manifest(write_manifest(teacher={"kind": "hf", "path": str(assets["teacher"]),
                                                 "full_vocab_transport": "logprobs"}, **full))
    assert teacher_head_path(live) is None and teacher_head_path(sent) is None


def test_a_learner_without_the_frozen_teachers_head_refuses_its_hidden_states(write_manifest, assets):
    """Without the launcher's teacher_head, a frozen teacher's hidden states stop the step by name instead of
    going through the student's own head."""
    from learner.worker import LearnerWorker
    from opd.contracts import TeacherScores, TrainBatch
    cfg = load_manifest(write_manifest(model={"path": str(assets["student"])},
                                       teacher={"kind": "hf", "path": str(assets["teacher"])},
                                       loss={"name": "full_reverse_kl"}, learner={"micro_batch_size": 2}))
    worker = LearnerWorker(cfg, 0, 1, rows_per_step=2)
    ids, mask = torch.randint(3, 50, (2, 3)), torch.ones(2, 3, dtype=torch.bool)
    batch = TrainBatch(prompt_ids=[[1, 5], [1, 6]], completion_ids=ids, completion_mask=mask,
                       teacher=TeacherScores(sampled_logprobs=torch.zeros(2, 3), hidden_states=torch.zeros(2, 3, 128)))
    with pytest.raises(ValueError, match="no teacher head: build LearnerWorker\\(teacher_head="):
        worker.train_step(batch, batch.token_counts)


@pytest.mark.parametrize("fused", [False, True])
def test_closed_form_gradient_in_row_tiles_equals_autograd_over_whole_chunks(monkeypatch, fused):
    """full_reverse_kl's closed-form gradient, run in row tiles of one row (TILE_BYTES tiny) and of a whole chunk,
    against autograd through the same loss (value_and_grad removed), with a hidden-state teacher whose log-probs
    and statistics are also made tile by tile: the loss and diagnostics equal, the gradients to float64 rounding."""
    import losses.reduce as reduce
    _, b = synthetic_batch(4, 5, 17, seed=5, teacher_full=False)
    h, w, _ = _hidden_and_head(20, 17, seed=6, bias=False)
    th, tw, _ = _hidden_and_head(20, 17, hidden=9, seed=7, bias=False)
    batch = LossBatch(**{**b.__dict__, "teacher_hidden": th})
    loss = build_loss("full_reverse_kl", temperature=0.8, chunk_size=7)
    closed = loss.fn.value_and_grad
    out = {}
    for how, tile_bytes in (("autograd", 2**30), ("one tile", 2**30), ("row tiles", 1)):
        monkeypatch.setattr(reduce, "TILE_BYTES", tile_bytes)
        if how == "autograd":
            monkeypatch.delattr(loss.fn, "value_and_grad")
        else:
            monkeypatch.setattr(loss.fn, "value_and_grad", closed, raising=False)
        tiles = reduce.row_tiles(torch.zeros(7, 17, dtype=torch.float64))  # one row per thread, or the chunk
        assert len(tiles) == (-(-7 // torch.get_num_threads()) if how == "row tiles" else 1)
        x, wx = _leaves(h, w)
        v, d = loss.from_hidden(x, Head(wx), batch, Head(tw)) if fused else loss(x @ wx.T, batch, Head(tw))
        v.backward()
        out[how] = (v, d, x.grad, wx.grad)
    v0, d0, g0, gw0 = out["autograd"]
    assert {"entropy", "reverse_kl", "teacher/rank_sampled", "teacher/entropy"} <= set(d0)
    for how in ("one tile", "row tiles"):
        v, d, g, gw = out[how]
        assert torch.equal(v, v0) and d.keys() == d0.keys() and all(torch.equal(d[k], d0[k]) for k in d)
        torch.testing.assert_close(g, g0, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(gw, gw0, rtol=1e-12, atol=1e-15)
