"""Identities between losses (docs/design.md §4), the Monte-Carlo unbiasedness of the sampled-token
estimator, and failure mechanism 2 on logits alone."""
import pytest
import torch

from losses import LossBatch, build_loss
from losses.synthetic import synthetic_batch

T = 1.3


def grad_of(name, params, z, b, temperature=T):
    value, diags = build_loss(name, params, temperature=temperature, chunk_size=5)(z, b)
    return value, torch.autograd.grad(value, z)[0], diags


def batch(vocab=12, k=4, seed=0):
    return synthetic_batch(4, 5, vocab, k=k, ks=k, seed=seed)


@pytest.mark.parametrize("support", ["student", "teacher"])
def test_t2_gradient_is_full_reverse_kl_gradient_restricted_to_support(support):
    """grad_x full RKL = sum_v c_v J_v with c = log p - log q and J_v = d p_v / d x (x = z/T).
    T2's gradient is the same sum over v in S only."""
    z, b = batch()
    _, g_t2, _ = grad_of("topk_reverse_kl_sg", {"k": 4, "support": support}, z, b)
    _, g_full, _ = grad_of("full_reverse_kl", {}, z, b)
    ids = (b.student_topk_ids if support == "student" else b.teacher_topk_ids)[:, :4]
    restricted, every_v = torch.zeros_like(z), torch.zeros_like(z)
    for t in range(z.shape[0]):
        p = torch.softmax(z[t].detach() / T, -1)
        jac = torch.diag(p) - torch.outer(p, p)                    # jac[v, j] = d p_v / d x_j
        c = p.log() - b.teacher_full_logprobs[t]
        w = b.weights[t] / T
        every_v[t] = w * (c[:, None] * jac).sum(0)
        restricted[t] = w * (c[ids[t], None] * jac[ids[t]]).sum(0)
    torch.testing.assert_close(g_full, every_v, rtol=1e-9, atol=1e-13)
    torch.testing.assert_close(g_t2, restricted, rtol=1e-9, atol=1e-13)
    assert (g_t2 - g_full).abs().max() > 1e-3  # a genuine restriction at k < V


