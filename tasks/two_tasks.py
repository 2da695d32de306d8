"""Two tasks in one dataset, for `opd experiment multi-teacher`: the demo's reversed addition and digit
reversal, each row tagged with its task (the field teacher_routing reads).

  addition   "47+38="  ->  "580"    (tasks/arithmetic.py: the sum, least-significant digit first)
  reversal   "4721="   ->  "1274"   (the digits written backwards)

A model trained on one task writes something of the other's shape on the other's prompts (a sum for
"4721=", which has no '+'), so a teacher specialised in one task is a wrong teacher for the other's rows.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

from tasks.arithmetic import write_task

REVERSAL_DIGITS = 4


def reversal_example(rng: random.Random, digits: int = REVERSAL_DIGITS) -> dict:
    s = f"{rng.randrange(10 ** digits):0{digits}d}"
    return {"prompt": f"{s}=", "answer": s[::-1], "task": "reversal"}


def write_reversal(out_dir: Path, n_train: int, n_eval: int, seed: int) -> dict[str, Path]:
    """Disjoint train / eval splits of unique prompts."""
    rng, seen = random.Random(seed), set()
    rows = []
    while len(rows) < n_train + n_eval:
        ex = reversal_example(rng)
        if ex["prompt"] not in seen:
            seen.add(ex["prompt"])
            rows.append(ex)
    return {"train": _write(out_dir / "train_reversal.jsonl", rows[n_eval:]),
            "eval": _write(out_dir / "eval_reversal.jsonl", rows[:n_eval])}


def _write(path: Path, rows: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def write_two_tasks(out_dir: str | Path, n_train: int = 8000, n_eval: int = 256, seed: int = 0) -> dict[str, Path]:
    """train_addition / eval_addition, train_reversal / eval_reversal, and train_mix (both trains,
    shuffled together; every row has `task`)."""
    out = Path(out_dir)
    add = write_task(out / "addition", digits=2, n_train=n_train, n_eval=n_eval, seed=seed)
    paths = {"train_addition": _write(out / "train_addition.jsonl",
                                      [{**r, "task": "addition"} for r in _read(add["train"])]),
             "eval_addition": _write(out / "eval_addition.jsonl",
                                     [{**r, "task": "addition"} for r in _read(add["eval"])])}
    rev = write_reversal(out, n_train, n_eval, seed + 7)
    paths.update(train_reversal=rev["train"], eval_reversal=rev["eval"])
    mix = _read(paths["train_addition"]) + _read(paths["train_reversal"])
    random.Random(seed).shuffle(mix)
    paths["train_mix"] = _write(out / "train_mix.jsonl", mix)
    return paths


def prepare(root: str | Path) -> None:
    """`opd experiment multi-teacher`'s prepare step: the demo's tiny models and the two tasks."""
    from tasks.tiny import write_tiny_models
    write_two_tasks(Path(root) / "data")
    write_tiny_models(Path(root) / "models")
