"""A synthetic verifiable task: fixed-width addition, answer written least-significant digit first.

  prompt "047+315="  ->  answer "2630"   (047 + 315 = 0362, reversed)

Writing the sum backwards lets a tiny transformer compute each digit from the carry it has just
written, so a 0.7M-parameter model (4 layers, width 128) masters it in about 600 CPU steps; that
makes a competent teacher cheap to build and leaves a clear gap for a briefly-trained student.
"""
from __future__ import annotations

import json
import random
from pathlib import Path


def make_example(rng: random.Random, digits: int) -> dict:
    a, b = rng.randrange(10 ** digits), rng.randrange(10 ** digits)
    return {"prompt": f"{a:0{digits}d}+{b:0{digits}d}=",
            "answer": f"{a + b:0{digits + 1}d}"[::-1],
            # Privileged information for self-distillation experiments: the worked answer.
            "hint": f"the answer is {f'{a + b:0{digits + 1}d}'[::-1]}. "}


def write_split(path: str | Path, n: int, digits: int, seed: int, exclude: set[str] = frozenset()) -> set[str]:
    """Write n unique examples as JSONL; returns the prompts written (to keep splits disjoint)."""
    possible = 10 ** (2 * digits) - len(exclude)
    if n > possible:
        raise ValueError(f"{n} unique {digits}-digit examples requested but only {possible} exist")
    rng, seen = random.Random(seed), set()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w") as f:
        while len(seen) < n:
            ex = make_example(rng, digits)
            if ex["prompt"] in seen or ex["prompt"] in exclude:
                continue
            seen.add(ex["prompt"])
            f.write(json.dumps(ex) + "\n")
    return seen


def write_task(out_dir: str | Path, digits: int = 2, n_train: int = 20000, n_eval: int = 256,
               seed: int = 0) -> dict[str, Path]:
    """Held-out eval prompts never appear in train; train takes n_train or every remaining prompt."""
    out_dir = Path(out_dir)
    held_out = write_split(out_dir / "eval.jsonl", n_eval, digits, seed + 1)
    n_train = min(n_train, 10 ** (2 * digits) - n_eval)
    write_split(out_dir / "train.jsonl", n_train, digits, seed, exclude=held_out)
    return {"train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl"}


VERBOSE_PREFIX = "sum is "


def write_verbose(src: str | Path, dst: str | Path, prefix: str = VERBOSE_PREFIX) -> Path:
    """A copy of a split whose answers carry extra text (`580` -> `sum is 580`): the same task written
    in a form the demo's student never writes, for a teacher that is strong but mismatched."""
    rows = [json.loads(line) for line in Path(src).read_text().splitlines()]
    Path(dst).write_text("".join(json.dumps({**r, "answer": prefix + r["answer"]}) + "\n" for r in rows))
    return Path(dst)


def prepare(root: str | Path) -> None:
    """The demo's models and task under root/models and root/data (experiments built on the demo)."""
    from tasks.tiny import write_tiny_models
    write_task(Path(root) / "data")
    write_tiny_models(Path(root) / "models")


def prepare_teacher_choice(root: str | Path) -> None:
    """`opd experiment teacher-choice`'s prepare step: the demo's models and task, and its verbose copy."""
    prepare(root)
    data = Path(root) / "data"
    write_verbose(data / "train.jsonl", data / "train_verbose.jsonl")
    write_verbose(data / "eval.jsonl", data / "eval_verbose.jsonl")
