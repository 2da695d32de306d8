"""Building losses from a manifest: errors, declared needs, teacher checks, weighted_sum routing,
group-normalised advantages, the teacher-tail policy and the discounting contract."""
import pytest
import torch

from losses import REGISTRY, LossBatch, Needs, build_loss, check_teacher, group_normalised_advantages
from losses.synthetic import synthetic_batch
from teachers.base import TeacherCapabilities


def test_unknown_name_names_the_field_and_suggests():
    with pytest.raises(ValueError, match=r"loss\.name: unknown loss 'topk_reverse_kl_gs'.*did you mean 'topk_reverse_kl_sg'"):
        build_loss("topk_reverse_kl_gs")


@pytest.mark.parametrize("name,params,fragment", [
    ("full_reverse_kl", {"beta": 0.5}, "beta"),
    ("topk_reverse_kl_sg", {"support": "both"}, "support='both'"),
    ("topk_reverse_kl_biased", {"support": "intersection"}, "support='intersection'"),
    ("topk_reverse_kl_tail", {"k": 0}, "k=0"),
    ("topk_forward_kl", {"tail": "yes"}, "tail="),
    ("topk_reverse_kl_tail", {"teacher_tail_floor": 0.0}, "teacher_tail_floor"),
    ("generalized_jsd", {"beta": 1.5}, "beta=1.5"),
    ("sampled_token_rkl", {"gamma": 2.0}, "gamma=2.0"),
    ("sampled_token_rkl", {"clip_eps": -0.1}, "clip_eps=-0.1"),
    ("grpo", {"clip_eps": None}, "clip_eps"),
    ("weighted_sum", {}, "components=None"),
    ("weighted_sum", {"components": [{"weight": 1.0}]}, r"components\[0\]"),
    ("weighted_sum", {"components": [{"name": "sft"}, {"name": "nope"}]}, r"components\[1\]\.name"),
    ("weighted_sum", {"components": [{"name": "weighted_sum"}]}, r"components\[0\]\.name"),
    ("weighted_sum", {"components": [{"name": "sft"}, {"name": "sft"}]}, r"components\[1\]\.label"),
    ("weighted_sum", {"components": [{"name": "sft", "weight": "x"}]}, r"components\[0\]\.weight"),
    ("weighted_sum", {"components": [{"name": "sft"}, {"name": "topk_reverse_kl_sg", "params": {"kk": 3}}]},
     r"components\[1\]\.params.*kk"),
])
def test_bad_params_name_loss_params(name, params, fragment):
    with pytest.raises(ValueError, match=r"loss\.params: .*" + fragment):
        build_loss(name, params)


def test_every_registered_loss_has_a_formula_docstring():
    assert len(REGISTRY) >= 13
    for spec in REGISTRY.values():
        assert "loss" in spec.doc and len(spec.doc) > 60, spec.name


@pytest.mark.parametrize("name,params,expect", [
    ("topk_reverse_kl_sg", {"k": 8, "support": "student"},
     Needs(student_topk=8, teacher_at_student_topk=True, needs_teacher=True)),
    ("topk_reverse_kl_biased", {"k": 8}, Needs(teacher_topk=8, needs_teacher=True)),
    ("topk_reverse_kl_renorm", {"k": 5, "support": "intersection"},
     Needs(teacher_topk=5, student_topk=5, needs_teacher=True)),
    ("full_reverse_kl", {}, Needs(teacher_full=True, needs_teacher=True)),
    ("sampled_token_rkl", {}, Needs(teacher_sampled=True, behaviour_logprobs=True, needs_teacher=True)),
    ("sampled_token_rkl", {"gamma": 0.9},
     Needs(teacher_sampled=True, behaviour_logprobs=True, needs_teacher=True, sequence_ids=True)),
    ("grpo", {}, Needs(advantages=True, behaviour_logprobs=True)),
    ("sft", {}, Needs(reference_rows=True)),
    ("weighted_sum", {"components": [{"name": "topk_reverse_kl_sg", "params": {"k": 4, "support": "student"}},
                                     {"name": "topk_forward_kl", "params": {"k": 16}}, {"name": "sft", "weight": 0.1}]},
     Needs(student_topk=4, teacher_at_student_topk=True, teacher_topk=16, reference_rows=True, needs_teacher=True)),
])
def test_declared_needs(name, params, expect):
    assert build_loss(name, params).needs == expect


VLLM_LIKE = TeacherCapabilities(full_vocab=False, logprobs_at_any_ids=False, max_topk=20)
HF_LIKE = TeacherCapabilities(full_vocab=True, logprobs_at_any_ids=True, max_topk=1000)


@pytest.mark.parametrize("name,params,fragment", [
    ("full_reverse_kl", {}, "full_vocab"),
    ("topk_reverse_kl_sg", {"k": 8, "support": "student"}, "logprobs_at_any_ids"),
    ("topk_reverse_kl_tail", {"k": 64}, "top-64"),
])
def test_teacher_that_cannot_serve_the_loss_is_rejected(name, params, fragment):
    loss = build_loss(name, params)
    with pytest.raises(ValueError, match=rf"loss\.name: '{name}' needs .*{fragment}"):
        check_teacher(loss, VLLM_LIKE, "teacher 'vllm'")
    check_teacher(loss, HF_LIKE)


def test_teacher_support_loss_is_accepted_by_a_topk_only_teacher():
    check_teacher(build_loss("topk_reverse_kl_sg", {"k": 20}), VLLM_LIKE)


