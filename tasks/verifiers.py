"""Verifiers: completion text + reference answer -> reward in [0, 1]."""
from __future__ import annotations

import re
from fractions import Fraction
from typing import Callable, Optional

Verifier = Callable[[str, str], float]


def exact_match(completion: str, answer: str) -> float:
    """1.0 when the completion, stripped of surrounding whitespace, equals the answer."""
    return float(completion.strip() == answer.strip())


def first_line_match(completion: str, answer: str) -> float:
    """1.0 when the completion's first line equals the answer (tolerates trailing chatter)."""
    return float(completion.strip().split("\n", 1)[0].strip() == answer.strip())


def last_boxed(text: str) -> Optional[str]:
    """The content of the last `\\boxed{...}` in text, braces balanced (`\\boxed{\\frac{1}{2}}` gives
    `\\frac{1}{2}`); None when there is none or the last one is never closed (a truncated answer).
    Escaped braces `\\{ \\}` are content, not grouping."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    i = start + len("\\boxed{")
    depth, j = 1, i
    while j < len(text):
        c = text[j]
        if c == "\\":
            j += 2  # skip the escaped character
            continue
        depth += {"{": 1, "}": -1}.get(c, 0)
        if depth == 0:
            return text[i:j]
        j += 1
    return None


_DECIMAL = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)")
_THOUSANDS = re.compile(r"[+-]?\d{1,3}(,\d{3})+(\.\d+)?")
_RATIO = re.compile(r"[+-]?\d+/\d+")
_FRAC = re.compile(r"([+-]?)\\frac\{([+-]?\d+)\}\{([+-]?\d+)\}")


def normalise_answer(s: str) -> str:
    """Light normalisation: drop whitespace and `$`, one trailing period, and spell `\\dfrac` /
    `\\tfrac` as `\\frac`. Nothing else (no units, no `x =`, no LaTeX simplification)."""
    s = re.sub(r"\s+", "", s).replace("$", "")
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    return s[:-1] if s.endswith(".") else s


def as_number(s: str) -> Optional[Fraction]:
    """An exact rational for a normalised answer that is a number: 12, -3, 0.5, 1,000, 1/2,
    \\frac{1}{2}; else None. No exponents (a huge `1e999999` is not worth parsing)."""
    try:
        if _DECIMAL.fullmatch(s) or _RATIO.fullmatch(s):
            return Fraction(s)
        if _THOUSANDS.fullmatch(s):
            return Fraction(s.replace(",", ""))
        m = _FRAC.fullmatch(s)
        if m:
            value = Fraction(int(m.group(2)), int(m.group(3)))
            return -value if m.group(1) == "-" else value
    except ZeroDivisionError:
        pass
    return None


def boxed_match(completion: str, answer: str) -> float:
    """1.0 when the last \\boxed{...} in the completion equals the reference answer after
    normalise_answer, or when both are numbers of equal value (exact: 0.5 == 1/2 == \\frac{1}{2},
    12 == 12.0, but 0.333 != 1/3). No box, or an empty one: 0.0."""
    boxed = last_boxed(completion)
    if boxed is None:
        return 0.0
    got, want = normalise_answer(boxed), normalise_answer(answer)
    if not got:
        return 0.0
    if got == want:
        return 1.0
    a, b = as_number(got), as_number(want)
    return float(a is not None and b is not None and a == b)


VERIFIERS: dict[str, Verifier] = {"exact_match": exact_match, "first_line_match": first_line_match,
                                  "boxed_match": boxed_match}


def get_verifier(name: str) -> Verifier:
    if name not in VERIFIERS:
        raise ValueError(f"eval.verifier: unknown verifier {name!r}; choose one of {sorted(VERIFIERS)}")
    return VERIFIERS[name]
