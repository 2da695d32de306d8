"""The rollout engine on vLLM (GPU clusters; vLLM's CPU build in CI). Same interface as HFEngine."""
from __future__ import annotations

from typing import TYPE_CHECKING, Sequence

import torch

from actors.kinds import ActorCall, EngineKind, EngineStart, register
from opd.contracts import Rollout, SamplingSpec, pad_rows
from opd.vllm_llm import LLMSpec, LLMWeightReceiver, build_llm, logprobs_mode_for, parse_positions

if TYPE_CHECKING:
    from vllm.outputs import RequestOutput


class VLLMEngine(LLMWeightReceiver):
    """RolloutEngine on vllm.LLM. The engine's `logprobs_mode` is fixed at construction from the
    training SamplingSpec; generate() refuses a spec whose behaviour log-probs it cannot report
    exactly, and asks for none when the spec needs none (evaluation)."""

    def __init__(self, spec: LLMSpec, sampling: SamplingSpec, pad_id: int, version: int = 0):
        self.logprobs_mode = logprobs_mode_for(sampling)
        self.llm = build_llm(spec, self.logprobs_mode)
        self.max_topk, self.pad_id = spec.max_logprobs, pad_id
        self.llm.update_weight_version(str(version))
        self.weight_version = version

    def generate(self, prompts: list[list[int]], spec: SamplingSpec) -> Rollout:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import SamplingParams
        if spec.behaviour_logprobs:
            needed = logprobs_mode_for(spec)
            both_exact = spec.temperature == 0.0 or (spec.temperature == 1.0 and spec.top_p >= 1.0)
            if needed != self.logprobs_mode and not both_exact:
                raise ValueError(f"sampling: temperature {spec.temperature}, top_p {spec.top_p} needs "
                                 f"logprobs_mode={needed!r}, this engine was built with {self.logprobs_mode!r}")
        if spec.return_topk > self.max_topk:
            raise ValueError(f"sampling: student top-{spec.return_topk} > the engine's max_logprobs {self.max_topk}")
        wants_logprobs = spec.behaviour_logprobs or spec.return_topk > 0
        # One seed per row: repeated prompts with one shared seed would give identical samples.
        params = [SamplingParams(n=1, temperature=spec.temperature, top_p=spec.top_p, max_tokens=spec.max_new_tokens,
                                 logprobs=spec.return_topk if wants_logprobs else None,
                                 seed=None if spec.seed is None else spec.seed + i, detokenize=False,
                                 stop_token_ids=list(spec.stop_ids) or None, flat_logprobs=True)
                  for i in range(len(prompts))]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False)
        return rollout_from_outputs(prompts, outputs, spec.return_topk, self.pad_id, self.weight_version,
                                    wants_logprobs)


def rollout_from_outputs(prompts: list[list[int]], outputs: Sequence["RequestOutput"], topk: int,
                         pad_id: int, version: int, with_logprobs: bool = True) -> Rollout:
    """vLLM RequestOutputs (one completion each, in prompt order) -> Rollout."""
    ids, logps, tops, top_lps, reasons = [], [], [], [], []
    for out in outputs:
        completion = out.outputs[0]
        tokens = list(completion.token_ids)
        if completion.finish_reason not in ("stop", "length"):  # abort / error / repetition
            raise RuntimeError(f"vLLM request {out.request_id} finished with {completion.finish_reason!r}")
        for span in completion.weight_versions or []:
            if span.version != str(version):  # our counter and vLLM's label must agree
                raise RuntimeError(f"tokens {span.start}:{span.end} sampled by weights {span.version!r}, "
                                   f"engine is at version {version}")
        ids.append(tokens)
        reasons.append(completion.finish_reason)
        if with_logprobs:
            if completion.logprobs is None or len(completion.logprobs) != len(tokens):
                raise RuntimeError(f"vLLM request {out.request_id}: logprobs do not cover every sampled token")
            lp, _, top, top_lp = parse_positions(completion.logprobs, 0, tokens, topk)
            logps.append(lp)
            tops.append(top)
            top_lps.append(top_lp)
    width = max((len(r) for r in ids), default=0)
    student_topk = None if topk == 0 else _stacked(tops, width, torch.long, (topk,))
    topk_logprobs = None if topk == 0 else _stacked(top_lps, width, torch.float32, (topk,))
    return Rollout(prompt_ids=[list(p) for p in prompts], completion_ids=pad_rows(ids, pad_id, width=width),
                   completion_mask=pad_rows([[True] * len(r) for r in ids], False, torch.bool, width),
                   behaviour_logprobs=_stacked(logps, width, torch.float32) if with_logprobs else None,
                   finish_reasons=reasons, weight_version=version, student_topk_ids=student_topk,
                   student_topk_logprobs=topk_logprobs)


def _stacked(rows: list[torch.Tensor], width: int, dtype: torch.dtype, tail: tuple = ()) -> torch.Tensor:
    """Row tensors [T_i, *tail] -> [len(rows), width, *tail], zeros past each row's end."""
    out = torch.zeros(len(rows), width, *tail, dtype=dtype)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out


def start(s: EngineStart) -> ActorCall:
    return ActorCall(VLLMEngine, (s.llm, s.sampling, s.pad_id))


register(EngineKind("vllm", start, receiver="vllm", vllm=True))
