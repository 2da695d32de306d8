"""Several teachers in one run: which teachers a manifest names, their checks, and which one scores a row.

A manifest names either `teacher:` (one teacher, as always: it is called "teacher" here and its metrics keep
their names) or `teachers:` (a list, each entry a TeacherConfig with a `name` and a loss `weight`) and
`teacher_routing:`, which picks a row's teacher from a data field:

    teachers:
      - {name: add, kind: hf, path: runs/add-teacher/final}
      - {name: rev, kind: vllm, path: runs/rev-teacher/final, weight: 0.5}
    teacher_routing: {field: task, routes: {addition: add}, default: rev}

A row goes to routes[row[field]] if there is such an entry, else to the teacher named row[field], else to
`default`; with no default such a row is an error, found over the whole of data.train before any work.

The weight. With w(i) the weight of row i's teacher (1 for reference rows and for `teacher:`), m the mask
and D the global denominator of loss.reduction over the (mini-)batch (the on-policy token count for
token_mean; for sample_mean the row's own token count times the on-policy row count), the loss is

    L = sum_i w(i) sum_t m_it loss_it / D_i

D is NOT re-weighted: weights are not normalised to sum to one. So weight 1 everywhere is exactly the
unweighted loss, a teacher's weight scales its rows' share of the gradient as a coefficient would (ROLL's
per-teacher coefficient), and any split of the batch over ranks and micro-batches still gives the gradient
of the whole batch (the denominators are global, the weights per row). train/* diagnostics are reduced
under the same weights.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from launch.config import ExperimentConfig, ManifestError, TeacherConfig
from teachers.kinds import kinds_where

SINGLE = "teacher"  # the name of `teacher:`'s one teacher
_NAME = re.compile(r"^[A-Za-z0-9_.-]+$")


@dataclass(frozen=True)
class TeacherSpec:
    name: str
    key: str               # its manifest key, for errors: "teacher" or "teachers[1]"
    config: TeacherConfig
    named: bool            # from teachers: (its statistics are reported under teacher/<name>/ too)


def teacher_specs(cfg: ExperimentConfig) -> list[TeacherSpec]:
    """The run's teachers, in manifest order: `teachers:`, or `teacher:` as one teacher named "teacher"."""
    if cfg.teachers:
        return [TeacherSpec(t.name or f"#{i}", f"teachers[{i}]", t, True) for i, t in enumerate(cfg.teachers)]
    return [TeacherSpec(SINGLE, "teacher", cfg.teacher, False)]


def check_teachers(cfg: ExperimentConfig) -> None:
    """`teachers:` and `teacher_routing:` as a whole (each teacher's own keys are checked with `teacher:`'s)."""
    routing = cfg.teacher_routing
    if not cfg.teachers:
        if cfg.teacher.name is not None or cfg.teacher.weight != 1.0:
            raise ManifestError("teacher.name / teacher.weight: name and weigh teachers in a `teachers:` list; "
                                "`teacher:` is the run's one teacher")
        if routing.field is not None or routing.routes or routing.default is not None:
            raise ManifestError("teacher_routing: routes rows among the teachers of a `teachers:` list; "
                                "this manifest has one `teacher:`")
        return
    if cfg.algorithm != "opd":
        raise ManifestError(f"teachers: algorithm {cfg.algorithm!r} uses no teacher; remove teachers:")
    if cfg.teacher not in (TeacherConfig(), TeacherConfig(kind="none")):  # a base manifest's kind: none may stay
        raise ManifestError("teacher: and teachers: are both set; a run has one `teacher:` or a `teachers:` list "
                            "(move the teacher into the list, with a name)")
    names = []
    for i, t in enumerate(cfg.teachers):
        if not t.name or not _NAME.match(t.name):
            raise ManifestError(f"teachers[{i}].name: {t.name!r}; each teacher needs a name of letters, digits, "
                                "'_', '.' or '-' (it is its metric prefix, teacher/<name>/)")
        if t.name in names:
            raise ManifestError(f"teachers[{i}].name: {t.name!r} is used twice; names must differ")
        if t.kind == "none":
            raise ManifestError(f"teachers[{i}].kind: 'none' is not a teacher; use {kinds_where()}")
        if not t.weight > 0:
            raise ManifestError(f"teachers[{i}].weight: must be > 0, got {t.weight} (a teacher whose rows should "
                                "not count belongs out of the list)")
        names.append(t.name)
    for value, name in routing.routes.items():
        if name not in names:
            raise ManifestError(f"teacher_routing.routes: {value!r} -> {name!r}, which is no teacher's name "
                                f"(teachers: {', '.join(names)})")
    if routing.default is not None and routing.default not in names:
        raise ManifestError(f"teacher_routing.default: {routing.default!r} is no teacher's name "
                            f"(teachers: {', '.join(names)})")
    if len(names) > 1 and routing.field is None:
        raise ManifestError("teacher_routing.field: several teachers need a data field that picks each row's "
                            "(e.g. teacher_routing: {field: data_source, default: " + names[0] + "})")
    if len(names) > 1 and any(t.full_vocab_transport == "hidden_states" for t in cfg.teachers):
        raise ManifestError("teachers[].full_vocab_transport: hidden_states makes the learner apply one teacher's "
                            "output layer; with several teachers use logprobs")


class Router:
    """Row -> the index of its teacher in teacher_specs(cfg)."""

    def __init__(self, cfg: ExperimentConfig):
        specs = teacher_specs(cfg)
        self.names = [s.name for s in specs]
        r = cfg.teacher_routing
        self.field, self.routes = r.field, dict(r.routes)
        self.default = r.default if r.default is not None or len(specs) > 1 else specs[0].name

    def name(self, row: dict) -> Optional[str]:
        """The row's teacher, or None when it names none and there is no default."""
        value = row.get(self.field) if self.field is not None else None
        if value is not None:
            value = self.routes.get(str(value), str(value))
            if value in self.names:
                return value
        return self.default

    def indices(self, rows: list[dict]) -> list[int]:
        return [self.names.index(self.name(r)) for r in rows]

    def check(self, key: str, rows: list[dict]) -> dict[str, int]:
        """Every row of `key` (data.train) goes to a teacher; the rows each teacher gets."""
        unrouted = [r.get(self.field) for r in rows if self.name(r) is None]
        if unrouted:
            seen = sorted({str(v) for v in unrouted})[:3]
            raise ManifestError(f"teacher_routing: {len(unrouted)} row(s) of {key} name no teacher in field "
                                f"{self.field!r} (e.g. {', '.join(map(repr, seen))}; teachers: {', '.join(self.names)}); "
                                "map them in teacher_routing.routes or set teacher_routing.default")
        counts = dict.fromkeys(self.names, 0)
        for r in rows:
            counts[self.name(r)] += 1
        return counts
