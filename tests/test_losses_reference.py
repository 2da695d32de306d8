"""Every loss against a brute-force reference written here, independently: float64, row-by-row loops
and explicit formulas, random logits, several shapes, masks with an empty sequence. Values and
gradients (reference gradients by autograd through the loops, or an explicit formula for T2)."""
import math

import pytest
import torch

from losses import build_loss
from losses.reduce import compute_loss
from losses.synthetic import synthetic_batch

T = 1.3  # a non-trivial temperature everywhere: student logits / T, teacher log-probs already at T
SHAPES = [(2, 2, 5, 1), (3, 4, 11, 3), (4, 6, 32, 8)]  # n_seq, length, vocab, k


def probs(z_row):
    e = torch.exp(z_row / T - (z_row / T).max())
    return e / e.sum()


def q_of(b, t):
    return torch.exp(b.teacher_full_logprobs[t])


def support(b, t, which, k):
    s = b.student_topk_ids[t, :k].tolist()
    tt = b.teacher_topk_ids[t, :k].tolist()
    return {"student": s, "teacher": tt, "intersection": [v for v in tt if v in s]}[which]


def total(z, b, per_row):
    out = z.new_zeros(())
    for t in range(z.shape[0]):
        if b.weights[t] != 0:
            out = out + b.weights[t] * per_row(t, probs(z[t]))
    return out


def kl_terms(a, c, ids):
    return sum(a[v] * (torch.log(a[v]) - torch.log(c[v])) for v in ids)


# ---- references: (z, b, **params) -> total loss -------------------------------------------------
def ref_full_reverse_kl(z, b):
    return total(z, b, lambda t, p: kl_terms(p, q_of(b, t), range(len(p))))


def ref_full_forward_kl(z, b):
    return total(z, b, lambda t, p: kl_terms(q_of(b, t), p, range(len(p))))


def ref_jsd(z, b, beta):
    def row(t, p):
        q = q_of(b, t)
        m = beta * q + (1 - beta) * p
        return beta * kl_terms(q, m, range(len(p))) + (1 - beta) * kl_terms(p, m, range(len(p)))
    return total(z, b, row)


def ref_topk_rkl(z, b, k, support_name):  # T1 value (and T2 value)
    return total(z, b, lambda t, p: kl_terms(p, q_of(b, t), support(b, t, support_name, k)))


def ref_t2_grad(z, b, k, support_name):
    """d/dz_j sum_{v in S} sg-coefficient c_v p_v = sum_{v in S} c_v p_v (delta_vj - p_j) / T."""
    g = torch.zeros_like(z)
    for t in range(z.shape[0]):
        p, q = probs(z[t]).detach(), q_of(b, t)
        for v in support(b, t, support_name, k):
            c = math.log(p[v]) - math.log(q[v])
            g[t] += b.weights[t] * c * p[v] * (torch.eye(len(p), dtype=p.dtype)[v] - p) / T
    return g


def ref_renorm(z, b, k, support_name):
    def row(t, p):
        ids = support(b, t, support_name, k)
        if not ids:
            return z.new_zeros(())
        q = q_of(b, t)
        ps, qs = sum(p[v] for v in ids), sum(q[v] for v in ids)
        return sum((p[v] / ps) * torch.log((p[v] / ps) / (q[v] / qs)) for v in ids)
    return total(z, b, row)


def ref_tail(z, b, k, support_name):
    def row(t, p):
        ids, q = support(b, t, support_name, k), q_of(b, t)
        pt, qt = 1 - sum(p[v] for v in ids), 1 - sum(q[v] for v in ids)
        return kl_terms(p, q, ids) + pt * torch.log(pt / qt)
    return total(z, b, row)


def ref_topk_fkl(z, b, k, tail):
    def row(t, p):
        ids, q = support(b, t, "teacher", k), q_of(b, t)
        out = kl_terms(q, p, ids)
        if tail:
            pt, qt = 1 - sum(p[v] for v in ids), 1 - sum(q[v] for v in ids)
            out = out + qt * torch.log(qt / pt)
        return out
    return total(z, b, row)


def ref_sampled_rkl(z, b, coef, clip_eps, gamma):
    m = z.shape[0]
    real = [t for t in range(m) if b.weights[t] != 0]
    r = {t: -coef * float(b.behaviour_logprobs[t] - b.teacher_sampled_logprobs[t]) for t in real}
    adv = {t: sum(gamma ** (s - t) * r[s] for s in real if s >= t and b.seq_ids[s] == b.seq_ids[t]) for t in real}
    def row(t, p):
        rho = p[b.tokens[t]] / math.exp(b.behaviour_logprobs[t])
        a = adv[t]
        if clip_eps is None:
            return -rho * a
        return torch.maximum(-rho * a, -torch.clamp(rho, 1 - clip_eps, 1 + clip_eps) * a)
    return total(z, b, row)


