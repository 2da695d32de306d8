"""The data that crosses process boundaries, and nothing else.

Every tensor here lives on CPU and is padded to a rectangle. Shapes use:
  N = samples in the batch (prompts x samples per prompt), T = longest completion,
  K = teacher top-k, Ks = student top-k, V = vocabulary.

Flow of one step:  prompts -> Rollout (rollout actors) -> TeacherScores (teacher actors)
-> TrainBatch (driver) -> learner, which turns it into losses.LossBatch per micro-batch.
"""
from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Optional

import torch


@dataclass(frozen=True)
class SamplingSpec:
    """How to sample. temperature == 0 means greedy. The behaviour log-prob is always
    log softmax(logits / temperature) of the sampled token (top-p only truncates sampling),
    which is exactly what the learner recomputes, so the two sides agree."""
    max_new_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    return_topk: int = 0  # student top-k ids per position (0: none)
    seed: Optional[int] = None
    behaviour_logprobs: bool = True  # False for evaluation: nothing will read them
    # Every id generation stops at (opd/tokens.py: the tokenizer's EOS, generation_config's, rollout.stop);
    # the stop token ends the completion and is part of it. Empty: the engine's own EOS only.
    stop_ids: tuple[int, ...] = ()


@dataclass
class Rollout:
    """Completions sampled by the student at one weight version."""
    prompt_ids: list[list[int]]            # N student prompts (no padding)
    completion_ids: torch.Tensor           # [N, T] long, right-padded with pad_id
    completion_mask: torch.Tensor          # [N, T] bool, True on real completion tokens (eos included)
    behaviour_logprobs: Optional[torch.Tensor]  # [N, T] float32, log p_old(y_t) at the sampling temperature
    finish_reasons: list[str]              # N of "stop" | "length"
    weight_version: int
    student_topk_ids: Optional[torch.Tensor] = None  # [N, T, Ks] long
    # [N, T, Ks] log p_old at those ids, the same contract as behaviour_logprobs (sent with the ids)
    student_topk_logprobs: Optional[torch.Tensor] = None

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def completions(self) -> list[list[int]]:
        return [[t for t, m in zip(ids, keep) if m]
                for ids, keep in zip(self.completion_ids.tolist(), self.completion_mask.tolist())]


@dataclass(frozen=True)
class ScoreRequest:
    """What the loss needs from the teacher; the driver builds it from the loss's declared needs."""
    topk: int = 0                    # teacher's own top-k (ids, log-probs)
    at_student_topk: bool = False    # log-probs at Rollout.student_topk_ids
    full_vocab: bool = False         # the whole [N, T, V] log-prob tensor (co-located teachers only)
    hidden_states: bool = False      # the teacher's final hidden states [N, T, H] instead of full_vocab:
                                     # the learner applies the teacher's head (teacher.full_vocab_transport)
    sampled: bool = True             # log q(y_t), its rank and H(q), which need the teacher's own head.
                                     # False only beside hidden_states: the learner computes them from the
                                     # log-probs it makes anyway, and the teacher runs no head at all
    temperature: float = 1.0         # applied to teacher logits exactly as to the student's


@dataclass
class TeacherScores:
    """Teacher log-probs at every completion position (rows align with Rollout rows)."""
    sampled_logprobs: Optional[torch.Tensor] = None        # [N, T] log q(y_t) (None: ScoreRequest.sampled False)
    topk_ids: Optional[torch.Tensor] = None                # [N, T, K] long
    topk_logprobs: Optional[torch.Tensor] = None           # [N, T, K]
    at_student_topk: Optional[torch.Tensor] = None         # [N, T, Ks] log q at student top-k ids
    full_logprobs: Optional[torch.Tensor] = None           # [N, T, V]
    hidden_states: Optional[torch.Tensor] = None           # [N, T, H] final hidden states (H << V)
    # The teacher's view of the student's tokens (failure mechanism 1: prefixes it would never write).
    sampled_rank: Optional[torch.Tensor] = None            # [N, T] long, 1 = the teacher's argmax
    entropy: Optional[torch.Tensor] = None                 # [N, T] teacher entropy (HF teachers only)


