"""The loss contract: what a loss sees, what it declares it needs, and the registry.

A loss is a per-token function. It receives student logits for completion positions only and a
LossBatch of aligned tensors, and returns the per-token loss [M] and per-token diagnostics. The
learner never reduces: `compute_loss` (losses/reduce.py) multiplies by LossBatch.weights (mask
divided by the global token count) and sums, which is the one place the loss is reduced.

A LossFn may carry an attribute `prepare(batch) -> batch`. compute_loss runs it once on the whole
(un-chunked) batch before chunking; it is for per-sequence quantities built from stop-gradient
inputs (discounted returns), which it stores in LossBatch.extras.

A LossFn may also carry `value_and_grad(logits, batch) -> (LossOutput, d(sum_t w_t l_t)/d logits)`: its
gradient in closed form, which compute_loss then uses instead of autograd through the loss (full_reverse_kl
has one). tests/test_losses_reference.py holds it to a brute-force reference like any loss.
"""
from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field, fields
from typing import Callable, Iterator, Optional

import torch


@dataclass(frozen=True)
class Needs:
    """What a loss needs from the rest of the system. The driver asks actors for exactly this."""
    teacher_sampled: bool = False        # log q(y_t) of the sampled token
    teacher_topk: int = 0                # teacher's own top-k of this size
    teacher_at_student_topk: bool = False  # log q at the student's top-k ids (implies student_topk)
    student_topk: int = 0                # student top-k ids (and behaviour log-probs there) from the rollout
    teacher_full: bool = False           # full [.., V] teacher log-probs (co-located teacher only)
    behaviour_logprobs: bool = False     # log p_old(y_t) from the rollout
    advantages: bool = False             # per-sequence advantages (verifier rewards)
    reference_rows: bool = False         # SFT rows (reference / teacher-written tokens)
    needs_teacher: bool = False
    sequence_ids: bool = False           # LossBatch.seq_ids (whole sequences, rows in time order)
    frozen_reference_logprobs: bool = False  # log p_ref(y_t) from a frozen reference model (the learner's)

    def union(self, other: "Needs") -> "Needs":
        vals = {}
        for f in fields(self):
            a, b = getattr(self, f.name), getattr(other, f.name)
            vals[f.name] = max(a, b) if isinstance(a, int) and not isinstance(a, bool) else (a or b)
        return Needs(**vals)


@dataclass
class LossBatch:
    """Aligned per-position tensors, flattened to M rows (M = positions in the chunk).

    Optional fields are filled only when the loss declared the matching need. Top-k columns are
    sorted by descending probability; a loss with parameter k uses the first k columns. Rows with
    weight 0 (padding) must still hold finite values (pad with 0): 0 * nan is nan. weighted_sum
    shows its components only their own rows, so SFT rows may leave teacher fields unfilled."""
    tokens: torch.Tensor                                   # [M] long, completion token y_t
    weights: torch.Tensor                                  # [M] float, mask / global token count
    behaviour_logprobs: Optional[torch.Tensor] = None      # [M]
    teacher_sampled_logprobs: Optional[torch.Tensor] = None  # [M]
    teacher_topk_ids: Optional[torch.Tensor] = None        # [M, K] long
    teacher_topk_logprobs: Optional[torch.Tensor] = None   # [M, K]
    student_topk_ids: Optional[torch.Tensor] = None        # [M, Ks] long
    student_topk_logprobs: Optional[torch.Tensor] = None   # [M, Ks] behaviour log p_old at student_topk_ids
    teacher_at_student_topk: Optional[torch.Tensor] = None  # [M, Ks]
    teacher_full_logprobs: Optional[torch.Tensor] = None   # [M, V]
    # [M, Ht] the teacher's final hidden states instead of teacher_full_logprobs: compute_loss applies the
    # teacher's head chunk by chunk and hands the loss teacher_full_logprobs (losses never see this field).
    teacher_hidden: Optional[torch.Tensor] = None
    advantages: Optional[torch.Tensor] = None              # [M] (sequence advantage per token)
    # [M] log p_ref(y_t) of a frozen reference model at the loss temperature (loss.kl_to_reference)
    frozen_reference_logprobs: Optional[torch.Tensor] = None
    is_reference: Optional[torch.Tensor] = None            # [M] bool, SFT rows
    # [M] long: sequence index of each row. Needed (Needs.sequence_ids) only by losses that look
    # across a sequence (discounting); the micro-batch must then hold whole sequences, each one's
    # rows contiguous and in time order (row-major flattening of [N, T] gives exactly that).
    seq_ids: Optional[torch.Tensor] = None
    # name -> [M, ...]: written by a LossFn's `prepare`, never by the learner.
    extras: dict[str, torch.Tensor] = field(default_factory=dict)

    def rows(self, sl: slice) -> "LossBatch":
        return self._map(lambda t: t[sl])

    def select(self, idx: torch.Tensor) -> "LossBatch":
        """Rows at the [m] long indices idx."""
        return self._map(lambda t: t.index_select(0, idx))

    def to(self, device: torch.device) -> "LossBatch":
        return self._map(lambda t: t.to(device, non_blocking=True))

    def _map(self, take) -> "LossBatch":
        vals = {f.name: (None if getattr(self, f.name) is None else take(getattr(self, f.name)))
                for f in fields(self) if f.name != "extras"}
        return LossBatch(**vals, extras={k: take(v) for k, v in self.extras.items()})

    def require(self, *names: str) -> None:
        """Fail clearly when the learner did not fill a field this loss declared it needs."""
        missing = [n for n in names if getattr(self, n) is None]
        if missing:
            raise ValueError(f"LossBatch.{', '.join(missing)} is None but the loss needs it; the learner "
                             f"must fill every field the loss's Needs asks for")


@dataclass
class LossOutput:
    per_token: torch.Tensor          # [M] loss per position (unweighted)
    diagnostics: dict[str, torch.Tensor]  # name -> [M] per-position value (detached)


LossFn = Callable[[torch.Tensor, LossBatch], LossOutput]  # (logits [M, V] float32, batch) -> output


@dataclass(frozen=True)
class LossSpec:
    name: str
    build: Callable[..., LossFn]     # build(**params) -> LossFn; raises TypeError/ValueError on bad params
    needs: Callable[..., Needs]      # needs(**params) -> Needs
    doc: str = ""


REGISTRY: dict[str, LossSpec] = {}


def register(name: str, needs: Callable[..., Needs]):
    """Decorator: register `build(**params) -> LossFn` under `name`."""
    def deco(build):
        if name in REGISTRY:
            raise ValueError(f"loss {name!r} registered twice")
        REGISTRY[name] = LossSpec(name=name, build=build, needs=needs, doc=(build.__doc__ or "").strip())
        return build
    return deco


# Diagnostics are computed in compute_loss's no-grad forward pass only; the backward pass, which
# recomputes each chunk, switches them off so it does not pay for them twice.
_diagnostics_on = [True]


def diagnostics_enabled() -> bool:
    return _diagnostics_on[0]


@contextmanager
def diagnostics_off() -> Iterator[None]:
    prev, _diagnostics_on[0] = _diagnostics_on[0], False
    try:
        yield
    finally:
        _diagnostics_on[0] = prev
