"""Several teachers routed per row (launch/routing.py, launch/teacher_set.py): the manifest keys and their
errors, the per-teacher loss check, the teacher weight in the loss against a float64 reference under any
split, re-assembling scores in row order at the rollout's width, and (Ray) routed scoring equal to each
real HF teacher scoring its rows alone, in the reference loop and the overlapped one."""
import json

import pytest
import torch
import yaml

from launch.config import ManifestError

from launch.manifest import load_manifest
from launch.routing import Router, teacher_specs
from launch.teacher_set import _rollout_rows, merge_scores
from learner.worker import loss_batch
from losses import build_loss
from opd.contracts import TeacherScores, TrainBatch, concat_batches


def two_teacher_doc(assets, tmp_path, **over):
    doc = {"algorithm": "opd", "run": {"name": "mt", "output_dir": str(tmp_path / "runs"), "steps": 2},
           "cluster": {"mode": "local", "num_cpus": 2}, "model": {"path": str(assets["tiny"])},
           "teachers": [{"name": "add", "kind": "hf", "path": str(assets["teacher"])},
                        {"name": "rev", "kind": "hf", "path": str(assets["tiny"]), "weight": 2.0}],
           "teacher_routing": {"field": "task"},
           "rollout": {"prompts_per_step": 4, "samples_per_prompt": 2, "max_new_tokens": 4},
           "learner": {"micro_batch_size": 4, "lr": 1e-3}, "loss": {"name": "sampled_token_rkl"},
           "data": {"train": str(tmp_path / "mixed.jsonl"), "eval": str(assets["eval"])},
           "eval": {"interval": 0, "size": 8}, "logging": {"tensorboard": False}}
    doc.update(over)
    rows = [json.loads(line) for line in assets["train"].read_text().splitlines()][:64]
    (tmp_path / "mixed.jsonl").write_text("".join(json.dumps({**r, "task": "add" if i % 3 else "rev"}) + "\n"
                                                  for i, r in enumerate(rows)))
    path = tmp_path / "mt.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_teachers_load_and_route_by_field_routes_and_default(assets, tmp_path):
    cfg = load_manifest(two_teacher_doc(assets, tmp_path, teacher_routing={
        "field": "task", "routes": {"subtraction": "rev"}, "default": "add"}))
    specs = teacher_specs(cfg)
    assert [(s.name, s.key, s.config.weight) for s in specs] == [("add", "teachers[0]", 1.0), ("rev", "teachers[1]", 2.0)]
    assert specs[1].config.path == str(assets["tiny"])  # made absolute like teacher.path
    router = Router(cfg)
    rows = [{"task": "add"}, {"task": "rev"}, {"task": "subtraction"}, {"task": "other"}, {}]
    assert router.indices(rows) == [0, 1, 1, 0, 0]
    # `teacher:` is one teacher named "teacher", every row its own
    single = load_manifest(two_teacher_doc(assets, tmp_path, teachers=[], teacher_routing={},
                                           teacher={"kind": "hf", "path": str(assets["tiny"])}))
    assert [(s.name, s.key, s.named) for s in teacher_specs(single)] == [("teacher", "teacher", False)]
    assert Router(single).indices(rows) == [0] * 5


@pytest.mark.parametrize("over,match", [
    ({"teacher_routing": {"field": "task", "default": "sub"}}, r"teacher_routing.default: 'sub' is no teacher's name"),
    ({"teacher_routing": {"field": "task", "routes": {"x": "nobody"}}},
     r"teacher_routing.routes: 'x' -> 'nobody', which is no teacher's name \(teachers: add, rev\)"),
    ({"teacher_routing": {}}, r"teacher_routing.field: several teachers need a data field"),
    ({"teacher": {"kind": "hf", "path": "/x"}}, r"teacher: and teachers: are both set"),
    ({"teachers": [{"name": "a", "kind": "hf", "path": "/x"}, {"name": "a", "kind": "self"}]},
     r"teachers\[1\].name: 'a' is used twice"),
    ({"teachers": [{"kind": "self"}]}, r"teachers\[0\].name: None; each teacher needs a name"),
    ({"teachers": [{"name": "a", "kind": "hf"}]}, r"teachers\[0\].path: required for teachers\[0\].kind 'hf'"),
    ({"teachers": [{"name": "a", "kind": "self", "weight": 0}]}, r"teachers\[0\].weight: must be > 0"),
    ({"teachers": [{"name": "a", "kind": "self", "wieght": 2}]}, r"unknown key 'teachers\[\].wieght'; did you mean 'teachers\[\].weight'"),
    ({"teachers": [{"name": "a", "kind": "hf", "path": "/x", "live": True}]},
     r"teachers\[0\].live: only a self-teacher \(teachers\[0\].kind: self\)"),
])
def test_bad_teachers_are_refused_naming_the_key(assets, tmp_path, over, match):
    with pytest.raises(ManifestError, match=match):
        load_manifest(two_teacher_doc(assets, tmp_path, **over), check_paths=False)


