"""Batched sampling with a KV cache on a Hugging Face model: the HF rollout engine's generation, and
the HF teacher's when it writes reference rows for an SFT mix."""
from __future__ import annotations

import torch

from opd.contracts import Rollout, SamplingSpec
from opd.modeling import left_pad, positions


def sample(logits: torch.Tensor, spec: SamplingSpec, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [N, V] -> (token [N], log p(token) [N] at the spec's temperature, before top-p)."""
    if spec.temperature == 0:
        logp = torch.log_softmax(logits, -1)
        tok = logp.argmax(-1)
    else:
        logp = torch.log_softmax(logits / spec.temperature, -1)
        probs = logp.exp()
        if spec.top_p < 1.0:
            sorted_p, order = probs.sort(-1, descending=True)
            drop = sorted_p.cumsum(-1) - sorted_p > spec.top_p  # keep the smallest set reaching top_p
            probs = probs.scatter(-1, order, sorted_p.masked_fill(drop, 0.0))
        tok = draw(probs, gen)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


def draw(probs: torch.Tensor, gen: torch.Generator, block: int = 256) -> torch.Tensor:
    """One token per row of `probs` [N, V] (rows need not sum to 1), by inverse CDF: one uniform per row,
    found first among blocks of `block` tokens, then inside its block. Exact in distribution, as
    torch.multinomial is, and ~20x cheaper on CPU at V = 32k, where multinomial draws V exponentials per
    row (60% of a decode step at 32 rows). Running sums are float64: a float32 one over a 150k vocabulary
    drifts by about the probability of a tail token."""
    n, v = probs.shape
    blocks = (torch.nn.functional.pad(probs, (0, -v % block)) if v % block else probs).view(n, -1, block)
    rows = torch.arange(n, device=probs.device)
    sums = blocks.sum(-1).double()  # [N, V / block]; a float32 sum of 256 terms is pairwise, exact to ~1e-7
    cdf = sums.cumsum(-1)
    u = torch.rand(n, 1, generator=gen, device=probs.device, dtype=torch.float64) * cdf[:, -1:]
    b, rest = _first_above(cdf, u)
    inside, _ = _first_above(blocks[rows, b].double().cumsum(-1), rest[:, None])
    return b * block + inside


def _first_above(cdf: torch.Tensor, u: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row, the first index whose running sum `cdf` [N, K] exceeds u [N, 1], and what is left of u
    inside that index [N]. A zero-probability index never raises the sum, so it is never first; where
    rounding puts u at or past the row's total, the answer is the last index that raised it."""
    last = (cdf < cdf[:, -1:]).sum(-1)
    i = torch.minimum(torch.searchsorted(cdf, u, right=True).squeeze(-1), last)
    before = torch.where(i > 0, cdf.gather(-1, (i - 1).clamp(min=0)[:, None]).squeeze(-1), 0.0)
    return i, u.squeeze(-1) - before


@torch.no_grad()
def generate(model, prompts: list[list[int]], spec: SamplingSpec, gen: torch.Generator, pad_id: int, eos_id: int,
             weight_version: int = 0) -> Rollout:
    """Sample up to spec.max_new_tokens per prompt (left-padded batch, stop at any of spec.stop_ids, or
    at eos_id when the spec names none); `gen` is reseeded with spec.seed when it has one."""
    if spec.seed is not None:
        gen.manual_seed(spec.seed)
    device = next(model.parameters()).device
    stop_ids = torch.tensor(sorted(set(spec.stop_ids) or {eos_id}), device=device)
    ids, mask = (x.to(device) for x in left_pad(prompts, pad_id))
    pos = positions(mask)
    # the prompt's last position only through the output layer (at a 32k vocabulary the prefill's full
    # [N, P, V] logits cost as much as P decode steps' head)
    out = model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, logits_to_keep=1)
    n = len(prompts)
    done = torch.zeros(n, dtype=torch.bool, device=device)
    stopped = torch.zeros(n, dtype=torch.bool, device=device)
    toks, lps, alive, topks, top_lps = [], [], [], [], []
    for _ in range(spec.max_new_tokens):
        logits = out.logits[:, -1].float()
        tok, lp = sample(logits, spec, gen)
        tok = tok.masked_fill(done, pad_id)
        if spec.return_topk:  # ids and their log-probs under the behaviour contract (sample()'s scaling)
            top = logits.topk(spec.return_topk, -1).indices
            scaled = logits / spec.temperature if spec.temperature > 0 else logits
            topks.append(top)
            top_lps.append(scaled.gather(-1, top) - torch.logsumexp(scaled, -1, keepdim=True))
        toks.append(tok), lps.append(lp.masked_fill(done, 0.0)), alive.append(~done)
        stopped |= torch.isin(tok, stop_ids) & ~done
        done = done | stopped
        if done.all():
            break
        mask = torch.cat([mask, mask.new_ones((n, 1))], -1)
        pos = pos[:, -1:] + 1
        out = model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                    past_key_values=out.past_key_values, use_cache=True)
    return Rollout(
        prompt_ids=[list(p) for p in prompts],
        completion_ids=torch.stack(toks, 1).cpu(),
        completion_mask=torch.stack(alive, 1).cpu(),
        behaviour_logprobs=torch.stack(lps, 1).cpu(),
        finish_reasons=["stop" if s else "length" for s in stopped.tolist()],
        weight_version=weight_version,
        student_topk_ids=torch.stack(topks, 1).cpu() if topks else None,
        student_topk_logprobs=torch.stack(top_lps, 1).cpu() if top_lps else None,
    )
