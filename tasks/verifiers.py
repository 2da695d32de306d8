"""Verifiers: completion text + reference answer -> reward in [0, 1]."""
from __future__ import annotations

from typing import Callable

Verifier = Callable[[str, str], float]


def exact_match(completion: str, answer: str) -> float:
    """1.0 when the completion, stripped of surrounding whitespace, equals the answer."""
    return float(completion.strip() == answer.strip())


def first_line_match(completion: str, answer: str) -> float:
    """1.0 when the completion's first line equals the answer (tolerates trailing chatter)."""
    return float(completion.strip().split("\n", 1)[0].strip() == answer.strip())


VERIFIERS: dict[str, Verifier] = {"exact_match": exact_match, "first_line_match": first_line_match}


def get_verifier(name: str) -> Verifier:
    if name not in VERIFIERS:
        raise ValueError(f"eval.verifier: unknown verifier {name!r}; choose one of {sorted(VERIFIERS)}")
    return VERIFIERS[name]
