"""Rollout engine on Hugging Face transformers: batched sampling with a KV cache, on CPU or GPU.

This is the engine for local debugging, tests and CPU demos; `actors/vllm_engine.py` implements the
same interface on vLLM for GPU clusters.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from opd.contracts import Rollout, SamplingSpec

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_model(path: str, dtype: str = "float32", threads: int = 0):
    """Load an HF causal LM and its tokenizer for inference (eval mode)."""
    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts so every completion starts at the same column: ids and mask, [N, P]."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: [N, L]."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


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
        tok = torch.multinomial(probs, 1, generator=gen).squeeze(-1)
    return tok, logp.gather(-1, tok[:, None]).squeeze(-1)


class HFEngine:
    """Rollout engine. A plain class: Ray wraps it as an actor, tests build it in-process."""

    def __init__(self, model_path: str, dtype: str = "float32", seed: int = 0, threads: int = 0):
        self.model, tok = load_model(model_path, dtype, threads)
        self.pad_id, self.eos_id = tok.pad_token_id, tok.eos_token_id
        self.weight_version = 0
        self.gen = torch.Generator().manual_seed(seed)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> Rollout:
        if spec.seed is not None:
            self.gen.manual_seed(spec.seed)
        ids, mask = left_pad(prompts, self.pad_id)
        pos = positions(mask)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        n = len(prompts)
        done = torch.zeros(n, dtype=torch.bool)
        stopped = torch.zeros(n, dtype=torch.bool)
        toks, lps, alive, topks = [], [], [], []
        for _ in range(spec.max_new_tokens):
            logits = out.logits[:, -1].float()
            tok, lp = sample(logits, spec, self.gen)
            tok = tok.masked_fill(done, self.pad_id)
            if spec.return_topk:
                topks.append(logits.topk(spec.return_topk, -1).indices)
            toks.append(tok), lps.append(lp.masked_fill(done, 0.0)), alive.append(~done)
            stopped |= (tok == self.eos_id) & ~done
            done = done | stopped
            if done.all():
                break
            mask = torch.cat([mask, torch.ones((n, 1), dtype=mask.dtype)], -1)
            pos = pos[:, -1:] + 1
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                             cache=out.cache, use_cache=True)
        return Rollout(
            prompt_ids=[list(p) for p in prompts],
            completion_ids=torch.stack(toks, 1),
            completion_mask=torch.stack(alive, 1),
            behaviour_logprobs=torch.stack(lps, 1),
            finish_reasons=["stop" if s else "length" for s in stopped.tolist()],
            weight_version=self.weight_version,
            student_topk_ids=torch.stack(topks, 1) if topks else None,
        )

    @torch.no_grad()
    def update_weights(self, named_tensors: Mapping[str, torch.Tensor] | Iterable, version: int) -> None:
        load_named_tensors(self.model, named_tensors)
        self.weight_version = version

    def get_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().clone() for k, v in self.model.named_parameters()}


def load_named_tensors(model: torch.nn.Module, named_tensors) -> None:
    """Copy tensors into the model's parameters; every parameter must be covered exactly once."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    params = dict(model.named_parameters())
    seen = set()
    for name, tensor in items:
        if name not in params:
            raise KeyError(f"weight sync: unknown parameter {name!r}")
        if params[name].shape != tensor.shape:
            raise ValueError(f"weight sync: {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(params[name].shape)}")
        params[name].data.copy_(tensor)
        seen.add(name)
    if seen != set(params):
        raise KeyError(f"weight sync: parameters not sent: {sorted(set(params) - seen)[:5]}")