@dataclass
class TrainBatch:
    """One optimizer step's worth of rows. The learner splits it across ranks and micro-batches.

    Rows with is_reference=True are reference / teacher-written sequences (SFT rows); the rest are
    on-policy samples. Each kind's loss is averaged over that kind's tokens in the *global* batch
    (token_counts), so any split gives the same gradient as one big batch."""
    prompt_ids: list[list[int]]                  # N student prompts
    completion_ids: torch.Tensor                 # [N, T] long
    completion_mask: torch.Tensor                # [N, T] bool
    behaviour_logprobs: Optional[torch.Tensor] = None   # [N, T]
    student_topk_ids: Optional[torch.Tensor] = None     # [N, T, Ks]
    student_topk_logprobs: Optional[torch.Tensor] = None  # [N, T, Ks] behaviour log-probs at those ids
    teacher: Optional[TeacherScores] = None
    advantages: Optional[torch.Tensor] = None    # [N] per-sequence (GRPO), broadcast over tokens
    is_reference: Optional[torch.Tensor] = None  # [N] bool
    # [N] float: multiplies every token weight of the row (its teacher's `weight`, launch/routing.py); the
    # denominators stay the global counts. None: 1 for every row.
    row_weights: Optional[torch.Tensor] = None
    weight_version: int = 0

    @property
    def loss_tokens(self) -> int:
        return int(self.completion_mask.sum())

    @property
    def token_counts(self) -> tuple[int, int]:
        """(on-policy tokens, reference tokens) in the whole batch. Each kind's loss is a mean over its
        own tokens, so an SFT term mixed into distillation keeps its weight whatever the two lengths."""
        return _token_counts(self.completion_mask, _flags(self.is_reference, len(self)))

    def denominators(self, reduction: str, rows: slice = slice(None)) -> tuple[int, int]:
        """(on-policy, reference) denominators of loss.reduction over `rows`: token counts for token_mean
        (token_counts), row counts for sample_mean, empty rows included (slime divides by its global batch
        size in samples)."""
        ref = _flags(self.is_reference, len(self))[rows]
        if reduction == "token_mean":
            return _token_counts(self.completion_mask[rows], ref)
        return int((~ref).sum()), int(ref.sum())

    def __len__(self) -> int:
        return len(self.prompt_ids)

    def select(self, rows: list[int]) -> "TrainBatch":
        """A sub-batch of the given rows (tensors and nested TeacherScores sliced alike)."""
        idx = torch.as_tensor(rows, dtype=torch.long)

        def take(x):
            if x is None:
                return None
            if isinstance(x, TeacherScores):
                return TeacherScores(**{f.name: take(getattr(x, f.name)) for f in fields(x)})
            if isinstance(x, torch.Tensor):
                return x.index_select(0, idx)
            return [x[i] for i in rows]

        return replace(self, **{f.name: take(getattr(self, f.name)) for f in fields(self)
                                if f.name != "weight_version"})


def trimmed(b: TrainBatch) -> TrainBatch:
    """`b` with every [n, T, ...] tensor cut to its own longest completion (the last column any row uses):
    a micro-batch padded only as far as its rows need. Nothing after a row's last token is read by the
    loss (zero weight) or by the model (causal attention), so the values do not change."""
    used = b.completion_mask.any(0).nonzero()
    width = int(used.max()) + 1 if len(used) else min(1, b.completion_ids.shape[1])
    if width == b.completion_ids.shape[1]:
        return b
    T = b.completion_ids.shape[1]

    def cut(x):
        if isinstance(x, TeacherScores):
            return TeacherScores(**{f.name: cut(getattr(x, f.name)) for f in fields(x)})
        if isinstance(x, torch.Tensor) and x.dim() >= 2 and x.shape[1] == T:
            return x[:, :width]
        return x

    return replace(b, **{f.name: cut(getattr(b, f.name)) for f in fields(b)})


def _flags(is_reference: Optional[torch.Tensor], n: int) -> torch.Tensor:
    return is_reference if is_reference is not None else torch.zeros(n, dtype=torch.bool)


def _token_counts(mask: torch.Tensor, ref: torch.Tensor) -> tuple[int, int]:
    per_row = mask.sum(-1)
    return int(per_row[~ref].sum()), int(per_row[ref].sum())


