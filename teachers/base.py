"""The teacher boundary: score student completions under the teacher's own prompt, and the shape of
what a teacher can return (`TeacherCapabilities`; each kind's, before any work: teachers/kinds.py)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from opd.contracts import ScoreRequest, TeacherScores


@dataclass(frozen=True)
class TeacherCapabilities:
    full_vocab: bool               # can return [N, T, V] log-probs (an HF teacher)
    logprobs_at_any_ids: bool      # exact log-probs at arbitrary ids (HF yes; vLLM on Model Runner V2)
    max_topk: int
    temperature_one_only: bool = False  # scores only at temperature 1 (vLLM prompt log-probs)
    limits: str = ""               # why a capability is missing, where it depends on the engine


def check_same_tokenizer(teacher_tok, student_tok, key: str = "teacher.path") -> None:
    """Distillation compares distributions id by id, so both sides must mean the same thing by an id."""
    tv, sv = teacher_tok.get_vocab(), student_tok.get_vocab()
    if len(tv) != len(sv):
        raise ValueError(f"{key}: tokenizer vocab {len(tv)} differs from student vocab {len(sv)}")
    diff = [t for t, i in sv.items() if tv.get(t) != i]
    if diff:
        raise ValueError(f"{key}: tokenizer maps {len(diff)} tokens differently from the student's "
                         f"(e.g. {diff[0]!r}); teacher and student must share a tokenizer")


class ScoresRollouts:
    """What every teacher actor shares: get_capabilities (what it can return, as built), and score_rollout:
    score a rollout given as the rollout engines' own replies, so the driver can chain teacher scoring onto
    generation it has not collected (Ray starts the call once every part exists: launch/overlap.py scores
    step n+1 while the learner trains step n)."""
    capabilities: TeacherCapabilities

    def get_capabilities(self) -> TeacherCapabilities:
        """What this teacher, as built, can return (a vLLM teacher's depend on its engine's runner)."""
        return self.capabilities

    def score(self, teacher_prompts: list[list[int]], completion_ids: torch.Tensor,
              completion_mask: torch.Tensor, request: ScoreRequest,
              student_topk_ids: Optional[torch.Tensor] = None) -> TeacherScores:
        """Each teacher's own (the Teacher protocol below)."""
        raise NotImplementedError

    def score_rollout(self, teacher_prompts: list[list[int]], request: ScoreRequest, rows: list[int],
                      *parts) -> TeacherScores:
        """`rows` (indices, in the order of teacher_prompts) of the rollout the engines' `parts` make
        together, padded as the driver pads it: the scores are [len(rows), T] for the rollout's width T."""
        from opd.contracts import concat_rollouts
        r = concat_rollouts(list(parts))
        idx = torch.as_tensor(rows, dtype=torch.long)
        topk = None if r.student_topk_ids is None else r.student_topk_ids.index_select(0, idx)
        return self.score(teacher_prompts, r.completion_ids.index_select(0, idx),
                          r.completion_mask.index_select(0, idx), request, topk)


class Teacher(Protocol):
    """What every teacher actor implements (HFTeacher, VLLMTeacher; a live one is also a
    opd.weight_sync.receiver.WeightReceiver). tests/test_protocols.py and mypy hold each to it."""
    capabilities: TeacherCapabilities

    def get_capabilities(self) -> TeacherCapabilities: ...

    def score_rollout(self, teacher_prompts: list[list[int]], request: ScoreRequest, rows: list[int],
                      *parts) -> TeacherScores: ...

    def score(self, teacher_prompts: list[list[int]], completion_ids: torch.Tensor,
              completion_mask: torch.Tensor, request: ScoreRequest,
              student_topk_ids: Optional[torch.Tensor] = None) -> TeacherScores:
        """teacher_prompts: N token lists (for OPSD they carry privileged information and differ from
        the student's prompts); completion_ids / completion_mask: [N, T]; student_topk_ids: [N, T, Ks].
        Returns scores aligned with completion positions."""
