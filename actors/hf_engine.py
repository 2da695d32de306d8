"""Rollout engine on Hugging Face transformers: batched sampling with a KV cache, on CPU or GPU.

This is the engine for local debugging, tests and CPU demos; `actors/vllm_engine.py` implements the
same interface on vLLM for GPU clusters. Both receive weights through opd/weight_sync.
"""
from __future__ import annotations

import torch

from opd.contracts import Rollout, SamplingSpec
from opd.modeling import actor_device, left_pad, load_model, positions
from opd.weight_sync.gloo import HFModelReceiver


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


class HFEngine(HFModelReceiver):
    """Rollout engine. A plain class: Ray wraps it as an actor, tests build it in-process."""

    def __init__(self, model_path: str, dtype: str = "float32", seed: int = 0, threads: int = 0,
                 use_gpu: bool = False):
        self.device = actor_device(use_gpu)
        self.model, tok = load_model(model_path, dtype, self.device, threads)
        self.pad_id, self.eos_id = tok.pad_token_id, tok.eos_token_id
        self.weight_version = 0
        self.gen = torch.Generator(self.device).manual_seed(seed)

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> Rollout:
        if spec.seed is not None:
            self.gen.manual_seed(spec.seed)
        ids, mask = (x.to(self.device) for x in left_pad(prompts, self.pad_id))
        pos = positions(mask)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True)
        n = len(prompts)
        done = torch.zeros(n, dtype=torch.bool, device=self.device)
        stopped = torch.zeros(n, dtype=torch.bool, device=self.device)
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
            mask = torch.cat([mask, mask.new_ones((n, 1))], -1)
            pos = pos[:, -1:] + 1
            out = self.model(input_ids=tok[:, None], attention_mask=mask, position_ids=pos,
                             past_key_values=out.past_key_values, use_cache=True)
        return Rollout(
            prompt_ids=[list(p) for p in prompts],
            completion_ids=torch.stack(toks, 1).cpu(),
            completion_mask=torch.stack(alive, 1).cpu(),
            behaviour_logprobs=torch.stack(lps, 1).cpu(),
            finish_reasons=["stop" if s else "length" for s in stopped.tolist()],
            weight_version=self.weight_version,
            student_topk_ids=torch.stack(topks, 1).cpu() if topks else None,
        )

    def get_weights(self) -> dict[str, torch.Tensor]:
        return {k: v.detach().to("cpu", copy=True) for k, v in self.model.named_parameters()}

    def sleep(self) -> None:  # colocation hooks: an HF engine keeps its memory
        pass

    def wake_up(self, tags=None) -> None:
        pass
