"""The protocols say what the engines and teachers really implement: every member each protocol declares
exists on every class that claims it, with parameters that accept the protocol's calls. mypy (make check,
`[tool.mypy]` in pyproject.toml) reads the assignments below and checks the same statically."""
from __future__ import annotations

import inspect
from typing import Protocol

import pytest

from actors.engine import RolloutEngine
from actors.hf_engine import HFEngine
from actors.vllm_engine import VLLMEngine
from opd.weight_sync.gloo import HFModelReceiver
from opd.weight_sync.receiver import WeightReceiver
from opd.vllm_llm import LLMWeightReceiver
from teachers.base import Teacher
from teachers.hf_teacher import HFTeacher
from teachers.vllm_teacher import VLLMTeacher

ENGINES: tuple[type[RolloutEngine], ...] = (HFEngine, VLLMEngine)
TEACHERS: tuple[type[Teacher], ...] = (HFTeacher, VLLMTeacher)
RECEIVERS: tuple[type[WeightReceiver], ...] = (HFModelReceiver, LLMWeightReceiver, HFEngine, VLLMEngine)

CLAIMS = [(RolloutEngine, c) for c in ENGINES] + [(Teacher, c) for c in TEACHERS] + \
         [(WeightReceiver, c) for c in RECEIVERS]


def members(protocol: type) -> dict[str, object]:
    """The methods and attributes a protocol declares, its bases' included."""
    out: dict[str, object] = {}
    for base in reversed(protocol.__mro__):
        if base is not Protocol and getattr(base, "_is_protocol", False):
            out.update({name: None for name in vars(base).get("__annotations__", {})})
            out.update({name: value for name, value in vars(base).items() if callable(value) and name[0] != "_"})
    return out


def annotated(cls: type, name: str) -> bool:
    return any(name in vars(k).get("__annotations__", {}) for k in cls.__mro__)


def accepts(impl, declared) -> bool:
    """Whether `impl` takes every parameter `declared` names (by name, or through *args / **kwargs)."""
    have = inspect.signature(impl).parameters
    var_pos = any(p.kind is p.VAR_POSITIONAL for p in have.values())
    var_kw = any(p.kind is p.VAR_KEYWORD for p in have.values())
    for name, p in inspect.signature(declared).parameters.items():
        if p.kind is p.VAR_POSITIONAL:
            if not var_pos:
                return False
        elif name not in have and not (var_kw or (var_pos and p.kind is p.POSITIONAL_ONLY)):
            return False
    return True


@pytest.mark.parametrize("protocol,cls", CLAIMS, ids=[f"{c.__name__}-{p.__name__}" for p, c in CLAIMS])
def test_every_declared_member_exists_with_the_declared_parameters(protocol, cls):
    for name, declared in members(protocol).items():
        if declared is None:  # an attribute, declared on the class or a base (set by __init__ or a receiver call)
            assert hasattr(cls, name) or annotated(cls, name), f"{cls.__name__} declares no {name}"
            continue
        impl = getattr(cls, name, None)
        assert impl is not None, f"{protocol.__name__} declares {name}, which {cls.__name__} lacks"
        assert accepts(impl, declared), f"{cls.__name__}.{name}{inspect.signature(impl)} does not accept " \
                                        f"{protocol.__name__}.{name}{inspect.signature(declared)}"


def test_members_include_the_bases_and_the_attributes():
    assert {"generate", "sleep", "receive_weights", "weight_version"} <= set(members(RolloutEngine))
    assert set(members(Teacher)) == {"capabilities", "get_capabilities", "score", "score_rollout"}


def test_a_protocol_member_no_class_has_is_caught():
    class Engine(Protocol):
        def update_weights(self, named_tensors, version: int) -> None: ...
    with pytest.raises(AssertionError, match="declares update_weights, which HFEngine lacks"):
        test_every_declared_member_exists_with_the_declared_parameters(Engine, HFEngine)
