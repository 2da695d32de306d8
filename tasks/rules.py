"""A toy task for on-policy self-distillation (OPSD): a tiny model that follows a directive when the
directive is written in its prompt, and copies its input when it is not.

    "3817="            -> "3817"      no directive: copy (the default behaviour)
    "rev:3817="        -> "7183"      rule: reverse
    "inc:3817="        -> "4928"      rule: add one to every digit, mod 10
    "bang:3817="       -> "3817!"     preference: end with "!"
    "ans 5521:3817="   -> "5521"      an answer given in the prompt: write it
    "sol inc 4928:3817=" -> "4928"    a worked solution (the rule used, then the answer): write its answer

`write_base` writes the SFT mixture that teaches all of these (one base model). `write_arms` writes one
dataset per OPSD arm of `opd experiment opsd`. In every arm the student's prompt is the bare "3817=";
the teacher (the same network) sees privileged information (PI) through teacher.prompt_template:

  shared-rule       PI "rev:" for every row             target: reverse, for every input
  shared-preference PI "bang:" for every row            target: the input followed by "!"
  instance-answer   PI "ans {answer}:" per row          target: each row's own hidden rule (rev or inc,
  instance-solution PI "sol {solution}:" per row          drawn per row), which the bare prompt cannot reveal

The instance arms are the paper's instance-specific PI in miniature: what the teacher knows differs from
row to row and cannot be inferred from the student's prompt, so a PI-free student can only match the
aggregate of the row teachers (docs/design.md §5). `instance-answer-inferable` gives the answer as PI too,
but every row's answer follows one rule, so the aggregate *is* that rule.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

DIGITS = 4


def rev(x: str) -> str:
    return x[::-1]


def inc(x: str) -> str:
    return "".join(str((int(c) + 1) % 10) for c in x)


RULES = {"rev": rev, "inc": inc}


def _digits(rng: random.Random) -> str:
    return "".join(rng.choice("0123456789") for _ in range(DIGITS))


def base_example(rng: random.Random, x: str) -> dict:
    """One SFT row of a uniformly drawn format (prompt already carries the directive)."""
    kind = rng.choice(["copy", "rev", "inc", "bang", "ans", "sol"])
    if kind == "copy":
        return {"prompt": f"{x}=", "answer": x}
    if kind in RULES:
        return {"prompt": f"{kind}:{x}=", "answer": RULES[kind](x)}
    if kind == "bang":
        return {"prompt": f"bang:{x}=", "answer": x + "!"}
    if kind == "ans":  # an unrelated answer: the model must learn to write what it is given
        y = _digits(rng)
        return {"prompt": f"ans {y}:{x}=", "answer": y}
    r = rng.choice(sorted(RULES))
    return {"prompt": f"sol {r} {RULES[r](x)}:{x}=", "answer": RULES[r](x)}


def arm_example(arm: str, rng: random.Random, x: str) -> dict:
    """A row of one OPSD arm: the bare student prompt, the PI fields, and the target as `answer`."""
    row = {"prompt": f"{x}="}
    if arm == "shared-rule":
        return {**row, "answer": rev(x)}
    if arm == "shared-preference":
        return {**row, "answer": x + "!"}
    if arm == "instance-answer-inferable":
        return {**row, "answer": rev(x)}
    r = rng.choice(sorted(RULES))  # the row's own hidden rule
    return {**row, "answer": RULES[r](x), "solution": f"{r} {RULES[r](x)}"}


ARMS = ("shared-rule", "shared-preference", "instance-answer", "instance-solution", "instance-answer-inferable")


def _split_inputs(seed: int, n_eval: int) -> tuple[list[str], list[str]]:
    """Every DIGITS-digit input, shuffled; the first n_eval are held out from all training."""
    xs = [f"{i:0{DIGITS}d}" for i in range(10 ** DIGITS)]
    random.Random(seed).shuffle(xs)
    return xs[n_eval:], xs[:n_eval]


def _write(path: Path, rows) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def write_base(out_dir: str | Path, n_train: int = 20000, n_eval: int = 256, seed: int = 0) -> dict[str, Path]:
    """The SFT mixture (train) and a held-out eval set of the same mixture."""
    train_x, eval_x = _split_inputs(seed, n_eval)
    rng = random.Random(seed + 1)
    out = Path(out_dir)
    return {"train": _write(out / "base_train.jsonl", (base_example(rng, rng.choice(train_x)) for _ in range(n_train))),
            "eval": _write(out / "base_eval.jsonl", (base_example(rng, x) for x in eval_x))}


def write_arms(out_dir: str | Path, n_eval: int = 256, seed: int = 0) -> dict[str, Path]:
    """<arm>_train.jsonl and <arm>_eval.jsonl per arm; eval inputs are never trained on."""
    train_x, eval_x = _split_inputs(seed, n_eval)
    out, paths = Path(out_dir), {}
    for i, arm in enumerate(ARMS):
        rng = random.Random(seed + 10 + i)
        paths[f"{arm}_train"] = _write(out / f"{arm}_train.jsonl", (arm_example(arm, rng, x) for x in train_x))
        paths[f"{arm}_eval"] = _write(out / f"{arm}_eval.jsonl", (arm_example(arm, rng, x) for x in eval_x))
    return paths


def write_task(out_dir: str | Path, seed: int = 0) -> dict[str, Path]:
    return {**write_base(out_dir, seed=seed), **write_arms(out_dir, seed=seed)}


def prepare(root: str | Path) -> None:
    """`opd experiment opsd`'s prepare step: the datasets under root/data, tiny models under root/models."""
    from tasks.tiny import write_tiny_models
    write_task(Path(root) / "data")
    write_tiny_models(Path(root) / "models")
