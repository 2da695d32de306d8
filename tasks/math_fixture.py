"""A small GSM8K / MATH-style fixture the project writes itself (no downloads), for math_equiv tests
and smoke runs: question and answer under configurable field names, as JSONL or Parquet.

Each row also carries `completion`, a model-style answer that math_equiv counts as correct (in a
different but equivalent form), and `wrong`, one it counts as wrong.
"""
from __future__ import annotations

import json
from pathlib import Path

# (question, reference answer, correct completion, wrong completion). References are in the forms
# the datasets use: a GSM8K solution ending in `#### n`, a MATH solution with a final \boxed{}, or a
# bare value.
MATH_ROWS: list[tuple[str, str, str, str]] = [
    ("Natalia sold clips to 48 of her friends in April, and then she sold half as many clips in May. "
     "How many clips did Natalia sell altogether in April and May?",
     "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\nNatalia sold 48+24 = <<48+24=72>>72 clips "
     "altogether in April and May.\n#### 72",
     "In May she sold 24, so 48 + 24 = 72.\n#### 72", "She sold 48 + 48 = 96.\n#### 96"),
    ("A shop sells 1,234 pens a week for 2 weeks and then 617 fewer in total. How many pens were sold?",
     "1,234 * 2 = 2,468 and 2,468 - 617 = 1,851\n#### 1,851",
     "2468 - 617 = 1851\n#### 1851", "#### 2,468"),
    ("The temperature was 5 degrees and fell by 12 degrees. What is the temperature now?",
     "5 - 12 = -7\n#### -7", "The temperature is $\\boxed{-7}$.", "#### 7"),
    ("What is $\\frac{1}{4} + \\frac{1}{4}$?", "$\\frac{1}{4}+\\frac{1}{4} = \\boxed{\\frac{1}{2}}$.",
     "The sum is $\\boxed{0.5}$.", "The sum is $\\boxed{\\frac{1}{8}}$."),
    ("Simplify $\\sqrt{18}$.", "$\\sqrt{18} = \\sqrt{9 \\cdot 2} = \\boxed{3\\sqrt{2}}$.",
     "We get $\\boxed{\\sqrt{18}}$, i.e. $\\boxed{3 \\sqrt 2}$.", "$\\boxed{9\\sqrt{2}}$"),
    ("Solve $2x - 3 = 7$.", "x = 5", "Adding 3 gives $2x = 10$, so $\\boxed{x = 5}$.",
     "So $\\boxed{x = -5}$."),
    ("A square has perimeter 40 cm. How long is one side?", "10\\text{ cm}",
     "Each side is $40/4 = \\boxed{10}$ centimetres.", "$\\boxed{40\\text{ cm}}$"),
    ("Write $0.75$ as a fraction in lowest terms.", "\\dfrac{3}{4}", "$\\boxed{\\frac{3}{4}}$",
     "$\\boxed{\\frac{7}{5}}$"),
    ("Solve $x^2 = 4$; give the solution set.", "\\{-2, 2\\}", "$\\boxed{\\{2, -2\\}}$",
     "$\\boxed{\\{2\\}}$"),
    ("For which $x$ is $1 \\le x < 3$? Give an interval.", "$\\boxed{[1,3)}$",
     "The answer is $\\boxed{[1, 3)}$.", "The answer is $\\boxed{[1, 3]}$."),
]


def write_math_fixture(path, fmt: str = "jsonl", question_field: str = "problem",
                       answer_field: str = "solution") -> Path:
    """Write MATH_ROWS to `path` as JSONL or Parquet, with the question under `question_field` and the
    reference under `answer_field` (plus `completion` and `wrong`, see the module docstring)."""
    if fmt not in ("jsonl", "parquet"):
        raise ValueError(f"fmt: {fmt!r} is not one of ['jsonl', 'parquet']")
    if len({question_field, answer_field, "completion", "wrong"}) != 4:
        raise ValueError(f"field names must differ from each other and from 'completion' / 'wrong': "
                         f"{question_field!r}, {answer_field!r}")
    rows = [{question_field: q, answer_field: a, "completion": c, "wrong": w} for q, a, c, w in MATH_ROWS]
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    else:
        import pyarrow as pa
        import pyarrow.parquet as pq
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path