@pytest.mark.parametrize("support", ["student", "teacher"])
def test_t2_equals_full_reverse_kl_when_support_is_the_vocabulary(support):
    z, b = batch(vocab=9, k=9)
    v2, g2, _ = grad_of("topk_reverse_kl_sg", {"k": 9, "support": support}, z, b)
    vf, gf, _ = grad_of("full_reverse_kl", {}, z, b)
    torch.testing.assert_close(v2, vf, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g2, gf, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("support", ["student", "teacher"])
def test_t1_gradient_is_t2_gradient_plus_grad_of_support_mass(support):
    """grad T1 = grad T2 + grad sum_t w_t P_t(S_t): the extra term that always shrinks P(S)."""
    z, b = batch(seed=3)
    v1, g1, _ = grad_of("topk_reverse_kl_biased", {"k": 4, "support": support}, z, b)
    v2, g2, _ = grad_of("topk_reverse_kl_sg", {"k": 4, "support": support}, z, b)
    ids = (b.student_topk_ids if support == "student" else b.teacher_topk_ids)[:, :4]
    mass = (torch.softmax(z / T, -1).gather(-1, ids).sum(-1) * b.weights).sum()
    (g_mass,) = torch.autograd.grad(mass, z)
    torch.testing.assert_close(v1, v2)  # stop-gradient changes no value
    torch.testing.assert_close(g1, g2 + g_mass, rtol=1e-10, atol=1e-14)
    assert g_mass.abs().max() > 1e-3


@pytest.mark.parametrize("beta,other", [(0.0, "full_forward_kl"), (1.0, "full_reverse_kl")])
def test_jsd_endpoints_are_forward_and_reverse_kl(beta, other):
    z, b = batch(seed=1)
    vj, gj, _ = grad_of("generalized_jsd", {"beta": beta}, z, b)
    vo, go, _ = grad_of(other, {}, z, b)
    torch.testing.assert_close(vj, vo, rtol=0, atol=0)
    torch.testing.assert_close(gj, go, rtol=0, atol=0)
    # the interior expression itself vanishes at the ends, which is why TRL defines them
    near = 1e-7 if beta == 0.0 else 1 - 1e-7
    v_near, _, _ = grad_of("generalized_jsd", {"beta": near}, z, b)
    assert v_near < 1e-5 * vo


@pytest.mark.parametrize("support", ["student", "teacher", "intersection"])
def test_t4_is_identically_zero_at_k1(support):
    z, b = batch(seed=2)
    v, g, _ = grad_of("topk_reverse_kl_renorm", {"k": 1, "support": support}, z, b)
    assert float(v) == 0.0 and float(g.abs().max()) == 0.0


@pytest.mark.parametrize("support", ["student", "teacher"])
def test_t5_with_support_the_vocabulary_is_full_reverse_kl(support):
    z, b = batch(vocab=9, k=9, seed=4)
    v5, g5, _ = grad_of("topk_reverse_kl_tail", {"k": 9, "support": support}, z, b)
    vf, gf, _ = grad_of("full_reverse_kl", {}, z, b)
    torch.testing.assert_close(v5, vf, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g5, gf, rtol=1e-10, atol=1e-14)


@pytest.mark.parametrize("tail", [False, True])
def test_topk_forward_kl_with_support_the_vocabulary_is_full_forward_kl(tail):
    z, b = batch(vocab=9, k=9, seed=5)
    v, g, _ = grad_of("topk_forward_kl", {"k": 9, "tail": tail}, z, b)
    vf, gf, _ = grad_of("full_forward_kl", {}, z, b)
    torch.testing.assert_close(v, vf, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(g, gf, rtol=1e-10, atol=1e-14)


def _monte_carlo(name, n=40000, positions=3, vocab=6, seed=0):
    """Per-position mean and standard error of the per-sample gradient of `name` (on-policy, T=1),
    plus p and log q."""
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(positions, vocab, generator=g, dtype=torch.float64)
    logq = torch.log_softmax(3 * torch.randn(positions, vocab, generator=g, dtype=torch.float64), -1)
    logp = torch.log_softmax(z, -1)
    y = torch.multinomial(logp.exp(), n, replacement=True, generator=g)          # [P, N]
    rows = z.repeat_interleave(n, 0).requires_grad_()                             # [P*N, V]
    b = LossBatch(tokens=y.reshape(-1), weights=torch.full((positions * n,), 1.0 / n, dtype=torch.float64),
                  behaviour_logprobs=logp.gather(-1, y).reshape(-1), teacher_sampled_logprobs=logq.gather(-1, y).reshape(-1))
    value, _ = build_loss(name, {})(rows, b)
    per_sample = torch.autograd.grad(value, rows)[0].view(positions, n, vocab) * n
    return per_sample.mean(1), per_sample.std(1) / n**0.5, logp.exp(), logq


def test_sampled_token_gradient_is_unbiased_for_full_reverse_kl():
    mean, se, p, logq = _monte_carlo("sampled_token_rkl")
    c = p.log() - logq
    exact = p * (c - (p * c).sum(-1, keepdim=True))                    # d KL(p||q) / d z
    c0 = p.log()
    teacher_dropped = p * (c0 - (p * c0).sum(-1, keepdim=True))         # d (-H(p)) / d z
    assert ((mean - exact).abs() <= 5 * se + 1e-4).all(), (mean, exact)
    assert ((mean - teacher_dropped).abs() / se).max() > 20


def test_direct_log_ratio_backprop_has_zero_expected_gradient():
    mean, se, p, logq = _monte_carlo("sampled_log_ratio_direct_zero_grad", seed=1)
    c = p.log() - logq
    exact = p * (c - (p * c).sum(-1, keepdim=True))
    assert ((mean.abs() <= 5 * se + 1e-4)).all()
    assert ((exact - mean).abs() / se).max() > 20  # and so it misses the reverse-KL gradient


def test_failure_mechanism_2_t1_leaks_mass_to_tail_t2_matches_teacher_on_support():
    """A sharp head and a flat 995-token tail, one position, fixed teacher, S = teacher top-5.
    Gradient descent on T1 shrinks P(S) far below Q(S) and inflates entropy past the teacher's;
    on T2 it converges to p = q on S."""
    g = torch.Generator().manual_seed(0)
    vocab, k = 1000, 5
    logq = torch.log_softmax(torch.cat([torch.tensor([6.0, 5.5, 5.0, 4.5, 4.0]),
                                        0.3 * torch.randn(vocab - k, generator=g)]).double()[None], -1)
    z0 = torch.cat([torch.tensor([7.0, 5.0, 5.0, 6.0, 3.0]), 0.3 * torch.randn(vocab - k, generator=g)]).double()[None]
    ids = logq.topk(k, -1).indices
    b = LossBatch(tokens=torch.zeros(1, dtype=torch.long), weights=torch.ones(1, dtype=torch.float64),
                  teacher_topk_ids=ids, teacher_topk_logprobs=logq.gather(-1, ids))
    q_s, h_q = float(logq.exp().gather(-1, ids).sum()), float(-(logq.exp() * logq).sum())
    final = {}
    for name in ("topk_reverse_kl_biased", "topk_reverse_kl_sg"):
        loss, z = build_loss(name, {"k": k}), z0.clone().requires_grad_()
        for _ in range(200):
            value, diags = loss(z, b)
            (grad,) = torch.autograd.grad(value, z)
            with torch.no_grad():
                z -= 2.0 * grad
        final[name] = torch.softmax(z.detach(), -1), diags
    p1, d1 = final["topk_reverse_kl_biased"]
    p2, d2 = final["topk_reverse_kl_sg"]
    p_s0 = float(torch.softmax(z0, -1).gather(-1, ids).sum())
    assert p_s0 > q_s and float(d1["student_mass_on_support"]) < 0.5 * q_s
    assert float(d1["entropy"]) > h_q + 1.0
    assert float((p2.gather(-1, ids) - logq.exp().gather(-1, ids)).abs().max()) < 1e-4
    assert abs(float(d2["student_mass_on_support"]) - q_s) < 1e-3
