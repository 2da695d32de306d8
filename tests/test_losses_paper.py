"""The loss pieces of the paper's scripts against brute-force float64 references written here, row by
row: the masked student-support TopK (T1 / T2 with support: student_masked), the KL-to-reference
estimators (loss.kl_to_reference) and the per-sample reduction (loss.reduction: sample_mean)."""
import math

import pytest
import torch

from learner.worker import loss_batch
from losses import build_loss
from losses.reduce import compute_loss
from losses.synthetic import synthetic_batch
from opd.contracts import TeacherScores, TrainBatch

T = 1.3


def probs(z_row):
    e = torch.exp(z_row / T - (z_row / T).max())
    return e / e.sum()


def masked_batch(seed, n=4, length=5, vocab=13, k=4, teacher_k=3, off_policy=0.3):
    """Teacher top-k narrower than the student's support, so some student ids are missing from it;
    rollout top-k log-probs moved off the current policy so a masked term is not trivially 0."""
    z, b = synthetic_batch(n, length, vocab, k=teacher_k, ks=k, seed=seed)
    g = torch.Generator().manual_seed(seed)
    b.student_topk_logprobs = b.student_topk_logprobs + off_policy * torch.randn(b.student_topk_logprobs.shape,
                                                                                 dtype=torch.float64, generator=g)
    return z, b


def ref_masked(z, b, k, teacher_k, stop_grad):
    """sum_t w_t sum_{j<k} p(v_j) (lp(v_j) - c_j), v_j the student's j-th id, c_j the teacher's log-prob
    when v_j is among its first teacher_k ids, else the student's rollout log-prob at v_j."""
    out = z.new_zeros(())
    for t in range(z.shape[0]):
        if b.weights[t] == 0:
            continue
        p = probs(z[t])
        teacher = dict(zip(b.teacher_topk_ids[t, :teacher_k].tolist(), b.teacher_topk_logprobs[t, :teacher_k].tolist()))
        for j, v in enumerate(b.student_topk_ids[t, :k].tolist()):
            c = teacher.get(v, float(b.student_topk_logprobs[t, j]))
            lp = torch.log(p[v])
            out = out + b.weights[t] * p[v] * ((lp.detach() if stop_grad else lp) - c)
    return out


