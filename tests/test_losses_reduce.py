"""The chunked reduction (losses/reduce.py) and the diagnostics it reduces."""
import math

import pytest
import torch

from losses import LossBatch, build_loss
from losses.reduce import compute_loss
from losses.synthetic import synthetic_batch

LOSSES = [("full_reverse_kl", {}), ("generalized_jsd", {"beta": 0.3}), ("topk_reverse_kl_biased", {"k": 3}),
          ("topk_reverse_kl_tail", {"k": 3, "support": "student"}), ("topk_reverse_kl_renorm", {"k": 3, "support": "intersection"}),
          ("sampled_token_rkl", {"gamma": 0.9, "clip_eps": 0.2}), ("grpo", {}),
          ("topk_reverse_kl_sg", {"k": 3, "support": "student_masked"}),
          ("weighted_sum", {"components": [{"name": "topk_reverse_kl_sg", "weight": 1.0, "params": {"k": 3}},
                                           {"name": "sft", "weight": 0.5}]})]


@pytest.mark.parametrize("name,params", LOSSES, ids=[n for n, _ in LOSSES])
def test_chunked_equals_unchunked(name, params):
    z, b = synthetic_batch(5, 4, 13, k=3, ks=3, seed=11, n_reference=2)  # M = 20
    fn = build_loss(name, params).fn
    v_all, d_all = compute_loss(fn, z, b, 0.7, chunk_size=20)
    (g_all,) = torch.autograd.grad(v_all, z)
    for chunk in (1, 3, 7):  # none divides 20 except 1; 7 splits sequences across chunks
        v, d = compute_loss(fn, z, b, 0.7, chunk_size=chunk)
        (g,) = torch.autograd.grad(v, z)
        torch.testing.assert_close(v, v_all, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(g, g_all, rtol=1e-12, atol=1e-15)
        assert d.keys() == d_all.keys() and d_all
        for key in d:
            torch.testing.assert_close(d[key], d_all[key], rtol=1e-12, atol=1e-15)


def test_bf16_logits_get_a_bf16_gradient_close_to_float32():
    z64, b = synthetic_batch(3, 8, 50, seed=2)
    loss = build_loss("full_reverse_kl")
    z16 = z64.detach().to(torch.bfloat16).requires_grad_()
    z32 = z16.detach().float().requires_grad_()
    v16, _ = loss(z16, b)
    v16.backward()
    v32, _ = loss(z32, b)
    v32.backward()
    assert v16.dtype == torch.float32 and z16.grad.dtype == torch.bfloat16
    torch.testing.assert_close(v16, v32.to(v16.dtype), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(z16.grad.float(), z32.grad, rtol=2e-2, atol=1e-4)


def test_gradient_reaches_parameters_through_non_leaf_logits():
    """As in the learner: logits = hidden @ W, loss(logits).backward() fills W.grad."""
    g = torch.Generator().manual_seed(0)
    _, b = synthetic_batch(2, 3, 7, seed=0)
    hidden = torch.randn(6, 5, dtype=torch.float64, generator=g)
    w = torch.randn(5, 7, dtype=torch.float64, generator=g, requires_grad=True)
    value, _ = build_loss("full_forward_kl", temperature=2.0, chunk_size=4)(hidden @ w, b)
    value.backward()
    w2 = w.detach().clone().requires_grad_()
    logp = torch.log_softmax(hidden @ w2 / 2.0, -1)
    q = b.teacher_full_logprobs.exp()
    ((q * (q.log() - logp)).sum(-1) * b.weights).sum().backward()
    torch.testing.assert_close(w.grad, w2.grad, rtol=1e-10, atol=1e-14)


def test_masked_rows_contribute_nothing():
    z, b = synthetic_batch(3, 4, 9, seed=5)
    loss = build_loss("full_reverse_kl")
    v, _ = loss(z, b)
    (g,) = torch.autograd.grad(v, z)
    masked = b.weights == 0
    assert masked.any() and float(g[masked].abs().max()) == 0.0
    z2 = z.detach().clone()
    z2[masked] = 100.0
    torch.testing.assert_close(loss(z2, b)[0], v.detach())


def test_empty_batch():
    b = LossBatch(tokens=torch.zeros(0, dtype=torch.long), weights=torch.zeros(0),
                  teacher_full_logprobs=torch.zeros(0, 5))
    z = torch.zeros(0, 5, requires_grad=True)
    v, d = build_loss("full_reverse_kl")(z, b)
    v.backward()
    assert float(v) == 0.0 and z.grad.shape == (0, 5) and d == {}


def test_logits_shape_mismatch_is_a_clear_error():
    z, b = synthetic_batch(2, 3, 7)
    with pytest.raises(ValueError, match=r"\[M, V\]"):
        build_loss("sft")(z[:4], b)


def test_standard_diagnostics_are_token_means():
    z, b = synthetic_batch(4, 5, 10, k=4, ks=4, seed=9)
    _, d = build_loss("topk_reverse_kl_sg", {"k": 4, "support": "student"}, temperature=1.5)(z, b)
    rows = [t for t in range(len(b.tokens)) if b.weights[t] > 0]
    mean = lambda f: sum(f(t) for t in rows) / len(rows)  # noqa: E731
    p = torch.softmax(z.detach() / 1.5, -1)
    q = b.teacher_full_logprobs.exp()
    s_ids, t_ids = b.student_topk_ids, b.teacher_topk_ids
    expect = {
        "entropy": mean(lambda t: -sum(float(x) * math.log(x) for x in p[t])),
        "reverse_kl": mean(lambda t: sum(float(p[t, v] * (p[t, v] / q[t, v]).log()) for v in range(10))),
        "sampled_log_ratio": mean(lambda t: math.log(p[t, b.tokens[t]]) - float(b.teacher_sampled_logprobs[t])),
        "topk_overlap": mean(lambda t: len(set(s_ids[t].tolist()) & set(t_ids[t].tolist())) / 4),
        "student_mass_on_support": mean(lambda t: float(p[t, s_ids[t]].sum())),
        "teacher_mass_on_support": mean(lambda t: float(q[t, s_ids[t]].sum())),
    }
    assert set(expect) <= set(d)
    for key, val in expect.items():
        assert abs(float(d[key]) - val) < 1e-9, key


def test_upstream_gradient_scale_is_applied():
    """The learner back-propagates loss * (accumulation steps * world size)."""
    z, b = synthetic_batch(2, 4, 9, k=3, ks=3, seed=3)
    loss = build_loss("topk_reverse_kl_tail", {"k": 3}, temperature=0.8, chunk_size=3)
    (g1,) = torch.autograd.grad(loss(z, b)[0], z)
    (g3,) = torch.autograd.grad(3.0 * loss(z, b)[0], z)
    torch.testing.assert_close(g3, 3.0 * g1, rtol=1e-12, atol=1e-15)
    assert g1.abs().max() > 0
