"""Turn a manifest's `loss:` section into a callable Loss with declared needs, and check a teacher
can supply them before any work starts."""
from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any, Optional

import torch

from losses.base import REGISTRY, LossBatch, LossFn, Needs
from losses.kl_reference import check_kl_to_reference, kl_needs, with_kl_to_reference
from losses.reduce import Head, compute_loss, compute_loss_from_hidden


@dataclass
class Loss:
    name: str
    fn: LossFn
    needs: Needs
    temperature: float = 1.0
    chunk_size: Optional[int] = None  # rows per chunk; None: sized from the vocabulary

    def __call__(self, logits: torch.Tensor, batch: LossBatch, teacher_head: Optional[Head] = None):
        """logits [M, V] (any float dtype) -> (loss scalar = sum_t w_t l_t, {name: sum_t w_t d_t}).
        teacher_head: the teacher's output layer, when the batch carries teacher_hidden."""
        return compute_loss(self.fn, logits, batch, self.temperature, self.chunk_size, teacher_head)

    def from_hidden(self, hidden: torch.Tensor, head: Head, batch: LossBatch, teacher_head: Optional[Head] = None,
                    teacher_thread: bool = False):
        """The same from the student's final hidden states [M, H] and output layer: no [M, V] logits held.
        teacher_thread: make a hidden-state teacher's log-probs on a second thread (same results)."""
        return compute_loss_from_hidden(self.fn, hidden, head, batch, self.temperature, self.chunk_size, teacher_head,
                                        teacher_thread)


def build_loss(name: str, params: dict[str, Any] | None = None, temperature: float = 1.0,
               chunk_size: Optional[int] = None, kl_coef: float = 0.0, kl_estimator: str = "low_var_kl") -> Loss:
    """Look `name` up in the registry and build it; errors name the field and the valid choices.
    kl_coef > 0 adds a KL-to-reference penalty (losses/kl_reference.py); 0 leaves the loss untouched."""
    params = dict(params or {})
    if name not in REGISTRY:
        near = difflib.get_close_matches(name, REGISTRY, n=1)
        hint = f" (did you mean {near[0]!r}?)" if near else ""
        raise ValueError(f"loss.name: unknown loss {name!r}{hint}; choose one of {sorted(REGISTRY)}")
    if not (temperature > 0):
        raise ValueError(f"loss.temperature: {temperature!r}; must be > 0")
    spec = REGISTRY[name]
    try:
        fn = spec.build(**params)
        needs = spec.needs(**params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"loss.params: {e} (loss {name!r})") from e
    check_kl_to_reference(kl_coef, kl_estimator)
    if kl_coef > 0:
        fn, needs = with_kl_to_reference(fn, float(kl_coef), kl_estimator), kl_needs(needs)
    return Loss(name=name, fn=fn, needs=needs, temperature=temperature, chunk_size=chunk_size)


def teacher_shortfalls(needs: Needs, capabilities) -> list[str]:
    """What `needs` asks of a teacher that `capabilities` (teachers.base.TeacherCapabilities:
    full_vocab, logprobs_at_any_ids, max_topk) cannot give; empty when it can."""
    out = []
    if needs.teacher_full and not capabilities.full_vocab:
        out.append("the full-vocabulary teacher distribution (capability full_vocab)")
    if needs.teacher_at_student_topk and not capabilities.logprobs_at_any_ids:
        out.append("exact teacher log-probs at the student's top-k ids (capability logprobs_at_any_ids)")
    if needs.teacher_topk > capabilities.max_topk:
        out.append(f"the teacher's top-{needs.teacher_topk} (this teacher returns at most {capabilities.max_topk})")
    return out


def check_teacher(loss: Loss, capabilities, teacher_name: str = "teacher") -> None:
    """Raise ValueError naming the loss and what the teacher lacks, if it cannot serve this loss."""
    if loss.needs.needs_teacher and getattr(capabilities, "temperature_one_only", False) and loss.temperature != 1.0:
        raise ValueError(f"rollout.temperature: {loss.temperature} applies to the teacher's log-probs too, but "
                         f"{teacher_name} scores at temperature 1.0 only; sample at 1.0 or use an HF teacher")
    missing = teacher_shortfalls(loss.needs, capabilities)
    if missing:
        raise ValueError(f"loss.name: {loss.name!r} needs {'; and '.join(missing)}, which {teacher_name} "
                         f"cannot supply; use a co-located HF teacher or a loss with support: teacher "
                         f"(or, for T1 / T2, support: student_masked)")