def test_a_loss_one_teacher_cannot_serve_is_refused_naming_both(assets, tmp_path):
    """full_reverse_kl needs the whole teacher distribution: the HF teacher serves it, the vLLM one (CPU
    build) does not; the error names that teacher, its key and the loss, before any work."""
    doc = two_teacher_doc(assets, tmp_path, loss={"name": "full_reverse_kl"}, teachers=[
        {"name": "add", "kind": "hf", "path": str(assets["teacher"])},
        {"name": "rev", "kind": "vllm", "path": str(assets["tiny"])}])
    with pytest.raises(ManifestError, match=r"loss.name: 'full_reverse_kl' needs .* which teachers\[1\] "
                                            r"\(teacher 'rev', a 'vllm' teacher"):
        load_manifest(doc)
    load_manifest(two_teacher_doc(assets, tmp_path, loss={"name": "sampled_token_rkl"}, teachers=[
        {"name": "add", "kind": "hf", "path": str(assets["teacher"])},
        {"name": "rev", "kind": "vllm", "path": str(assets["tiny"])}]))  # a loss both can serve passes


def test_unrouted_rows_stop_the_run_before_any_work(assets, tmp_path):
    from launch.inputs import load_inputs
    cfg = load_manifest(two_teacher_doc(assets, tmp_path, teacher_routing={"field": "task", "routes": {"add": "add"}}))
    cfg.teacher_routing.routes, cfg.teachers[1].name = {}, "reversal"  # rows say "rev": no teacher has that name
    with pytest.raises(ManifestError, match=r"teacher_routing: 22 row\(s\) of data.train name no teacher in field "
                                            r"'task' \(e.g. 'rev'; teachers: add, reversal\)"):
        load_inputs(cfg)


def weighted_batch(seed=0, n=6, width=5, vocab=7):
    g = torch.Generator().manual_seed(seed)
    lengths = [5, 1, 3, 0, 4, 2][:n]
    mask = torch.tensor([[j < L for j in range(width)] for L in lengths])
    full = torch.log_softmax(torch.randn(n, width, vocab, dtype=torch.float64, generator=g), -1)
    return TrainBatch(prompt_ids=[[1]] * n, completion_ids=torch.randint(0, vocab, (n, width), generator=g),
                      completion_mask=mask, teacher=TeacherScores(full_logprobs=full),
                      row_weights=torch.tensor([1.0, 2.0, 0.5, 2.0, 1.0, 3.0]))


