"""The run's teachers as one: each teacher (a TeacherGroup of actors) scores only the rows routed to it
(launch/routing.py), and the scores come back re-assembled in row order, [N, T, ...] at the rollout's
width T, so the step's batch mixes rows of every teacher. With one teacher it is that teacher, called
exactly as before: the same calls, the same tensors, the same metric names.

Scores of several teachers: a teacher is sent its rows' completions at the rollout's full width T (the
engines' replies padded as the driver pads them, teachers/base.py score_rollout), so every part is
[n_g, T, ...]; a part narrower than T (a teacher that trims) is zero-padded on the right, where the mask
is False. A statistic only some teachers send (entropy: HF teachers) is left out of the merged scores;
the loss's own fields are sent by all of them (one request, every teacher checked against the loss).
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch

from launch.batches import PromptFormatter, teacher_stats
from launch.cluster import TeacherGroup
from launch.remote import Pending
from launch.routing import Router, TeacherSpec
from opd.contracts import Rollout, SamplingSpec, ScoreRequest, TeacherScores
from teachers.kinds import teacher_kind


@dataclass
class RoutedScores:
    """A step's teacher scores: `scores` over all N rows in row order, and each teacher's own part
    (teacher index, its rows, its scores [len(rows), T, ...]) for its statistics."""
    scores: TeacherScores
    parts: list[tuple[int, list[int], TeacherScores]]


@dataclass
class PendingScores:
    """Scoring in flight: per teacher that has rows, (teacher index, its rows, its pending calls)."""
    calls: list[tuple[int, list[int], Pending]]
    n: int


class TeacherSet:
    def __init__(self, specs: list[TeacherSpec], groups: list[TeacherGroup], fmts: list[PromptFormatter],
                 requests: list[ScoreRequest], router: Router):
        self.specs, self.groups, self.fmts, self.requests, self.router = specs, groups, fmts, requests, router

    @classmethod
    def start(cls, cfg, placement, specs: list[TeacherSpec], fmts: list[PromptFormatter],
              requests: list[ScoreRequest], router: Router) -> "TeacherSet":
        groups = [TeacherGroup.start(cfg, placement, g, s.config, f"teacher {s.name}" if s.named else "teacher")
                  for g, s in enumerate(specs)]
        return cls(specs, groups, fmts, requests, router)

    @property
    def actors(self) -> list:
        return [a for g in self.groups for a in g.actors]

    def split(self, rows: list[dict]) -> list[tuple[int, list[int]]]:
        """(teacher index, the indices of its rows in order) for every teacher with rows."""
        if len(self.groups) == 1:
            return [(0, list(range(len(rows))))]
        route = self.router.indices(rows)
        mine = [(g, [i for i, r in enumerate(route) if r == g]) for g in range(len(self.groups))]
        return [(g, idx) for g, idx in mine if idx]

    def score(self, rows: list[dict], rollout: Rollout) -> RoutedScores:
        parts = []
        for g, idx in self.split(rows):
            sub = rollout if len(idx) == len(rollout) else _rollout_rows(rollout, idx)
            prompts = self.fmts[g].teachers([rows[i] for i in idx])
            parts.append((g, idx, self.groups[g].score(prompts, sub, self.requests[g])))
        return RoutedScores(merge_scores([(idx, s) for _, idx, s in parts], len(rollout),
                                         rollout.completion_ids.shape[1]), parts)

    def submit_score(self, rows: list[dict], rollout: Pending) -> PendingScores:
        """Score a rollout still being generated (TeacherGroup.submit_score), each teacher its own rows."""
        calls = [(g, idx, self.groups[g].submit_score(self.fmts[g].teachers([rows[i] for i in idx]), rollout,
                                                      self.requests[g], idx))
                 for g, idx in self.split(rows)]
        return PendingScores(calls, len(rows))

    def collect_score(self, pending: PendingScores, width: int) -> RoutedScores:
        """`width`: the collected rollout's T."""
        parts = [(g, idx, self.groups[g].collect_score(p)) for g, idx, p in pending.calls]
        return RoutedScores(merge_scores([(idx, s) for _, idx, s in parts], pending.n, width), parts)

    def generate(self, rows: list[dict], spec: SamplingSpec) -> Rollout:
        """Completions the (one) teacher writes from its own prompts (several teachers are refused for
        loss.reference.source: teacher, launch/capabilities.py)."""
        return self.groups[0].generate(self.fmts[0].teachers(rows), spec)

    def row_weights(self, rows: list[dict]) -> Optional[torch.Tensor]:
        """[N] each row's teacher weight; None when every weight is 1 (the unweighted loss, bit for bit)."""
        weights = [s.config.weight for s in self.specs]
        if all(w == 1.0 for w in weights):
            return None
        return torch.tensor([weights[g] for g in self.router.indices(rows)], dtype=torch.float32)

    def stats(self, rollout: Rollout, routed: RoutedScores) -> dict[str, float]:
        """teacher_stats over every row (the names `teacher:` always had), and with `teachers:` each
        teacher's over its own rows, under teacher/<name>/ (opsd/<name>/pi_gap_nats for a self-teacher),
        with its row count and the sampled-token reverse-KL estimate mean_t log p_old(y_t) - log q(y_t)."""
        self_teacher = all(teacher_kind(s.config.kind).student_weights for s in self.specs)
        out = teacher_stats(rollout, routed.scores, self_teacher)
        for g, idx, scores in routed.parts:
            spec = self.specs[g]
            if not spec.named:
                continue
            sub = _rollout_rows(rollout, idx)
            prefix = f"teacher/{spec.name}/"
            out[prefix + "rows"] = float(len(idx))
            for k, v in teacher_stats(sub, scores, teacher_kind(spec.config.kind).student_weights).items():
                out[prefix + k.removeprefix("teacher/") if k.startswith("teacher/")
                    else f"opsd/{spec.name}/{k.removeprefix('opsd/')}"] = v
            if sub.behaviour_logprobs is not None and scores.sampled_logprobs is not None:
                mask = sub.completion_mask.float()
                gap = (sub.behaviour_logprobs - scores.sampled_logprobs) * mask
                out[prefix + "reverse_kl_sampled"] = float(gap.sum() / mask.sum().clamp(min=1))
        return out


