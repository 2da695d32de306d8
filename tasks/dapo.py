"""Convert DAPO-Math-17k (training) or a MATH-500-style set (evaluation) to the project's JSONL
rows {"prompt": problem, "answer": reference}, one per unique problem.

    python -m tasks.dapo --src dapo-math-17k.parquet --out /shared/data/dapo_math_17k.jsonl
    python -m tasks.dapo --src math500_test.jsonl --out /shared/data/math500.jsonl   # --format math500

Formats (--format auto tells them apart by their columns):
* dapo: BytedTsinghua-SIA/DAPO-Math-17k's data/dapo-math-17k.parquet. Columns: data_source
  ("math_dapo"), prompt (list of {role, content}: one user message), ability ("MATH"),
  reward_model ({ground_truth, style: "rule-lighteval/MATH_v2"}), extra_info ({index: a uuid}).
  The user message wraps the problem in an instruction to end with "Answer: $Answer"; the wrapper
  is removed, so the manifest's prompt template asks for \\boxed{} instead. The public parquet
  repeats each of its ~17k problems about 100 times (1.79M rows) under different uuids, so rows
  are deduplicated by problem text, not by extra_info.index.
* math500: any .parquet / .jsonl with `problem` and `answer` (or, lacking an answer, `solution`) columns:
  HuggingFaceH4/MATH-500's test.jsonl, math-ai/aime25, math-ai/aime24.

A malformed row is skipped and counted by reason, never fatal; a summary is printed at the end.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

_DAPO_PREFIX = re.compile(r"^\s*Solve the following math problem step by step\..*?\n\n", re.DOTALL)
_DAPO_SUFFIX = re.compile(r"\n\nRemember to put your answer on its own line after \"Answer:\"\.?\s*$")


class Skip(Exception):
    """A row that cannot be converted; the message is the reason counted in the summary."""


@dataclass
class Summary:
    read: int = 0
    written: int = 0
    skipped: Counter = field(default_factory=Counter)

    def __str__(self) -> str:
        lines = [f"rows read {self.read}, written {self.written}, skipped {sum(self.skipped.values())}"]
        lines += [f"  skipped ({reason}): {n}" for reason, n in self.skipped.most_common()]
        return "\n".join(lines)


def _text(value, what: str) -> str:
    """A non-empty string (numbers, e.g. AIME answers stored as ints, become strings)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str) or not value.strip():
        raise Skip(f"no {what}")
    return value.strip()


def dapo_row(row: dict) -> tuple[str, str]:
    """(problem, answer) from one DAPO-Math-17k row."""
    messages = row.get("prompt")
    if not isinstance(messages, list):
        raise Skip("prompt is not a message list")
    user = [m.get("content") for m in messages if isinstance(m, dict) and m.get("role") == "user"]
    if not user:
        raise Skip("no user message")
    content = _text(user[0], "problem")
    problem = _DAPO_SUFFIX.sub("", _DAPO_PREFIX.sub("", content, count=1))
    reward = row.get("reward_model")
    return _text(problem, "problem"), _text(reward.get("ground_truth") if isinstance(reward, dict) else None, "answer")


def math500_row(row: dict) -> tuple[str, str]:
    """(problem, answer) from one row with `problem` and `answer` columns, or `solution` where there is no
    answer (math-ai/aime24), as the paper's preprocess_dataset.py reads them; a boxed solution is graded
    by its box."""
    answer = row.get("answer")
    return _text(row.get("problem"), "problem"), _text(row.get("solution") if answer in (None, "") else answer, "answer")


def read_rows(src: Path) -> Iterator[object]:
    """Rows of a .parquet (in batches: the DAPO file has 1.79M rows) or .jsonl file; a JSONL line
    that is not JSON is yielded as None (and skipped as malformed)."""
    if src.suffix == ".parquet":
        import pyarrow.parquet as pq
        for batch in pq.ParquetFile(src).iter_batches(batch_size=8192):
            yield from batch.to_pylist()
    elif src.suffix in (".jsonl", ".json"):
        with src.open() as f:
            for line in f:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except json.JSONDecodeError:
                        yield None
    else:
        raise ValueError(f"--src {str(src)!r}: expected a .parquet or .jsonl file")


def detect_format(src: Path) -> str:
    """'dapo' when the first row has a reward_model column, 'math500' when it has problem/answer."""
    for row in read_rows(src):
        if isinstance(row, dict):
            if "reward_model" in row:
                return "dapo"
            if "problem" in row and ("answer" in row or "solution" in row):
                return "math500"
            raise ValueError(f"--src {str(src)!r}: columns {sorted(row)} match neither format; pass --format")
    raise ValueError(f"--src {str(src)!r}: no rows")


def convert(src: str | Path, out: str | Path, fmt: str = "auto") -> Summary:
    """Write one JSONL row per unique problem (first occurrence kept); returns the counts."""
    src, out = Path(src), Path(out)
    fmt = detect_format(src) if fmt == "auto" else fmt
    parse = {"dapo": dapo_row, "math500": math500_row}[fmt]
    summary, seen = Summary(), {}
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for row in read_rows(src):
            summary.read += 1
            try:
                if not isinstance(row, dict):
                    raise Skip("not a JSON object")
                problem, answer = parse(row)
                key = " ".join(problem.split())
                if key in seen:
                    raise Skip("duplicate problem" if seen[key] == answer else
                               "duplicate problem, different answer (first kept)")
            except Skip as e:
                summary.skipped[str(e)] += 1
                continue
            seen[key] = answer
            f.write(json.dumps({"prompt": problem, "answer": answer}, ensure_ascii=False) + "\n")
            summary.written += 1
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.dapo", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help=".parquet or .jsonl to read")
    p.add_argument("--out", required=True, help="JSONL to write ({prompt, answer} per line)")
    p.add_argument("--format", default="auto", choices=("auto", "dapo", "math500"))
    args = p.parse_args(argv)
    if not Path(args.src).is_file():
        print(f"--src {args.src!r}: no such file", file=sys.stderr)
        return 2
    summary = convert(args.src, args.out, args.format)
    print(f"{args.src} -> {args.out}\n{summary}")
    return 0 if summary.written else 1


if __name__ == "__main__":
    raise SystemExit(main())