@pytest.mark.parametrize("name", ["topk_reverse_kl_biased", "topk_reverse_kl_sg"])
@pytest.mark.parametrize("k,teacher_k", [(1, 1), (1, 5), (4, 4), (4, 6)])
def test_student_masked_topk_matches_reference(name, k, teacher_k):
    z, b = masked_batch(seed=3 + k + teacher_k, k=4, teacher_k=6)
    loss = build_loss(name, {"k": k, "support": "student_masked", "teacher_k": teacher_k if teacher_k != k else None},
                      temperature=T, chunk_size=3)
    value, diags = loss(z, b)
    (grad,) = torch.autograd.grad(value, z)
    zr = z.detach().clone().requires_grad_()
    expect = ref_masked(zr, b, k, teacher_k, stop_grad=name.endswith("_sg"))
    (expect_grad,) = torch.autograd.grad(expect, zr)
    torch.testing.assert_close(value, expect.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(grad, expect_grad, rtol=1e-8, atol=1e-12)
    found = (b.student_topk_ids[:, :k, None] == b.teacher_topk_ids[:, None, :teacher_k]).any(-1)
    rows = b.weights > 0
    assert 0 < float(found[rows].float().mean()) < 1 or k == 1  # the case really mixes found and missing ids
    hit = float((found.double().mean(-1) * b.weights).sum())
    assert diags["teacher_topk_hit_fraction"] == pytest.approx(hit, rel=1e-12)


def test_student_masked_on_policy_masks_missing_ids_in_t2_but_t1_still_drains_them():
    """Rollout log-probs equal to the current policy's: a missing id's T2 term has value and gradient 0
    (T2 = the loss on the found ids alone); T1's keeps gradient grad p(v) (the biased part)."""
    z, b = synthetic_batch(4, 5, 13, k=3, ks=3, seed=8)
    b.student_topk_logprobs = torch.log_softmax(z.detach() / T, -1).gather(-1, b.student_topk_ids)
    ids = b.student_topk_ids
    found = (ids[:, :, None] == b.teacher_topk_ids[:, None, :]).any(-1)
    live = b.weights > 0
    assert found[live].any() and (~found[live]).any()
    params = {"k": 3, "support": "student_masked"}
    q = b.teacher_full_logprobs.gather(-1, ids)

    def reference(stop_grad: bool):
        zr = z.detach().clone().requires_grad_()
        lp = torch.log_softmax(zr / T, -1).gather(-1, ids)
        on_found = (torch.where(found, lp.exp() * ((lp.detach() if stop_grad else lp) - q), 0.0).sum(-1)
                    * b.weights).sum()
        drain = (torch.where(~found, lp.exp(), 0.0).sum(-1) * b.weights).sum()  # P(missing ids)
        return on_found.detach(), torch.autograd.grad(on_found, zr, retain_graph=True)[0], \
            torch.autograd.grad(drain, zr)[0]

    t2, _ = build_loss("topk_reverse_kl_sg", params, temperature=T)(z, b)
    (g2,) = torch.autograd.grad(t2, z)
    v_found, g_found, _ = reference(stop_grad=True)
    torch.testing.assert_close(t2, v_found, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(g2, g_found, rtol=1e-8, atol=1e-12)
    t1, _ = build_loss("topk_reverse_kl_biased", params, temperature=T)(z, b)
    (g1,) = torch.autograd.grad(t1, z)
    v_found1, g_found1, g_drain = reference(stop_grad=False)
    torch.testing.assert_close(t1, v_found1, rtol=1e-10, atol=1e-13)
    assert g_drain.abs().max() > 1e-3
    torch.testing.assert_close(g1, g_found1 + g_drain, rtol=1e-8, atol=1e-12)


def test_student_masked_needs_only_the_teachers_own_topk():
    loss = build_loss("topk_reverse_kl_sg", {"k": 1, "support": "student_masked", "teacher_k": 5})
    n = loss.needs
    assert (n.student_topk, n.teacher_topk, n.teacher_at_student_topk) == (1, 5, False)
    with pytest.raises(ValueError, match="teacher_k"):
        build_loss("topk_reverse_kl_sg", {"k": 5, "support": "student_masked", "teacher_k": 2})
    with pytest.raises(ValueError, match="teacher_k"):
        build_loss("topk_reverse_kl_sg", {"k": 5, "support": "teacher", "teacher_k": 8})


def test_student_masked_gradcheck():
    """T1's chunked backward is the derivative of its value (T2's stop-gradient is not one by design: its
    gradient is checked against the reference above)."""
    z, b = masked_batch(seed=5, n=2, length=3, vocab=7, k=3, teacher_k=2)
    fn = build_loss("topk_reverse_kl_biased", {"k": 2, "support": "student_masked"}).fn
    assert torch.autograd.gradcheck(lambda x: compute_loss(fn, x, b, T, chunk_size=4)[0], (z,), fast_mode=True)


# ---- KL to a frozen reference ---------------------------------------------------------------------
def ref_kl(z, b, coef, estimator):
    """coef * sum_t w_t kl(log p(y_t), log r(y_t)) over on-policy rows, explicit formulas."""
    out = z.new_zeros(())
    for t in range(z.shape[0]):
        if b.weights[t] == 0 or (b.is_reference is not None and b.is_reference[t]):
            continue
        d = torch.log(probs(z[t])[b.tokens[t]]) - b.frozen_reference_logprobs[t]
        kl = {"k1": d, "k2": d * d / 2, "k3": torch.exp(-d) - 1 + d,
              "low_var_kl": torch.clamp(torch.exp(-d) - 1 + d, -10, 10)}[estimator]
        out = out + b.weights[t] * coef * kl
    return out


def kl_batch(seed, spread=0.5, n_reference=0):
    z, b = synthetic_batch(4, 5, 11, seed=seed, n_reference=n_reference)
    g = torch.Generator().manual_seed(seed)
    logp = torch.log_softmax(z.detach() / T, -1).gather(-1, b.tokens[:, None]).squeeze(-1)
    b.frozen_reference_logprobs = logp + spread * torch.randn(logp.shape, dtype=torch.float64, generator=g)
    return z, b


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3", "low_var_kl"])
def test_kl_to_reference_matches_reference(estimator):
    """The penalty adds exactly coef * estimator to the base loss, on on-policy rows only."""
    z, b = kl_batch(seed=4, spread=4.0 if estimator == "low_var_kl" else 0.5, n_reference=1)
    if estimator == "low_var_kl":  # some tokens beyond the clamp, some inside
        d = torch.log_softmax(z.detach() / T, -1).gather(-1, b.tokens[:, None]).squeeze(-1) - b.frozen_reference_logprobs
        k3 = torch.expm1(-d) + d
        live = (b.weights > 0) & ~b.is_reference
        assert (k3[live] > 10).any() and (k3[live] < 10).any()
    base = build_loss("sft", temperature=T, chunk_size=3)
    loss = build_loss("sft", temperature=T, chunk_size=3, kl_coef=0.7, kl_estimator=estimator)
    assert loss.needs.frozen_reference_logprobs and not base.needs.frozen_reference_logprobs
    v, diags = loss(z, b)
    (g,) = torch.autograd.grad(v, z)
    v0, _ = base(z, b)
    (g0,) = torch.autograd.grad(v0, z)
    zr = z.detach().clone().requires_grad_()
    expect = ref_kl(zr, b, 0.7, estimator)
    (eg,) = torch.autograd.grad(expect, zr)
    torch.testing.assert_close(v - v0, expect.detach(), rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(g - g0, eg, rtol=1e-8, atol=1e-12)
    assert float(diags["kl_to_reference"]) == pytest.approx(float(expect) / 0.7, rel=1e-9)


def test_kl_to_reference_off_leaves_the_loss_untouched_and_gradcheck():
    z, b = kl_batch(seed=6)
    plain = build_loss("sampled_token_rkl", {"gamma": 0.5})
    off = build_loss("sampled_token_rkl", {"gamma": 0.5}, kl_coef=0.0, kl_estimator="k2")
    assert off.needs == plain.needs and not off.needs.frozen_reference_logprobs
    assert torch.equal(off(z, b)[0], plain(z, b)[0])
    on = build_loss("sampled_token_rkl", {"gamma": 0.5}, kl_coef=0.3, kl_estimator="k3")
    assert hasattr(on.fn, "prepare")  # the base loss's per-sequence preparation still runs
    z2, b2 = kl_batch(seed=2)
    z2 = z2[:, :7].detach().requires_grad_()
    b2.tokens = b2.tokens.clamp(max=6)
    fn = build_loss("full_reverse_kl", kl_coef=0.3, kl_estimator="k2").fn
    b2.teacher_full_logprobs = torch.log_softmax(b2.teacher_full_logprobs[:, :7], -1)
    assert torch.autograd.gradcheck(lambda x: compute_loss(fn, x, b2, T, chunk_size=4)[0], (z2,), fast_mode=True)
    with pytest.raises(ValueError, match="kl_to_reference.estimator"):
        build_loss("sft", kl_coef=0.1, kl_estimator="k4")


def test_kl_estimators_expected_gradients():
    """On-policy (y ~ p, exact expectation over the vocabulary): E[grad k1] = 0, E[grad k2] = grad KL(p||r),
    E[grad k3] = grad KL(r||p): what each estimator optimises when back-propagated directly."""
    from losses.kl_reference import kl_estimator
    g = torch.Generator().manual_seed(0)
    z0, logr = torch.randn(9, dtype=torch.float64, generator=g), torch.log_softmax(torch.randn(9, dtype=torch.float64, generator=g), -1)
    expected = {}
    for est in ("k1", "k2", "k3"):
        z = z0.clone().requires_grad_()
        logp = torch.log_softmax(z, -1)
        p = logp.exp().detach()  # the sampling distribution is not differentiated
        (expected[est],) = torch.autograd.grad((p * kl_estimator(logp, logr, est)).sum(), z)
    z = z0.clone().requires_grad_()
    logp = torch.log_softmax(z, -1)
    (rkl,) = torch.autograd.grad((logp.exp() * (logp - logr)).sum(), z)
    z = z0.clone().requires_grad_()
    (fkl,) = torch.autograd.grad((logr.exp() * (logr - torch.log_softmax(z, -1))).sum(), z)
    torch.testing.assert_close(expected["k1"], torch.zeros(9, dtype=torch.float64), atol=1e-14, rtol=0)
    torch.testing.assert_close(expected["k2"], rkl, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(expected["k3"], fkl, rtol=1e-10, atol=1e-14)


# ---- reduction ------------------------------------------------------------------------------------
def train_batch(seed, n=6, width=5, n_reference=2):
    g = torch.Generator().manual_seed(seed)
    lengths = [0, 5, 1, 3, 4, 2, 5, 3][:n]
    mask = torch.tensor([[j < L for j in range(width)] for L in lengths])
    ref = torch.arange(n) >= n - n_reference
    return TrainBatch(prompt_ids=[[1]] * n, completion_ids=torch.randint(0, 9, (n, width), generator=g),
                      completion_mask=mask, is_reference=ref,
                      teacher=TeacherScores(sampled_logprobs=torch.zeros(n, width)))


@pytest.mark.parametrize("reduction", ["token_mean", "sample_mean"])
def test_reduction_weights_match_reference_under_any_split(reduction):
    """sample_mean: w = 1 / (row's tokens x rows of its kind); token_mean: 1 / tokens of its kind; the
    weights of any split into micro-batches are those of the whole batch, so the sum is one big batch's."""
    b = train_batch(seed=1)
    counts = b.denominators(reduction)
    x = torch.randn(b.completion_mask.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    expect = 0.0
    for kind in (False, True):
        rows = [i for i in range(len(b)) if bool(b.is_reference[i]) == kind]
        toks = [(i, t) for i in rows for t in range(b.completion_mask.shape[1]) if b.completion_mask[i, t]]
        if reduction == "token_mean":
            expect += sum(float(x[i, t]) for i, t in toks) / len(toks)
        else:
            expect += sum(sum(float(x[i, t]) for i2, t in toks if i2 == i) / max(1, int(b.completion_mask[i].sum()))
                          for i in rows) / len(rows)
    for parts in ([list(range(6))], [[0, 1, 2], [3, 4, 5]], [[i] for i in range(6)]):
        got = sum(float((loss_batch(b.select(p), counts, reduction=reduction).weights.double()
                         * x[p].reshape(-1)).sum()) for p in parts)
        assert got == pytest.approx(expect, rel=1e-6)
    assert counts == ((4, 2) if reduction == "sample_mean" else b.token_counts)


def test_token_mean_weights_are_todays_bit_for_bit():
    b = train_batch(seed=3)
    w = loss_batch(b, b.token_counts).weights
    ref = b.is_reference[:, None].expand_as(b.completion_mask).reshape(-1)
    pol, rc = b.token_counts
    today = b.completion_mask.float().reshape(-1) / torch.where(ref, float(rc), float(pol))
    assert torch.equal(w, today)


def test_sample_mean_changes_the_weight_of_long_samples():
    b = train_batch(seed=4, n_reference=0)
    tok = loss_batch(b, b.denominators("token_mean")).weights.reshape(len(b), -1).sum(-1)
    smp = loss_batch(b, b.denominators("sample_mean"), reduction="sample_mean").weights.reshape(len(b), -1).sum(-1)
    lengths = b.completion_mask.sum(-1).float()
    torch.testing.assert_close(tok, lengths / lengths.sum())
    torch.testing.assert_close(smp, (lengths > 0).float() / len(b))
    assert math.isclose(float(smp.sum()), 5 / 6, rel_tol=1e-6)  # the empty row counts in the denominator, as in slime


def test_kl_to_reference_is_chunk_free_and_the_fused_head_agrees():
    from losses.reduce import Head, compute_loss_from_hidden
    z, b = kl_batch(seed=9, n_reference=1)
    fn = build_loss("topk_reverse_kl_sg", {"k": 3, "support": "student_masked"}, kl_coef=0.2, kl_estimator="low_var_kl").fn
    v_all, d_all = compute_loss(fn, z, b, T, chunk_size=20)
    (g_all,) = torch.autograd.grad(v_all, z)
    for chunk in (1, 3, 7):
        v, d = compute_loss(fn, z, b, T, chunk_size=chunk)
        torch.testing.assert_close(v, v_all, rtol=1e-12, atol=1e-15)
        torch.testing.assert_close(torch.autograd.grad(v, z)[0], g_all, rtol=1e-12, atol=1e-15)
        for key in d_all:
            torch.testing.assert_close(d[key], d_all[key], rtol=1e-12, atol=1e-15)
    w = torch.eye(z.shape[1], dtype=torch.float64)
    h = z.detach().clone().requires_grad_()
    v2, d2 = compute_loss_from_hidden(fn, h, Head(w), b, T, chunk_size=7)
    v2.backward()
    torch.testing.assert_close(v2, v_all.detach(), rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(h.grad, g_all, rtol=1e-10, atol=1e-13)
    assert d2.keys() == d_all.keys() and "kl_to_reference" in d2
