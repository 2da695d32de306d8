"""A chat-format math task: one-step word problems with small numbers and `\\boxed{}` answers.

  {"messages": [{"role": "user", "content": "Ann has 3 apples and buys 4 more. How many apples does she have now?"}],
   "answer": "7", "solution": "3 + 4 = 7. The answer is \\\\boxed{7}.", "hint": "3 + 4 = 7."}

Rows hold `messages` (the convention of chat datasets), the reference `answer` for the verifier
(`boxed_match`), the assistant's reference text in `solution` (what SFT trains on) and a `hint` (the worked
sum: privileged information for self-distillation). The solution states the sum before the box, so the
model writes the operands it has just read and then their result.

Answers are 0..MAX_ANSWER (20): small enough that the tiny Qwen3 student learns the task in a few minutes
of SFT on two cores (answers up to 99 need forward-written two-digit carries, which it learns far more
slowly). Eval problems are held out by their question text: the same sum may
appear in train in other words, so eval measures reading the problem (which numbers, which operation)
as much as the arithmetic. `max_answer` raises the ceiling for harder variants.
"""
from __future__ import annotations

import json
import random
from pathlib import Path

NAMES = [("Ann", "she"), ("Ben", "he"), ("Cara", "she"), ("Dan", "he"), ("Eva", "she"), ("Finn", "he"),
         ("Gita", "she"), ("Hugo", "he"), ("Ines", "she"), ("Jack", "he"), ("Lena", "she"), ("Omar", "he")]
THINGS = ["apples", "pears", "books", "marbles", "stickers", "coins", "cards", "shells", "pencils", "eggs"]

# (operation, question). a and b are the operands in the order the solution writes them.
TEMPLATES = [
    ("+", "{name} has {a} {things} and buys {b} more. How many {things} does {pron} have now?"),
    ("+", "{name} picks {a} {things} in the morning and {b} {things} in the afternoon. "
          "How many {things} does {pron} pick in all?"),
    ("+", "A box holds {a} {things}. {name} puts {b} more {things} in the box. How many {things} are in the box?"),
    ("-", "{name} has {a} {things} and gives {b} of them to a friend. How many {things} does {pron} have left?"),
    ("-", "There are {a} {things} on a table. {name} takes {b} of them. How many {things} are still on the table?"),
]
MAX_ANSWER = 20


def solution_text(op: str, a: int, b: int) -> tuple[str, str]:
    """(answer, solution) for `a op b`: the text an assistant writes, ending in the boxed answer."""
    answer = str(a + b if op == "+" else a - b)
    return answer, f"{a} {op} {b} = {answer}. The answer is \\boxed{{{answer}}}."


def make_example(rng: random.Random, max_answer: int = MAX_ANSWER) -> dict:
    op, question = rng.choice(TEMPLATES)
    if op == "+":
        total = rng.randint(0, max_answer)
        a = rng.randint(0, total)
        b = total - a
    else:
        a = rng.randint(1, max_answer)
        b = rng.randint(1, a)
    name, pron = rng.choice(NAMES)
    content = question.format(name=name, pron=pron, things=rng.choice(THINGS), a=a, b=b)
    answer, solution = solution_text(op, a, b)
    return {"messages": [{"role": "user", "content": content}], "answer": answer, "solution": solution,
            "hint": f"{a} {op} {b} = {answer}."}


def write_split(path: Path, n: int, seed: int, max_answer: int, exclude: frozenset = frozenset()) -> set[str]:
    """Write n rows with distinct questions not in `exclude`; returns the questions written."""
    rng, seen, rows = random.Random(seed), set(), []
    for _ in range(100 * n):
        if len(rows) == n:
            break
        ex = make_example(rng, max_answer)
        question = ex["messages"][0]["content"]
        if question not in exclude and question not in seen:
            seen.add(question)
            rows.append(ex)
    if len(rows) < n:
        raise ValueError(f"cannot draw {n} distinct problems with answers up to {max_answer}")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return seen


def write_task(out_dir: str | Path, n_train: int = 8000, n_eval: int = 256, seed: int = 0,
               max_answer: int = MAX_ANSWER) -> dict[str, Path]:
    """train.jsonl and eval.jsonl under out_dir; no eval question appears in train."""
    out_dir = Path(out_dir)
    held_out = write_split(out_dir / "eval.jsonl", n_eval, seed + 1, max_answer)
    write_split(out_dir / "train.jsonl", n_train, seed, max_answer, exclude=frozenset(held_out))
    return {"train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl"}


def corpus(rng: random.Random, n: int) -> list[str]:
    """Problems and solutions as plain text (no chat markup), for training the tokenizer."""
    out = []
    for _ in range(n):
        ex = make_example(rng)
        out += [ex["messages"][0]["content"], ex["solution"]]
    return out


def prepare(root: str | Path, seed: int = 0, max_answer: int = MAX_ANSWER, n_train: int = 8000,
            n_eval: int = 256) -> None:
    """`opd experiment chat-math`'s prepare step: the tiny Qwen3 student and teacher at the small
    vocabulary (root/models/{student,teacher}; not the 151,936-row pair, which no learning run reads) and
    the task (root/data/{train,eval}.jsonl), both from `seed` (the experiment's run.seed), so another
    seed is another run from scratch: init, tokenizer, split."""
    from tasks.tiny_qwen3 import SIZES, build_tokenizer, small_rows, write_model
    root = Path(root)
    tok = build_tokenizer(seed)
    for i, (name, size) in enumerate(SIZES.items()):
        write_model(root / "models" / name, tok, size, small_rows(tok), seed + i)
    write_task(root / "data", n_train=n_train, n_eval=n_eval, seed=seed, max_answer=max_answer)
