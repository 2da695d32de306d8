"""Vectorised reading of vLLM log-probs (opd/vllm_llm.parse_positions) against the per-position reading
(split_position), on containers built by vLLM's own append_logprobs_for_next_position, flat and not."""
import random

import pytest
import torch

pytest.importorskip("vllm")
from vllm.logprobs import append_logprobs_for_next_position, create_prompt_logprobs  # noqa: E402

from opd.vllm_llm import parse_positions, split_position  # noqa: E402


def _positions(rng: random.Random, T: int, k: int, vocab: int = 50):
    """Per position (token ids, log-probs, rank) as vLLM's sampler lays them out: the scored token first at
    its true rank (ties counted in its favour), then the top-k in rank order. Some positions put the
    scored token inside the top-k, some outside, some tied with a top-k entry without being among its ids."""
    out, scored = [], []
    for _ in range(T):
        logits = [round(rng.gauss(0, 2), 1) for _ in range(vocab)]  # rounded: ties happen
        lse = torch.logsumexp(torch.tensor(logits, dtype=torch.float64), 0).item()
        order = sorted(range(vocab), key=lambda v: (-logits[v], v))
        tok = rng.choice(order[:k + 3] if rng.random() < 0.7 else order)
        rank = 1 + sum(x > logits[tok] for x in logits)
        ids = [tok] + order[:k]
        out.append((ids, [logits[v] - lse for v in ids], rank))
        scored.append(tok)
    return out, scored


def _per_position(container, start: int, tokens: list[int], k: int):
    """Today's reading, one position at a time."""
    rows = [split_position(container[start + t], tok, k) for t, tok in enumerate(tokens)]
    ranks = [container[start + t][tok].rank or 0 for t, tok in enumerate(tokens)]
    return (torch.tensor([r[0] for r in rows], dtype=torch.float32), torch.tensor(ranks, dtype=torch.long),
            torch.tensor([r[1] for r in rows], dtype=torch.long).view(len(tokens), k),
            torch.tensor([r[2] for r in rows], dtype=torch.float32).view(len(tokens), k))


@pytest.mark.parametrize("k", [0, 1, 5])
@pytest.mark.parametrize("flat", [True, False])
def test_parse_positions_equals_the_per_position_reading(k, flat):
    rng = random.Random(k * 7 + flat)
    positions, tokens = _positions(rng, 300, k)
    container = create_prompt_logprobs(flat)  # entry 0 is None, as for a prompt's first token
    for ids, lps, rank in positions:
        append_logprobs_for_next_position(container, ids, lps, [None] * len(ids), rank, k)
    got = parse_positions(container, 1, tokens, k)
    want = _per_position(container, 1, tokens, k)
    tied = sum(1 for (ids, _, rank) in positions if ids[0] not in ids[1:] and rank <= k)
    assert k < 5 or tied > 0, "the sample should hold tied positions, where the sort decides the top-k"
    for g, w in zip(got, want):
        assert g.dtype == w.dtype and g.shape == w.shape
        assert torch.equal(g, w)


def test_parse_positions_names_a_missing_scored_token():
    container = create_prompt_logprobs(True)
    append_logprobs_for_next_position(container, [3, 3, 4], [-0.1, -0.1, -2.0], [None] * 3, 1, 2)
    with pytest.raises(RuntimeError, match="scored token 7"):
        parse_positions(container, 1, [7], 2)
