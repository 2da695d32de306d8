"""A teacher served by vLLM: scores `teacher_prompt + completion` with prompt log-probs.

One request per row with SamplingParams(max_tokens=1, prompt_logprobs=K). vLLM's prompt_logprobs
list has one entry per prompt token (entry 0 is None: the first token has no context), so the
completion token t of a row whose teacher prompt has P tokens is entry P + t, whatever the student
prompt was (OPSD teachers see privileged text the student never did). Each entry holds the actual
token's log-prob and the teacher's top-K.

Limits, stated as errors rather than approximated (and declared by `teachers.kinds.capabilities_for`,
which the manifest check reads before any work, and by `get_capabilities` on the built engine):
* no full vocabulary;
* prompt log-probs are at temperature 1 only (prompt tokens bypass the sampler);
* log-probs at arbitrary ids (the student's top-k) only where the engine it built runs Model Runner
  V2 (SamplingParams.prompt_logprob_token_ids; the CUDA default, never the CPU build): its
  capabilities are read from that engine, and the refusal says why. benchmarks/gpu_smoke.py checks
  them against the HF teacher on a GPU.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Optional, Sequence

import torch

from opd.contracts import ScoreRequest, TeacherScores
from opd.vllm_llm import LLMSpec, LLMWeightReceiver, build_llm, parse_positions, student_support_scoring
from teachers.base import ScoresRollouts, TeacherCapabilities, check_same_tokenizer
from teachers.kinds import ActorCall, TeacherKind, TeacherStart, register

if TYPE_CHECKING:
    from vllm.outputs import RequestOutput


CPU_BUILD_LIMIT = ("vLLM's CPU build runs Model Runner V1, and only V2 serves log-probs at given ids "
                   "(SamplingParams.prompt_logprob_token_ids)")


def capabilities(max_logprobs: int, at_any_ids_limit: Optional[str] = None) -> TeacherCapabilities:
    """`at_any_ids_limit`: why the engine cannot score given ids (None: it can)."""
    return TeacherCapabilities(full_vocab=False, logprobs_at_any_ids=at_any_ids_limit is None, max_topk=max_logprobs,
                               temperature_one_only=True, limits=at_any_ids_limit or "")


def at_ids_params(prompt_len: int, ids: list[list[int]]):
    """SamplingParams scoring `ids[t]` (the student's top-k at completion position t) as predictions of
    completion token t, for one row of `prompt_len` teacher-prompt tokens: row i of vLLM's scores
    predicts prompt token prompt_logprob_start + i + 1, so the rows start at the last prompt token."""
    from vllm.sampling_params import SamplingParams
    return SamplingParams(max_tokens=1, detokenize=False, prompt_logprob_start=prompt_len - 1,
                          prompt_logprob_token_ids=ids)


def at_ids_from_outputs(outputs: Sequence["RequestOutput"], rows: list[int], lengths: list[int],
                        shape: tuple[int, int, int]) -> torch.Tensor:
    """RequestOutputs of at_ids_params requests for `rows` -> [N, T, Ks] log q at the student's top-k
    (zeros at padded positions, as the HF teacher gives them)."""
    out = torch.zeros(shape)
    for i, o in zip(rows, outputs):
        got = o.prompt_token_id_logprobs
        if got is None or len(got) != lengths[i]:
            raise RuntimeError(f"vLLM request {o.request_id}: prompt_token_id_logprobs cover "
                               f"{0 if got is None else len(got)} positions, not the {lengths[i]} completion tokens")
        out[i, :lengths[i]] = torch.as_tensor(got, dtype=torch.float32)
    return out


def completion_lengths(completion_mask: torch.Tensor) -> torch.Tensor:
    """[N] lengths of right-padded completions; anything else is an error (positions would shift)."""
    lengths = completion_mask.sum(dim=1)
    prefix = torch.arange(completion_mask.shape[1])[None, :] < lengths[:, None]
    if not torch.equal(completion_mask.bool(), prefix):
        raise ValueError("completion_mask must be right-padded: True on a prefix of each row, then False")
    return lengths


def teacher_scores_from_outputs(outputs: Sequence["RequestOutput"], rows: list[int], prompt_lens: list[int],
                                completions: list[list[int]], width: int, k: int) -> TeacherScores:
    """vLLM RequestOutputs for the scored `rows` -> TeacherScores over all N rows, [N, width(, K)].
    Padded positions hold zeros. vLLM reports the scored token's rank (1 = argmax) with its log-prob."""
    n = len(completions)
    sampled = torch.zeros(n, width)
    rank = torch.zeros(n, width, dtype=torch.long)
    top_ids = torch.zeros(n, width, k, dtype=torch.long)
    top_lps = torch.zeros(n, width, k)
    for i, out in zip(rows, outputs):
        start, tokens = prompt_lens[i], completions[i]
        if out.prompt_logprobs is None or len(out.prompt_logprobs) != start + len(tokens):
            raise RuntimeError(f"vLLM request {out.request_id}: prompt_logprobs do not cover "
                               f"{start} teacher-prompt + {len(tokens)} completion tokens")
        T = len(tokens)
        sampled[i, :T], rank[i, :T], top_ids[i, :T], top_lps[i, :T] = parse_positions(out.prompt_logprobs, start,
                                                                                      tokens, k)
    return TeacherScores(sampled_logprobs=sampled, topk_ids=top_ids if k else None, topk_logprobs=top_lps if k else None,
                         sampled_rank=rank)


class VLLMTeacher(LLMWeightReceiver, ScoresRollouts):
    """Teacher protocol on vllm.LLM. A live self-teacher receives the student's weights through the
    same receiver methods as the rollout engines (spec.sync_backend set); a frozen one has none."""

    def __init__(self, spec: LLMSpec, student_path: Optional[str] = None, version: int = 0):
        # raw_logprobs: for prompt tokens raw and processed agree; the *_logits modes return logits.
        self.llm = build_llm(spec, "raw_logprobs")
        if student_path and student_path != spec.model:
            from transformers import AutoTokenizer
            check_same_tokenizer(self.llm.get_tokenizer(), AutoTokenizer.from_pretrained(student_path))
        self.capabilities = capabilities(spec.max_logprobs, student_support_scoring(self.llm))
        self.max_model_len = self.llm.llm_engine.model_config.max_model_len  # what the engine settled on
        self.weight_version = version

    def _check(self, request: ScoreRequest) -> None:
        cap = self.capabilities
        if request.full_vocab:
            raise ValueError("teacher: a vLLM teacher returns top-k log-probs, not the full vocabulary; "
                             "full-vocab losses need an HF teacher (teacher.kind: hf)")
        if request.temperature != 1.0:
            raise ValueError(f"teacher: scoring at temperature {request.temperature}, but vLLM prompt "
                             "log-probs are at temperature 1.0 only; use an HF teacher")
        if request.topk > cap.max_topk:
            raise ValueError(f"teacher: top-{request.topk} requested, teacher.vllm.max_logprobs is {cap.max_topk}")
        if request.at_student_topk and not cap.logprobs_at_any_ids:
            raise ValueError(f"teacher: log-probs at the student's top-k ids need an HF teacher here: {cap.limits}")

    def score(self, teacher_prompts: list[list[int]], completion_ids: torch.Tensor,
              completion_mask: torch.Tensor, request: ScoreRequest,
              student_topk_ids: Optional[torch.Tensor] = None) -> TeacherScores:
        from vllm.inputs import TokensPrompt
        from vllm.sampling_params import SamplingParams

        self._check(request)
        lengths = completion_lengths(completion_mask).tolist()
        completions = [completion_ids[i, :n].tolist() for i, n in enumerate(lengths)]
        if any(len(p) == 0 for p in teacher_prompts):
            raise ValueError("teacher: an empty teacher prompt leaves the first completion token unscored")
        rows = [i for i, n in enumerate(lengths) if n > 0]  # nothing to score in an empty completion
        for i in rows:  # +1: vLLM must generate one (discarded) token after the scored sequence
            if len(teacher_prompts[i]) + lengths[i] + 1 > self.max_model_len:
                raise ValueError(f"teacher.vllm.max_model_len: {self.max_model_len} tokens, but row {i} needs "
                                 f"{len(teacher_prompts[i])} teacher-prompt + {lengths[i]} completion + 1; "
                                 "raise it to at least the longest teacher prompt + rollout.max_new_tokens + 1")
        # flat_logprobs: arrays rather than a dict per position, which parse_positions reads without a loop
        params = SamplingParams(max_tokens=1, prompt_logprobs=request.topk, detokenize=False, flat_logprobs=True)
        prompts = [TokensPrompt(prompt_token_ids=list(teacher_prompts[i]) + completions[i]) for i in rows]
        outputs = self.llm.generate(prompts, params, use_tqdm=False) if rows else []
        scores = teacher_scores_from_outputs(outputs, rows, [len(p) for p in teacher_prompts], completions,
                                             completion_ids.shape[1], request.topk)
        if request.at_student_topk:
            if student_topk_ids is None:
                raise ValueError("teacher: log-probs at the student's top-k were requested but the rollout "
                                 "returned no student_topk_ids")
            # A request of its own: prompt_logprob_start moves where vLLM's score rows begin.
            at_params = [at_ids_params(len(teacher_prompts[i]), student_topk_ids[i, :lengths[i]].tolist()) for i in rows]
            at_outputs = self.llm.generate(prompts, at_params, use_tqdm=False) if rows else []
            scores.at_student_topk = at_ids_from_outputs(at_outputs, rows, lengths, tuple(student_topk_ids.shape))
        return scores


def start(s: TeacherStart) -> ActorCall:
    return ActorCall(VLLMTeacher, (s.llm,), dict(student_path=s.student_path))


register(TeacherKind("vllm", lambda max_logprobs, on_gpu: capabilities(max_logprobs, None if on_gpu else CPU_BUILD_LIMIT),
                     start, vllm=True))
