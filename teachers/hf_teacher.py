"""Teacher on Hugging Face transformers. Also the OPSD self-teacher: load the student's path and,
for a live teacher, receive the student's weights after every step."""
from __future__ import annotations

from typing import Optional

import torch

from actors.hf_engine import load_model, load_named_tensors, left_pad, positions
from launch.capabilities import TEACHER_CAPABILITIES
from opd.contracts import ScoreRequest, TeacherScores, concat_scores


def check_same_tokenizer(teacher_tok, student_tok, key: str = "teacher.path") -> None:
    """Distillation compares distributions id by id, so both sides must mean the same thing by an id."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if len(tv) != len(sv):
        raise ValueError(f"{key}: tokenizer vocab {len(tv)} differs from student vocab {len(sv)}")
    diff = [t for t, i in sv.items() if tv.get(t) != i]
    if diff:
        raise ValueError(f"{key}: tokenizer maps {len(diff)} tokens differently from the student's "
                         f"(e.g. {diff[0]!r}); teacher and student must share a tokenizer")


class HFTeacher:
    capabilities = TEACHER_CAPABILITIES["hf"]

    def __init__(self, model_path: str, dtype: str = "float32", student_path: Optional[str] = None,
                 threads: int = 0, micro_batch: int = 64):
        self.model, tok = load_model(model_path, dtype, threads)
        if student_path and student_path != model_path:
            from transformers import AutoTokenizer
            check_same_tokenizer(tok, AutoTokenizer.from_pretrained(student_path))
        self.pad_id = tok.pad_token_id
        self.micro_batch = micro_batch
        self.weight_version = 0

    @torch.no_grad()
    def score(self, teacher_prompts: list[list[int]], completion_ids: torch.Tensor,
              completion_mask: torch.Tensor, request: ScoreRequest,
              student_topk_ids: Optional[torch.Tensor] = None) -> TeacherScores:
        parts = [self._score(teacher_prompts[s:s + self.micro_batch], completion_ids[s:s + self.micro_batch],
                             completion_mask[s:s + self.micro_batch], request,
                             None if student_topk_ids is None else student_topk_ids[s:s + self.micro_batch])
                 for s in range(0, len(teacher_prompts), self.micro_batch)]
        return concat_scores(parts)

    def _score(self, prompts, completion_ids, completion_mask, request, student_topk_ids) -> TeacherScores:
        p_ids, p_mask = left_pad(prompts, self.pad_id)
        ids = torch.cat([p_ids, completion_ids.masked_fill(~completion_mask, self.pad_id)], 1)
        mask = torch.cat([p_mask, completion_mask.long()], 1)
        P, T = p_ids.shape[1], completion_ids.shape[1]
        # Position P-1+t predicts completion token t: keep exactly those T logits.
        keep = torch.arange(P - 1, P + T - 1)
        logits = self.model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                            logits_to_keep=keep).logits
        logp = torch.log_softmax(logits.float() / request.temperature, -1)  # [n, T, V]
        valid = completion_mask[..., None]
        out = TeacherScores(sampled_logprobs=logp.gather(-1, completion_ids[..., None]).squeeze(-1)
                            .masked_fill(~completion_mask, 0.0))
        if request.topk:
            top = logp.topk(request.topk, -1)
            out.topk_ids, out.topk_logprobs = top.indices, top.values.masked_fill(~valid, 0.0)
        if request.at_student_topk:
            if student_topk_ids is None:
                raise ValueError("teacher: log-probs at the student's top-k were requested but the rollout "
                                 "returned no student_topk_ids")
            out.at_student_topk = logp.gather(-1, student_topk_ids).masked_fill(~valid, 0.0)
        if request.full_vocab:
            out.full_logprobs = logp
        return out

    @torch.no_grad()
    def update_weights(self, named_tensors, version: int) -> None:
        """Live self-teacher (OPSD): follow the student's weights."""
        load_named_tensors(self.model, named_tensors)
        self.weight_version = version
