"""The teacher boundary: score student completions under the teacher's own prompt."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from opd.contracts import ScoreRequest, TeacherScores


@dataclass(frozen=True)
class TeacherCapabilities:
    full_vocab: bool          # can return [N, T, V] log-probs (a co-located HF teacher)
    logprobs_at_any_ids: bool  # exact log-probs at arbitrary ids (HF yes; vLLM only its own top-k)
    max_topk: int


class Teacher(Protocol):
    capabilities: TeacherCapabilities

    def score(self, teacher_prompts: list[list[int]], completion_ids: torch.Tensor,
              completion_mask: torch.Tensor, request: ScoreRequest,
              student_topk_ids: Optional[torch.Tensor] = None) -> TeacherScores:
        """teacher_prompts: N token lists (for OPSD they carry privileged information and differ from
        the student's prompts); completion_ids / completion_mask: [N, T]; student_topk_ids: [N, T, Ks].
        Returns scores aligned with completion positions."""