def _rollout_rows(rollout: Rollout, idx: list[int]) -> Rollout:
    """The rollout's rows `idx`, at its width T."""
    take = torch.as_tensor(idx, dtype=torch.long)
    sel = lambda x: None if x is None else x.index_select(0, take)  # noqa: E731
    return replace(rollout, prompt_ids=[rollout.prompt_ids[i] for i in idx], completion_ids=sel(rollout.completion_ids),
                   completion_mask=sel(rollout.completion_mask), behaviour_logprobs=sel(rollout.behaviour_logprobs),
                   finish_reasons=[rollout.finish_reasons[i] for i in idx],
                   student_topk_ids=sel(rollout.student_topk_ids), student_topk_logprobs=sel(rollout.student_topk_logprobs))


def merge_scores(parts: list[tuple[list[int], TeacherScores]], n: int, width: int) -> TeacherScores:
    """Teachers' scores of disjoint row sets -> one TeacherScores over n rows in row order, [n, width, ...].
    parts: (row indices, their scores [len(rows), <= width, ...]). One part holding every row in order is
    returned as it is."""
    if len(parts) == 1 and parts[0][0] == list(range(n)):
        return parts[0][1]
    out = {}
    for f in fields(TeacherScores):
        xs = [(idx, getattr(s, f.name)) for idx, s in parts]
        if any(x is None for _, x in xs):
            out[f.name] = None  # sent by some teachers only: a statistic, not a loss input
            continue
        tails = {tuple(x.shape[2:]) for _, x in xs}
        if len(tails) > 1:
            raise ValueError(f"teachers: their {f.name} have shapes {sorted(tails)} past [N, T]; a loss over the "
                             "teachers' whole distributions needs teachers with the same embedding rows")
        _, first = xs[0]
        merged = torch.zeros((n, width, *first.shape[2:]), dtype=first.dtype)
        for idx, x in xs:
            if x.shape[1] > width:
                raise ValueError(f"teacher scores {f.name} are {x.shape[1]} positions wide, the rollout {width}")
            merged[torch.as_tensor(idx, dtype=torch.long), :x.shape[1]] = x
        out[f.name] = merged
    return TeacherScores(**out)