def test_weighted_sum_routes_sft_to_reference_rows_and_distillation_to_the_rest():
    z, b = synthetic_batch(5, 4, 11, k=3, ks=3, seed=8, n_reference=2)
    ref, clean = b.is_reference, LossBatch(**b.__dict__)
    b.teacher_sampled_logprobs = torch.where(ref, torch.nan, b.teacher_sampled_logprobs)  # unfilled on SFT rows
    mix = build_loss("weighted_sum", {"components": [
        {"name": "sampled_token_rkl", "weight": 1.0}, {"name": "sft", "weight": 0.25, "label": "anchor"}]})
    value, diags = mix(z, b)
    (g,) = torch.autograd.grad(value, z)

    def alone(name, rows, weight):
        sub = LossBatch(**{**clean.__dict__, "weights": torch.where(rows, b.weights, 0.0)})
        v, d = build_loss(name)(z, sub)
        return weight * v, d
    v1, d1 = alone("sampled_token_rkl", ~ref, 1.0)
    v2, d2 = alone("sft", ref, 0.25)
    (g_expect,) = torch.autograd.grad(v1 + v2, z)
    assert torch.isfinite(value) and torch.isfinite(g).all()
    torch.testing.assert_close(value, v1 + v2)
    torch.testing.assert_close(g, g_expect)
    torch.testing.assert_close(diags["anchor/nll"], d2["nll"])
    torch.testing.assert_close(diags["sampled_token_rkl/entropy"], d1["entropy"])
    torch.testing.assert_close(diags["anchor/rows"], b.weights[ref].sum())
    torch.testing.assert_close(diags["anchor/loss"], v2 / 0.25)


def test_group_normalised_advantages_match_brute_force():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 5.0, 2.0, 2.0, 7.0])
    groups = torch.tensor([0, 0, 0, 0, 4, 4, 9, 9, 2])
    out = group_normalised_advantages(rewards, groups, eps=1e-6)
    for g in groups.unique():
        r = rewards[groups == g].double().tolist()
        mean = sum(r) / len(r)
        std = (sum((x - mean) ** 2 for x in r) / len(r)) ** 0.5
        expect = [(x - mean) / (std + 1e-6) for x in r]
        assert torch.allclose(out[groups == g].double(), torch.tensor(expect, dtype=torch.float64), atol=1e-5)
    assert float(out[-1]) == 0.0  # a one-sample group and a constant group carry no signal
    assert out[6:8].abs().max() == 0.0
    centred = group_normalised_advantages(rewards, groups, divide_by_std=False)
    assert torch.allclose(centred[4:6], torch.tensor([-1.0, 1.0]))


def test_discounting_without_sequence_ids_is_a_clear_error():
    z, b = synthetic_batch(2, 3, 5)
    b.seq_ids = None
    with pytest.raises(ValueError, match="LossBatch.seq_ids"):
        build_loss("sampled_token_rkl", {"gamma": 0.5})(z, b)


def test_teacher_tail_below_floor_is_clamped_and_counted():
    """Rounding can push Q(S) past 1; the tail is raised to teacher_tail_floor and counted."""
    logq = torch.log(torch.tensor([[0.6, 0.40001], [0.5, 0.3]], dtype=torch.float64))
    b = LossBatch(tokens=torch.zeros(2, dtype=torch.long), weights=torch.tensor([0.5, 0.5], dtype=torch.float64),
                  teacher_topk_ids=torch.tensor([[0, 1], [0, 1]]), teacher_topk_logprobs=logq)
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0], [0.0, 0.0, 0.0, 0.0]], dtype=torch.float64, requires_grad=True)
    for name, params in (("topk_reverse_kl_tail", {"k": 2, "teacher_tail_floor": 1e-4}),
                         ("topk_forward_kl", {"k": 2, "tail": True, "teacher_tail_floor": 1e-4})):
        value, diags = build_loss(name, params)(z, b)
        (g,) = torch.autograd.grad(value, z)
        assert torch.isfinite(value) and torch.isfinite(g).all()
        assert float(diags["teacher_tail_clamped"]) == 0.5  # row 0 clamped, row 1 (tail 0.2) not
    p = torch.softmax(z.detach()[0], -1)
    pt = 1 - p[:2].sum()
    head = (p[:2] * (p[:2].log() - logq[0])).sum()
    expect_row0 = head + pt * (pt.log() - torch.log(torch.tensor(1e-4, dtype=torch.float64)))
    v, _ = build_loss("topk_reverse_kl_tail", {"k": 2, "teacher_tail_floor": 1e-4})(
        z, LossBatch(**{**b.__dict__, "weights": torch.tensor([1.0, 0.0], dtype=torch.float64)}))
    torch.testing.assert_close(v, expect_row0)


def test_intersection_counts_empty_supports():
    z, b = synthetic_batch(6, 5, 40, k=2, ks=2, seed=1, empty_seq=False)
    _, d = build_loss("topk_reverse_kl_renorm", {"k": 2, "support": "intersection"})(z, b)
    empty = sum(float(w) for t, w in enumerate(b.weights)
                if not set(b.student_topk_ids[t].tolist()) & set(b.teacher_topk_ids[t].tolist()))
    assert empty > 0 and abs(float(d["empty_support"]) - empty) < 1e-12


def test_topk_width_smaller_than_k_is_a_clear_error():
    z, b = synthetic_batch(2, 3, 9, k=3, ks=3)
    with pytest.raises(ValueError, match="teacher_topk_ids has 3 columns but the loss uses k=4"):
        build_loss("topk_reverse_kl_sg", {"k": 4})(z, b)


def test_sft_without_is_reference_trains_on_every_row():
    z, b = synthetic_batch(3, 4, 7, seed=4)
    assert b.is_reference is None
    value, _ = build_loss("sft")(z, b)
    nll = -torch.log_softmax(z.detach(), -1).gather(-1, b.tokens[:, None]).squeeze(-1)
    torch.testing.assert_close(value.detach(), (nll * b.weights).sum())
