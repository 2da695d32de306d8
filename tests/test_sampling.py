"""The sampler's categorical draw (opd.sampling.draw): inverse CDF in blocks, against a brute-force
inverse CDF with the same uniforms, and against the distribution itself."""
from __future__ import annotations

import torch

from opd.sampling import draw


def brute_force(probs: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """One running sum over the whole row, float64, and the first index that exceeds u."""
    cdf = probs.double().cumsum(-1)
    u = torch.rand(len(probs), 1, generator=gen, dtype=torch.float64) * cdf[:, -1:]
    return torch.searchsorted(cdf, u, right=True).squeeze(-1)


def test_the_block_draw_equals_a_whole_row_inverse_cdf_with_the_same_uniforms():
    probs = torch.softmax(3 * torch.randn(64, 1000, generator=torch.Generator().manual_seed(0)), -1)  # 1000: a padded last block
    probs[:, ::7] = 0.0  # unnormalised rows with zero-probability tokens
    for seed in range(5):
        got = draw(probs, torch.Generator().manual_seed(seed), block=64)
        assert torch.equal(got, brute_force(probs, torch.Generator().manual_seed(seed)))


def test_draws_follow_the_distribution_and_never_pick_a_zero_probability_token():
    p = torch.tensor([0.0, 0.5, 0.0, 0.2, 0.25, 0.05, 0.0])
    n = 200_000
    tok = draw(p.repeat(n, 1), torch.Generator().manual_seed(1), block=3)
    freq = torch.bincount(tok, minlength=len(p)).double() / n
    assert (freq[p == 0] == 0).all()
    sigma = (p * (1 - p) / n).sqrt().double()
    assert ((freq - p.double()).abs() <= 5 * sigma + 1e-12).all(), (freq, p)


def test_a_row_with_all_its_mass_on_one_token_draws_that_token():
    v = 600
    probs = torch.zeros(3, v)
    probs[0, 0] = probs[1, v - 1] = probs[2, 300] = 1.0
    assert draw(probs, torch.Generator().manual_seed(0)).tolist() == [0, v - 1, 300]
