"""Teacher kinds as a registry: `teacher.kind` names an entry, and the entry says everything the rest
of the system asks about a kind: what it can serve (read by the manifest check before any work; each
teacher reports its own again once built, `get_capabilities`), whose weights it reads, the GPUs one of
its actors takes, and how its actor starts. No other module tests a kind by its name, but for the
learner's choice of the folder a hidden-states teacher head comes from (learner/ cannot import teachers/).

The project's kinds register themselves where their classes are: hf and self in teachers/hf_teacher.py,
vllm in teachers/vllm_teacher.py; `teachers/__init__.py` imports both, so the registry is full whenever
any teacher module is imported. Adding a kind is one file (the teacher class, whose `score` returns
TeacherScores, and a `register(TeacherKind(...))` call) and one line in that import (docs/design.md §7;
tests/test_teacher_kinds.py registers a throwaway kind). Rollout engines have a registry of the same
shape, actors/kinds.py.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Optional

from opd.actor_call import ActorCall  # a kind's module imports it from here, with the rest it registers with
from opd.registry import Registry
from teachers.base import TeacherCapabilities


@dataclass(frozen=True)
class TeacherStart:
    """What the launcher resolved for one teacher actor, from the manifest (launch/cluster.py)."""
    path: str                     # its weights: teacher.path, or model.path for a kind on the student's weights
    student_path: str             # the student's folder: tokenizers must agree
    dtype: str                    # model.dtype
    seed: int                     # distinct per actor
    threads: int                  # cluster.threads_per_actor
    use_gpu: bool
    trust_remote_code: bool
    max_tokens_per_batch: int     # teacher.max_tokens_per_batch
    llm: Any = None               # the vLLM engine's opd.vllm_llm.LLMSpec, for a kind with `vllm: True`


@dataclass(frozen=True)
class TeacherKind:
    name: str                                          # the value of teacher.kind
    # (teacher.vllm.max_logprobs, whether the run has GPUs) -> what it can serve, as far as the manifest tells
    capabilities: Callable[[int, bool], TeacherCapabilities]
    start: Callable[[TeacherStart], ActorCall]         # how one of its actors starts
    student_weights: bool = False  # reads the student's own weights (model.path), not teacher.path: OPSD
    follows_student: bool = False  # may be `live`: synced with the student's weights every step
    hf_model: bool = False         # holds its weights in an HF model in its process: full-vocabulary hidden
    #                                states, reference rows it writes itself (loss.reference.source: teacher)
    vllm: bool = False             # a vLLM engine: teacher.vllm applies, one actor takes tensor_parallel_size GPUs

    def gpus(self, tc) -> int:
        """GPUs one actor of this kind takes (teacher config `tc`), when the run has GPUs."""
        return tc.vllm.tensor_parallel_size if self.vllm else 1

    def weights_path(self, cfg, tc) -> str:
        """The folder its weights come from (`cfg` the run's manifest, `tc` this teacher's section)."""
        return cfg.model.path if self.student_weights else tc.path


TEACHER_KINDS: Registry[TeacherKind] = Registry("teacher.kind", "teacher kind", reserved=("none",))
register = TEACHER_KINDS.add
teacher_kind = TEACHER_KINDS.lookup


def capabilities_for(kind: str, max_logprobs: int = 20, on_gpu: bool = False) -> TeacherCapabilities:
    """What teacher.kind can serve (a vLLM teacher's log-probs at given ids depend on the runner its engine
    picks: allowed on GPUs here and checked again on the built engine, `ScoresRollouts.get_capabilities`)."""
    return teacher_kind(kind).capabilities(max_logprobs, on_gpu)


def kind_of(tc) -> Optional[TeacherKind]:
    """The kind of teacher section `tc`; None for `kind: none` (no teacher) or a name the manifest check refuses."""
    return TEACHER_KINDS.get(tc.kind)


def kinds_where(**declared) -> str:
    """The kinds with the given declarations, for messages: "hf, vllm or self"."""
    names = [k.name for k in TEACHER_KINDS.values() if all(getattr(k, a) == v for a, v in declared.items())]
    return ", ".join(names[:-1]) + " or " + names[-1] if len(names) > 1 else "".join(names)
