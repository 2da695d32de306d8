"""A chat-format math task: one-step word problems with small numbers and `\\boxed{}` answers.

  {"messages": [{"role": "user", "content": "Ann has 3 apples and buys 4 more. How many apples does she have now?"}],
   "answer": "7", "solution": "3 + 4 = 7. The answer is \\\\boxed{7}.", "hint": "3 + 4 = 7."}

Rows hold `messages` (the convention of chat datasets), the reference `answer` for the verifier
(`boxed_match`), the assistant's reference text in `solution` (what SFT trains on) and a `hint` (the worked
sum: privileged information for self-distillation). The solution states the sum before the box, so the
model writes the operands it has just read and then their result.

Answers are 0..MAX_ANSWER (20): small enough that the tiny Qwen3 student learns the task in a few minutes
of SFT on two cores (answers up to 99 need forward-written two-digit carries, which it learns far more
slowly). `max_answer` raises the ceiling for harder variants. Eval problems are held out by (operation,
a, b): no eval sum appears in train in any wording, so a model scores on eval only by doing the
arithmetic, not by recall.

`style="column"` (the chat-math learning check's task) asks for the sum of two two-digit numbers and
works it column by column, the carry always written:

  "Ones: 7 + 5 = 12. Tens: 4 + 3 + 1 = 8. The answer is \\boxed{82}."

Every step is a one-digit fact (with or without a carry) that train holds whichever sums are held out,
so a model that learns the procedure gets unseen sums right: the SFT'd tiny teacher scores ~98% on
held-out sums where the one-line `fact` style (answers up to 20, the default) reaches ~50%, since there
each held-out sum is a fact never seen.

`opd_sums` adds a third split, opd_prompts.jsonl: problems over `opd_sums` further sums that are in
neither train nor eval, with `messages` and `answer` only (no solution: OPD needs prompts; the answer
only grades rollouts for the logs). A student SFT'd on train has learnt many train sums by rote and
answers them far better than unseen ones; distilling on sums it has never seen puts the teacher's
signal where the student is weak, as on eval.
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


STYLES = ("fact", "column")


def solution_text(op: str, a: int, b: int, style: str = "fact") -> tuple[str, str]:
    """(answer, solution) for `a op b`: the text an assistant writes, ending in the boxed answer.
    fact: the sum in one line. column: two-digit addition worked column by column, the carry always
    written, so every step is a one-digit fact that train holds whichever sums are held out."""
    answer = str(a + b if op == "+" else a - b)
    if style == "column":
        ones = a % 10 + b % 10
        tens = a // 10 + b // 10 + ones // 10
        return answer, (f"Ones: {a % 10} + {b % 10} = {ones}. Tens: {a // 10} + {b // 10} + {ones // 10} = {tens}. "
                        f"The answer is \\boxed{{{answer}}}.")
    return answer, f"{a} {op} {b} = {answer}. The answer is \\boxed{{{answer}}}."


def make_example(rng: random.Random, max_answer: int = MAX_ANSWER, style: str = "fact") -> dict:
    """fact: addition or subtraction with answers 0..max_answer. column: addition of two two-digit
    numbers (10..99; max_answer unused), solved column by column."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    op, question = rng.choice([t for t in TEMPLATES if style == "fact" or t[0] == "+"])
    if style == "column":
        a, b = rng.randint(10, 99), rng.randint(10, 99)
    elif op == "+":
        total = rng.randint(0, max_answer)
        a = rng.randint(0, total)
        b = total - a
    else:
        a = rng.randint(1, max_answer)
        b = rng.randint(1, a)
    name, pron = rng.choice(NAMES)
    content = question.format(name=name, pron=pron, things=rng.choice(THINGS), a=a, b=b)
    answer, solution = solution_text(op, a, b, style)
    return {"messages": [{"role": "user", "content": content}], "answer": answer, "solution": solution,
            "hint": f"{a} {op} {b} = {answer}.", "_key": (op, a, b)}


def write_split(path: Path, n: int, seed: int, max_answer: int, exclude: frozenset = frozenset(),
                unique: bool = False, only: frozenset | None = None,
                fields: tuple[str, ...] = ("messages", "answer", "solution", "hint"), style: str = "fact") -> set:
    """Write n rows (only `fields`) whose sum (op, a, b) is not in `exclude` (and, given `only`, is in
    it); returns the sums written. unique: no two rows share a sum (eval); otherwise rows may repeat a
    sum in other words (train)."""
    rng, keys, rows = random.Random(seed), set(), []
    attempts = 0
    while len(rows) < n:
        attempts += 1
        if attempts > 1000 * n:
            raise ValueError(f"cannot draw {n} rows with answers up to {max_answer} outside the held-out sums")
        ex = make_example(rng, max_answer, style)
        key = ex.pop("_key")
        if key in exclude or (only is not None and key not in only) or (unique and key in keys):
            continue
        keys.add(key)
        rows.append({k: ex[k] for k in fields})
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return keys


def draw_sums(n: int, seed: int, max_answer: int, exclude: frozenset, style: str = "fact") -> frozenset:
    """n distinct sums (op, a, b) outside `exclude`, drawn as make_example draws them."""
    rng, keys = random.Random(seed), set()
    for _ in range(1000 * n):
        if len(keys) == n:
            return frozenset(keys)
        key = make_example(rng, max_answer, style)["_key"]
        if key not in exclude:
            keys.add(key)
    raise ValueError(f"cannot draw {n} sums with answers up to {max_answer} outside {len(exclude)} held out")


def write_task(out_dir: str | Path, n_train: int = 8000, n_eval: int = 256, seed: int = 0,
               max_answer: int = MAX_ANSWER, opd_sums: int = 0, n_opd: int = 4000, style: str = "fact") -> dict[str, Path]:
    """train.jsonl and eval.jsonl under out_dir, and with opd_sums > 0 opd_prompts.jsonl (n_opd prompts
    over opd_sums sums, answers but no solutions); no sum appears in two of them."""
    out_dir = Path(out_dir)
    held_out = write_split(out_dir / "eval.jsonl", n_eval, seed + 1, max_answer, unique=True, style=style)
    paths = {"train": out_dir / "train.jsonl", "eval": out_dir / "eval.jsonl"}
    if opd_sums:
        opd = draw_sums(opd_sums, seed + 2, max_answer, frozenset(held_out), style)
        write_split(out_dir / "opd_prompts.jsonl", n_opd, seed + 2, max_answer, only=opd,
                    fields=("messages", "answer"), style=style)
        paths["opd"] = out_dir / "opd_prompts.jsonl"
        held_out |= opd
    write_split(out_dir / "train.jsonl", n_train, seed, max_answer, exclude=frozenset(held_out), style=style)
    return paths


def corpus(rng: random.Random, n: int) -> list[str]:
    """Problems and solutions as plain text (no chat markup), for training the tokenizer."""
    out = []
    for _ in range(n):
        ex = make_example(rng)
        out += [ex["messages"][0]["content"], ex["solution"]]
    return out