def concat_batches(a: TrainBatch, b: TrainBatch) -> TrainBatch:
    """Rows of a, then rows of b, completions re-padded to the wider of the two. A field only one side
    has is zero-filled on the other (is_reference: False), so on-policy rows and the reference rows of
    an SFT mix travel as one batch; a loss reads each field only on the rows that have it."""
    width = max(a.completion_ids.shape[1], b.completion_ids.shape[1])

    def grow(x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, width - x.shape[1]))

    def cat(x, y, n_x: int, n_y: int):
        if x is None and y is None:
            return None
        like = x if x is not None else y
        zeros = lambda n: torch.zeros((n, *like.shape[1:]), dtype=like.dtype)  # noqa: E731
        x, y = (x if x is not None else zeros(n_x)), (y if y is not None else zeros(n_y))
        return torch.cat([grow(x), grow(y)]) if x.dim() > 1 else torch.cat([x, y])

    na, nb = len(a), len(b)
    ta, tb = a.teacher, b.teacher
    teacher = None if ta is None and tb is None else TeacherScores(**{
        f.name: cat(getattr(ta, f.name) if ta else None, getattr(tb, f.name) if tb else None, na, nb)
        for f in fields(TeacherScores)})
    flags = lambda x, n: x if x is not None else torch.zeros(n, dtype=torch.bool)  # noqa: E731
    ones = lambda x, n: x if x is not None else torch.ones(n)  # noqa: E731
    row_weights = (None if a.row_weights is None and b.row_weights is None
                   else torch.cat([ones(a.row_weights, na), ones(b.row_weights, nb)]))
    return TrainBatch(prompt_ids=a.prompt_ids + b.prompt_ids,
                      completion_ids=cat(a.completion_ids, b.completion_ids, na, nb),
                      completion_mask=cat(a.completion_mask, b.completion_mask, na, nb),
                      behaviour_logprobs=cat(a.behaviour_logprobs, b.behaviour_logprobs, na, nb),
                      student_topk_ids=cat(a.student_topk_ids, b.student_topk_ids, na, nb),
                      student_topk_logprobs=cat(a.student_topk_logprobs, b.student_topk_logprobs, na, nb),
                      teacher=teacher, advantages=cat(a.advantages, b.advantages, na, nb),
                      is_reference=torch.cat([flags(a.is_reference, na), flags(b.is_reference, nb)]),
                      row_weights=row_weights, weight_version=a.weight_version)


def pad_rows(rows: list[list], pad, dtype=torch.long, width: Optional[int] = None) -> torch.Tensor:
    """Right-pad a ragged list of lists into a [len(rows), width] tensor."""
    width = max((len(r) for r in rows), default=0) if width is None else width
    out = torch.full((len(rows), width), pad, dtype=dtype)
    for i, r in enumerate(rows):
        if r:
            out[i, : len(r)] = torch.as_tensor(r, dtype=dtype)
    return out


def concat_rollouts(parts: list[Rollout]) -> Rollout:
    """Join rollouts from several actors (re-padding completions to the longest)."""
    if len(parts) == 1:
        return parts[0]
    width = max(p.completion_ids.shape[1] for p in parts)

    def cat(name, pad):
        xs = [getattr(p, name) for p in parts]
        if xs[0] is None:
            return None
        grow = lambda x: torch.nn.functional.pad(x, (0, 0) * (x.dim() - 2) + (0, width - x.shape[1]), value=pad)  # noqa: E731
        return torch.cat([grow(x) for x in xs])

    return Rollout(
        prompt_ids=[p for r in parts for p in r.prompt_ids],
        completion_ids=cat("completion_ids", 0),
        completion_mask=cat("completion_mask", False),
        behaviour_logprobs=cat("behaviour_logprobs", 0.0),
        finish_reasons=[f for r in parts for f in r.finish_reasons],
        weight_version=min(r.weight_version for r in parts),
        student_topk_ids=cat("student_topk_ids", 0),
        student_topk_logprobs=cat("student_topk_logprobs", 0.0),
    )


def concat_scores(parts: list[TeacherScores]) -> TeacherScores:
    """Join teacher scores row-wise (all parts share the completion width T)."""
    if len(parts) == 1:
        return parts[0]
    return TeacherScores(**{f.name: None if getattr(parts[0], f.name) is None
                            else torch.cat([getattr(p, f.name) for p in parts]) for f in fields(TeacherScores)})
