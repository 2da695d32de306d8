"""A teacher served by vLLM 0.33.0 (GPU): scores `teacher_prompt + completion` with prompt log-probs.

One request per row with SamplingParams(max_tokens=1, prompt_logprobs=K). vLLM's prompt_logprobs
list has one entry per prompt token (entry 0 is None: the first token has no context), so the
completion token t of a row whose teacher prompt has P tokens is entry P + t, whatever the student
prompt was (OPSD teachers see privileged text the student never did). Each entry holds the actual
token's log-prob and the teacher's top-K.

Limits, stated as errors rather than approximated:
* no full vocabulary (capabilities.full_vocab=False);
* prompt log-probs are always at temperature 1 (prompt tokens bypass the sampler, so no
  logprobs_mode scales them): ScoreRequest.temperature must be 1.0;
* log-probs at arbitrary ids (the student's top-k) only with exact_ids=True, which uses
  SamplingParams.prompt_logprob_token_ids: new in 0.33.0 and only on vLLM's Model Runner V2 (the
  default there; vLLM rejects the request otherwise). Off by default until a GPU run confirms it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Optional, Sequence

import torch

from actors.vllm_engine import VLLMWeightReceiver, build_llm, split_position
from opd.contracts import ScoreRequest, TeacherScores
from teachers.base import TeacherCapabilities

if TYPE_CHECKING:
    from vllm.outputs import RequestOutput
    from vllm.tokenizers import TokenizerLike


def completion_lengths(completion_mask: torch.Tensor) -> torch.Tensor:
    """[N] lengths of right-padded completions; anything else is an error (positions would shift)."""
    lengths = completion_mask.sum(dim=1)
    prefix = torch.arange(completion_mask.shape[1])[None, :] < lengths[:, None]
    if not torch.equal(completion_mask.bool(), prefix):
        raise ValueError("completion_mask must be right-padded: True on a prefix of each row, then False")
    return lengths


def teacher_scores_from_outputs(outputs: Sequence["RequestOutput"], rows: list[int], prompt_lens: list[int],
                                completions: list[list[int]], width: int, k: int,
                                num_ids: int = 0) -> TeacherScores:
    """vLLM RequestOutputs for the scored `rows` -> TeacherScores over all N rows, [N, width(, K)].
    Padded positions hold zeros. num_ids > 0: also read prompt_token_id_logprobs [L, num_ids]."""
    n = len(completions)
    sampled = torch.zeros(n, width)
    top_ids = torch.zeros(n, width, k, dtype=torch.long)
    top_lps = torch.zeros(n, width, k)
    at_ids = torch.zeros(n, width, num_ids)
    out: RequestOutput
    for i, out in zip(rows, outputs):
        start, tokens = prompt_lens[i], completions[i]
        if out.prompt_logprobs is None or len(out.prompt_logprobs) != start + len(tokens):
            raise RuntimeError(f"vLLM request {out.request_id}: prompt_logprobs do not cover "
                               f"{start} teacher-prompt + {len(tokens)} completion tokens")
        for t, tok in enumerate(tokens):
            lp, ids, lps = split_position(out.prompt_logprobs[start + t], tok, k)
            sampled[i, t] = lp
            top_ids[i, t] = torch.tensor(ids, dtype=torch.long)
            top_lps[i, t] = torch.tensor(lps)
        if num_ids:
            at_ids[i, : len(tokens)] = torch.as_tensor(out.prompt_token_id_logprobs, dtype=torch.float32)
    return TeacherScores(sampled_logprobs=sampled,
                         topk_ids=top_ids if k else None, topk_logprobs=top_lps if k else None,
                         at_student_topk=at_ids if num_ids else None)


class VLLMTeacher(VLLMWeightReceiver):
    """Teacher protocol on vllm.LLM. weight_transfer_backend is for a live self-teacher that receives
    the student's weights each step (same receive side as the rollout engines); None when frozen."""

    def __init__(self, model: str, *, max_topk: int = 20, exact_ids: bool = False,
                 student_path: Optional[str] = None, weight_transfer_backend: Optional[str] = None,
                 version: int = 0, **llm_kwargs: Any):
        # max_topk 20 is vLLM's default max_logprobs (and launch/capabilities.py's); peers use 32-64.
        # raw_logprobs: for prompt tokens raw and processed agree; the *_logits modes return logits.
        self.llm = build_llm(model, logprobs_mode="raw_logprobs", max_logprobs=max_topk,
                             weight_transfer_backend=weight_transfer_backend, **llm_kwargs)
        if student_path and student_path != model:
            from transformers import AutoTokenizer
            from teachers.hf_teacher import check_same_tokenizer
            tok: TokenizerLike = self.llm.get_tokenizer()  # has get_vocab (checked by the contract test)
            check_same_tokenizer(tok, AutoTokenizer.from_pretrained(student_path))
        self.capabilities = TeacherCapabilities(full_vocab=False, logprobs_at_any_ids=exact_ids,
                                                max_topk=max_topk)
        self.weight_version = version

    def _check(self, request: ScoreRequest, student_topk_ids: Optional[torch.Tensor]) -> None:
        cap = self.capabilities
        if request.full_vocab:
            raise ValueError("teacher: a vLLM teacher returns top-k log-probs, not the full vocabulary; "
                             "full-vocab losses need a co-located HF teacher")
        if request.temperature != 1.0:
            raise ValueError(f"teacher: ScoreRequest.temperature {request.temperature}, but vLLM prompt "
                             "log-probs are at temperature 1.0 only; use an HF teacher")
        if request.topk > cap.max_topk:
            raise ValueError(f"teacher: top-{request.topk} requested, VLLMTeacher max_topk is {cap.max_topk}")
        if request.at_student_topk:
            if not cap.logprobs_at_any_ids:
                raise ValueError("teacher: log-probs at the student's top-k ids need exact_ids=True "
                                 "(vLLM Model Runner V2) or an HF teacher; a vLLM teacher otherwise "
                                 "returns only its own top-k")
            if student_topk_ids is None or student_topk_ids.shape[-1] > cap.max_topk:
                raise ValueError(f"teacher: at_student_topk needs student_topk_ids [N, T, Ks<={cap.max_topk}]")

    def score(self, teacher_prompts: list[list[int]], completion_ids: torch.Tensor,
              completion_mask: torch.Tensor, request: ScoreRequest,
              student_topk_ids: Optional[torch.Tensor] = None) -> TeacherScores:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import SamplingParams

        self._check(request, student_topk_ids)
        lengths = completion_lengths(completion_mask).tolist()
        completions = [completion_ids[i, :n].tolist() for i, n in enumerate(lengths)]
        if any(len(p) == 0 for p in teacher_prompts):
            raise ValueError("teacher: an empty teacher prompt leaves the first completion token unscored")
        rows = [i for i, n in enumerate(lengths) if n > 0]  # nothing to score in an empty completion
        num_ids = student_topk_ids.shape[-1] if request.at_student_topk else 0
        params, prompts = [], []
        for i in rows:
            # max_tokens=1: vLLM must generate something; that token is discarded. With num_ids, row r
            # of the id array scores prompt token start + r + 1, so start = P - 1 gives completion row r.
            params.append(SamplingParams(
                max_tokens=1, prompt_logprobs=request.topk, detokenize=False,
                prompt_logprob_token_ids=student_topk_ids[i, : lengths[i]].numpy() if num_ids else None,
                prompt_logprob_start=len(teacher_prompts[i]) - 1 if num_ids else None))
            prompts.append(TokensPrompt(prompt_token_ids=list(teacher_prompts[i]) + completions[i]))
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if rows else []
        return teacher_scores_from_outputs(outputs, rows, [len(p) for p in teacher_prompts], completions,
                                           completion_ids.shape[1], request.topk, num_ids)