def ref_direct(z, b):
    return total(z, b, lambda t, p: torch.log(p[b.tokens[t]]) - b.teacher_sampled_logprobs[t])


def ref_sft(z, b):
    ref = b.is_reference
    return total(z, b, lambda t, p: -torch.log(p[b.tokens[t]]) if ref is None or ref[t] else z.new_zeros(()))


def ref_grpo(z, b, lo, hi):
    def row(t, p):
        rho, a = p[b.tokens[t]] / math.exp(b.behaviour_logprobs[t]), b.advantages[t]
        return -torch.minimum(rho * a, torch.clamp(rho, 1 - lo, 1 + hi) * a)
    return total(z, b, row)


CASES = [  # (loss name, params, reference(z, b))
    ("full_reverse_kl", {}, ref_full_reverse_kl),
    ("full_forward_kl", {}, ref_full_forward_kl),
    *[("generalized_jsd", {"beta": be}, lambda z, b, be=be: ref_jsd(z, b, be)) for be in (0.1, 0.5, 0.9)],
    *[("topk_reverse_kl_biased", {"support": s}, lambda z, b, s=s, k=None: ref_topk_rkl(z, b, k, s))
      for s in ("student", "teacher")],
    *[("topk_reverse_kl_sg", {"support": s}, lambda z, b, s=s, k=None: ref_topk_rkl(z, b, k, s))
      for s in ("student", "teacher")],
    *[("topk_reverse_kl_renorm", {"support": s}, lambda z, b, s=s, k=None: ref_renorm(z, b, k, s))
      for s in ("student", "teacher", "intersection")],
    *[("topk_reverse_kl_tail", {"support": s}, lambda z, b, s=s, k=None: ref_tail(z, b, k, s))
      for s in ("student", "teacher")],
    *[("topk_forward_kl", {"tail": tl}, lambda z, b, tl=tl, k=None: ref_topk_fkl(z, b, k, tl)) for tl in (False, True)],
    ("sampled_token_rkl", {}, lambda z, b: ref_sampled_rkl(z, b, 1.0, None, 0.0)),
    ("sampled_token_rkl", {"coef": 0.7, "clip_eps": 0.1, "gamma": 0.8},
     lambda z, b: ref_sampled_rkl(z, b, 0.7, 0.1, 0.8)),
    ("sampled_log_ratio_direct_zero_grad", {}, ref_direct),
    ("sft", {}, ref_sft),
    ("grpo", {"clip_eps": 0.1, "clip_eps_high": 0.3}, lambda z, b: ref_grpo(z, b, 0.1, 0.3)),
]


def _batch(shape, seed, **kw):
    n, length, vocab, k = shape
    z, b = synthetic_batch(n, length, vocab, k=min(k + 1, vocab), ks=min(k + 1, vocab), seed=seed, **kw)
    # off-policy behaviour so importance ratios differ from 1 and PPO clipping engages
    b.behaviour_logprobs = b.behaviour_logprobs + 0.3 * torch.randn(len(b.tokens), dtype=torch.float64,
                                                                    generator=torch.Generator().manual_seed(seed))
    return z, b


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("name,params,ref", CASES, ids=lambda c: c if isinstance(c, str) else "")
def test_value_and_gradient_match_reference(name, params, ref, shape):
    k = shape[3]
    params = {"k": k, **params} if name.startswith("topk") else params
    z, b = _batch(shape, seed=sum(shape), n_reference=1 if name == "sft" else 0)
    loss = build_loss(name, params, temperature=T, chunk_size=3)
    value, _ = loss(z, b)
    (grad,) = torch.autograd.grad(value, z)
    zr = z.detach().clone().requires_grad_()
    expect = ref(zr, b, k=k) if name.startswith("topk") else ref(zr, b)
    torch.testing.assert_close(value, expect.detach(), rtol=1e-9, atol=1e-12)
    if name == "topk_reverse_kl_sg":
        expect_grad = ref_t2_grad(zr, b, k, params["support"])
    elif not expect.requires_grad:  # the reference is a constant (T4 at k=1)
        expect_grad = torch.zeros_like(zr)
    else:
        (expect_grad,) = torch.autograd.grad(expect, zr)
    torch.testing.assert_close(grad, expect_grad, rtol=1e-8, atol=1e-12)


@pytest.mark.parametrize("name,params", [(n, p) for n, p, _ in CASES if n != "topk_reverse_kl_sg"][::2])
def test_gradcheck_float64(name, params):
    """The chunked custom backward is the true derivative of the chunked forward (finite differences)."""
    params = {"k": 2, **params} if name.startswith("topk") else params
    z, b = _batch((2, 3, 6, 2), seed=7)
    fn = build_loss(name, params).fn
    assert torch.autograd.gradcheck(lambda x: compute_loss(fn, x, b, T, chunk_size=4)[0], (z,), fast_mode=True)
