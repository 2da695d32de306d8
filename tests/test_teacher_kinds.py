"""Teacher kinds are a registry (teachers/kinds.py): a kind registered by a test, in one file and one
`register` call, passes the manifest check with what it declares, is refused a loss it cannot serve, and
builds in-process from what the launcher resolves for its actors."""
from __future__ import annotations

import pytest
import torch

from launch.cli import main
from launch.cluster import teacher_start
from launch.config import ManifestError
from launch.manifest import load_manifest
from launch.placement import layout
from opd.contracts import ScoreRequest, TeacherScores
from teachers.base import ScoresRollouts, TeacherCapabilities
from teachers.kinds import TEACHER_KINDS, ActorCall, TeacherKind, TeacherStart, capabilities_for, register


class UniformTeacher(ScoresRollouts):
    """A throwaway teacher: every token equally likely over a vocabulary of `vocab`."""
    capabilities = TeacherCapabilities(full_vocab=False, logprobs_at_any_ids=False, max_topk=0)

    def __init__(self, path: str, vocab: int = 64):
        self.path, self.vocab = path, vocab

    def score(self, teacher_prompts, completion_ids, completion_mask, request: ScoreRequest,
              student_topk_ids=None) -> TeacherScores:
        logq = torch.full(completion_ids.shape, -float(torch.log(torch.tensor(float(self.vocab)))))
        return TeacherScores(sampled_logprobs=logq * completion_mask)


def start_uniform(s: TeacherStart) -> ActorCall:
    return ActorCall(UniformTeacher, (s.path,), {"vocab": 64})


@pytest.fixture
def uniform_kind():
    """Registers the kind for one test, then forgets it."""
    kind = register(TeacherKind("uniform", lambda max_logprobs, on_gpu: UniformTeacher.capabilities, start_uniform))
    yield kind
    del TEACHER_KINDS["uniform"]


def test_a_registered_kind_passes_the_manifest_check_and_builds_in_process(uniform_kind, write_manifest, assets):
    path = write_manifest(teacher={"kind": "uniform", "path": str(assets["tiny"])})
    cfg = load_manifest(path)
    assert main(["check", str(path)]) == 0  # `opd check` reads the same registry
    assert capabilities_for("uniform") == UniformTeacher.capabilities
    assert layout(cfg).teacher_groups and len(layout(cfg).teacher) == 1  # one actor, one slot

    teacher = uniform_kind.start(teacher_start(cfg, cfg.teacher, seed=0)).build()
    assert isinstance(teacher, UniformTeacher) and teacher.path == str(assets["tiny"])
    ids, mask = torch.tensor([[3, 4, 5]]), torch.tensor([[True, True, False]])
    scores = teacher.score([[1, 2]], ids, mask, ScoreRequest())
    assert torch.allclose(scores.sampled_logprobs, torch.tensor([[-4.1589, -4.1589, 0.0]]), atol=1e-4)
    assert teacher.get_capabilities() == UniformTeacher.capabilities


def test_a_registered_kind_is_refused_what_it_does_not_declare(uniform_kind, write_manifest, assets):
    with pytest.raises(ManifestError, match="'uniform' teacher"):  # its capabilities: no top-k, no full vocabulary
        load_manifest(write_manifest(teacher={"kind": "uniform", "path": str(assets["tiny"])},
                                     loss={"name": "full_reverse_kl"}))
    with pytest.raises(ManifestError, match=r"teacher.live: only a self-teacher \(teacher.kind: self\)"):
        load_manifest(write_manifest(teacher={"kind": "uniform", "path": str(assets["tiny"]), "live": True}))
    with pytest.raises(ManifestError, match="teacher.path: required for teacher.kind 'uniform'"):
        load_manifest(write_manifest(teacher={"kind": "uniform", "path": None}))


def test_an_unregistered_kind_is_refused_naming_the_registered_ones(write_manifest):
    with pytest.raises(ManifestError, match=r"teacher.kind: 'uniform' is not one of \['hf', 'vllm', 'self', 'none'\]"):
        load_manifest(write_manifest(teacher={"kind": "uniform"}))
    with pytest.raises(ValueError, match="teacher kind 'hf' is registered already"):
        register(TeacherKind("hf", TEACHER_KINDS["hf"].capabilities, TEACHER_KINDS["hf"].start))