@pytest.mark.parametrize("reduction", ["token_mean", "sample_mean"])
def test_teacher_weight_scales_rows_over_unweighted_global_denominators(reduction):
    """L = sum_i w_i sum_t m_it KL(p_it || q_it) / D_i (D: the global count of loss.reduction, not
    re-weighted), against a float64 brute force, for its value and gradient, under any micro-batch split."""
    b = weighted_batch()
    n, width, vocab = b.teacher.full_logprobs.shape
    z = torch.randn(n * width, vocab, dtype=torch.float64, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loss = build_loss("full_reverse_kl", {}, temperature=1.0)
    counts = b.denominators(reduction)
    tokens = int(b.completion_mask.sum())
    expect = z.new_zeros(())
    for i in range(n):
        for t in range(int(b.completion_mask[i].sum())):
            logp = torch.log_softmax(z[i * width + t], -1)
            kl = (logp.exp() * (logp - b.teacher.full_logprobs[i, t])).sum()
            d = tokens if reduction == "token_mean" else int(b.completion_mask[i].sum()) * n
            expect = expect + float(b.row_weights[i]) * kl / d
    (expect_grad,) = torch.autograd.grad(expect, z)
    for parts in ([list(range(n))], [[0, 1, 2], [3, 4, 5]], [[i] for i in range(n)]):
        got, grad = 0.0, torch.zeros_like(z)
        for p in parts:
            rows = torch.cat([torch.arange(i * width, (i + 1) * width) for i in p])
            zp = z.detach()[rows].clone().requires_grad_()
            value, _ = loss(zp, loss_batch(b.select(p), counts, reduction=reduction))
            (g,) = torch.autograd.grad(value, zp)
            got, grad[rows] = got + value.detach(), g
        torch.testing.assert_close(got, expect.detach(), rtol=1e-6, atol=1e-9)
        torch.testing.assert_close(grad, expect_grad, rtol=1e-6, atol=1e-9)
    # weight 1 everywhere is the unweighted loss bit for bit; no weights (None) the same
    ones = loss_batch(TrainBatch(**{**b.__dict__, "row_weights": torch.ones(n)}), counts, reduction=reduction)
    none = loss_batch(TrainBatch(**{**b.__dict__, "row_weights": None}), counts, reduction=reduction)
    assert torch.equal(ones.weights, none.weights)


def test_row_weights_survive_concat_with_reference_rows():
    b = weighted_batch()
    ref = TrainBatch(prompt_ids=[[1]], completion_ids=torch.zeros(1, 3, dtype=torch.long),
                     completion_mask=torch.ones(1, 3, dtype=torch.bool), is_reference=torch.ones(1, dtype=torch.bool))
    both = concat_batches(b, ref)
    assert both.row_weights.tolist() == b.row_weights.tolist() + [1.0]
    assert concat_batches(ref, ref).row_weights is None


def test_scores_are_reassembled_in_row_order_at_the_rollout_width():
    a = TeacherScores(sampled_logprobs=torch.tensor([[1., 2, 3], [4, 5, 6]]), entropy=torch.ones(2, 3),
                      topk_ids=torch.tensor([[[1], [2], [3]], [[4], [5], [6]]]))
    b = TeacherScores(sampled_logprobs=torch.tensor([[7., 8]]), topk_ids=torch.tensor([[[7], [8]]]))  # narrower
    m = merge_scores([([0, 2], a), ([1], b)], 3, 3)
    assert m.sampled_logprobs.tolist() == [[1, 2, 3], [7, 8, 0], [4, 5, 6]]
    assert m.topk_ids[:, :, 0].tolist() == [[1, 2, 3], [7, 8, 0], [4, 5, 6]]
    assert m.entropy is None  # a statistic only one teacher sent
    assert merge_scores([([0, 1], a)], 2, 3) is a  # one teacher, every row in order: untouched
    wide = TeacherScores(full_logprobs=torch.zeros(1, 3, 5))
    with pytest.raises(ValueError, match=r"full_logprobs have shapes \[\(5,\), \(7,\)\].*same embedding rows"):
        merge_scores([([0], wide), ([1], TeacherScores(full_logprobs=torch.zeros(1, 3, 7)))], 2, 3)


# ---------------------------------------------------------------- Ray: the routed path, real HF teachers

def test_routed_scoring_equals_each_teacher_scoring_its_rows_alone(ray_session, assets, tmp_path):
    """A TeacherSet of two real HF teachers (Ray actors) on a real rollout: each row's scores are those its
    teacher gives when it scores its rows alone, in-process, bit for bit, in the reference loop's call and in
    the overlapped loop's (scoring chained onto the engines' replies)."""
    from launch.session import Setup
    from launch.inputs import load_inputs
    from teachers.hf_teacher import HFTeacher
    cfg = load_manifest(two_teacher_doc(assets, tmp_path, loss={"name": "full_reverse_kl"},
                                        rollout={"prompts_per_step": 6, "samples_per_prompt": 1, "max_new_tokens": 4},
                                        learner={"micro_batch_size": 6, "lr": 1e-3}, teachers=[
                                            {"name": "add", "kind": "hf", "path": str(assets["teacher"])},
                                            {"name": "rev", "kind": "hf", "path": str(assets["tiny"]), "weight": 2.0,
                                             "num_actors": 2}]))
    inputs = load_inputs(cfg)
    s = Setup(cfg, inputs)
    try:
        rows = inputs.train.rows[:12]
        route = inputs.router.indices(rows)
        assert 0 < sum(route) < len(rows)
        pending = s.rollouts.submit(s.fmt.students(rows), s.sampling_at(1))
        chained = s.teachers.submit_score(rows, pending)
        rollout = s.rollouts.collect(pending)
        width = rollout.completion_ids.shape[1]
        routed = s.teachers.score(rows, rollout)
        overlapped = s.teachers.collect_score(chained, width)
        torch.set_num_threads(1)  # as the actors run (cluster.threads_per_actor), so kernels sum alike
        for g, spec in enumerate(s.specs):
            idx = [i for i, r in enumerate(route) if r == g]
            alone = HFTeacher(spec.config.path, "float32", student_path=cfg.model.path).score(
                inputs.teacher_fmts[g].teachers([rows[i] for i in idx]), rollout.completion_ids[idx],
                rollout.completion_mask[idx], s.requests[g])
            for got in (routed.scores, overlapped.scores):
                assert got.full_logprobs.shape[:2] == (len(rows), width)
                for name in ("sampled_logprobs", "full_logprobs", "sampled_rank", "entropy"):
                    assert torch.equal(getattr(got, name)[idx], getattr(alone, name)), (spec.name, name)
        assert [p[1] for p in routed.parts] == [[i for i, r in enumerate(route) if r == g] for g in range(2)]
        stats = s.teachers.stats(rollout, routed)
        assert stats["teacher/add/rows"] + stats["teacher/rev/rows"] == len(rows)
        assert {"teacher/logprob_sampled", "teacher/add/logprob_sampled", "teacher/rev/entropy",
                "teacher/rev/reverse_kl_sampled"} <= set(stats)
        assert s.teachers.row_weights(rows).tolist() == [2.0 if r else 1.0 for r in route]
        # a teacher with fewer rows than actors (here 1 row, 2 actors) scores them on as many actors as rows
        one = [route.index(1), route.index(0)]
        few = s.teachers.score([rows[i] for i in one], _rollout_rows(rollout, one))
        torch.testing.assert_close(few.scores.full_logprobs, routed.scores.full_logprobs[one], rtol=1e-5, atol=1e-5)
    finally:
        s.shutdown()


def run_metrics(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_opd_train_routes_rows_to_an_hf_teacher_and_a_self_teacher_one_step_off(ray_session, assets, tmp_path):
    """`opd train` end to end with rollout.max_lag 1: an HF teacher and OPSD's self-teacher (its own
    privileged prompt) each score their rows of every step; statistics per teacher and overall."""
    from launch.cli import main
    path = two_teacher_doc(assets, tmp_path, rollout={"prompts_per_step": 4, "samples_per_prompt": 2,
                                                      "max_new_tokens": 4, "max_lag": 1},
                           teachers=[{"name": "add", "kind": "hf", "path": str(assets["teacher"])},
                                     {"name": "rev", "kind": "self", "prompt_template": "{hint}{prompt}", "weight": 0.5}],
                           run={"name": "mt", "output_dir": str(tmp_path / "runs"), "steps": 3})
    assert main(["train", str(path)]) == 0
    steps = [m for m in run_metrics(tmp_path / "runs" / "mt" / "metrics.jsonl") if "train/loss" in m]
    assert [m["step"] for m in steps] == [1, 2, 3] and [m["rollout/lag"] for m in steps] == [0, 1, 1]
    for m in steps:
        assert m["teacher/add/rows"] + m.get("teacher/rev/rows", 0) == 8
        assert {"teacher/logprob_sampled", "teacher/add/logprob_sampled", "teacher/add/reverse_kl_sampled"} <= set(m)
    assert any("opsd/rev/pi_gap_nats" in m for m in steps)  # the self-teacher's PI gap, over its rows only
    assert all(torch.isfinite(torch.tensor(m["train/loss"])) for m in steps)


def test_one_teacher_in_a_list_gives_the_metrics_of_teacher(ray_session, assets, tmp_path):
    """`teacher:` and `teachers: [that teacher, named]` run the same computation: every metric both log
    is equal bit for bit (stage timings aside); the list adds only its teacher/<name>/ statistics."""
    from launch.cli import main
    base = dict(teachers=[], teacher_routing={}, teacher={"kind": "hf", "path": str(assets["teacher"])},
                loss={"name": "full_reverse_kl"})
    runs = {}
    for name, over in (("single", base), ("listed", {**base, "teacher": {}, "teachers": [
            {"name": "only", "kind": "hf", "path": str(assets["teacher"])}]})):
        (tmp_path / name).mkdir()
        path = two_teacher_doc(assets, tmp_path / name, **over)
        assert main(["train", str(path)]) == 0
        runs[name] = run_metrics(tmp_path / name / "runs" / "mt" / "metrics.jsonl")
    timing = ("time/", "perf/")
    for a, b in zip(*runs.values(), strict=True):
        extra = {k for k in b if k.startswith("teacher/only/")}
        assert extra or "train/loss" not in b
        assert {k: v for k, v in a.items() if not k.startswith(timing)} == \
               {k: v for k, v in b.items() if not k.startswith(timing) and k not in extra}
