"""Convert WildGuardMix (allenai/wildguardmix) to the OPSD safety arm's JSONL rows, as the paper's
preprocess_pi_safety.py does:

    python -m tasks.wildguard --src wildguardtrain.parquet --out /shared/data/wildguardmix_train.jsonl
    python -m tasks.wildguard --src wildguardtest.parquet  --out /shared/data/wildguardtest.jsonl

The dataset is gated on the Hugging Face hub: accept its terms there, download the file (the config
`wildguardtrain` for training, `wildguardtest` for evaluation), and pass it as --src (.parquet or .jsonl).
The file must have the columns `prompt` and `prompt_harm_label` (checked on its first row; a row
without a label value is unsafe, as below); the other columns (response, response_harm_label,
subcategory, adversarial) are not read, except `adversarial` and `subcategory`, copied for reporting.

Rules (preprocess_pi_safety.py:120-142, 194-268 at 33234e5):
* the prompt is stripped; a row with no prompt is skipped (and counted);
* label "unsafe" when prompt_harm_label is "harmful" (any case, stripped) or missing, "safe" otherwise;
* benign rows are capped at --max-benign-ratio (2.0) times the harmful rows: with random.seed(42),
  random.sample(benign, cap) (only when over the cap), then random.shuffle(harmful + benign) with the
  same generator, so the output is the script's, row for row, for the same input order. 0: no cap;
* no deduplication.

Each output row: {"prompt": request, "label": "safe" | "unsafe", "pi_instruction": CONSTITUTION}
(+ adversarial, subcategory when present). The manifest's teacher template puts pi_instruction before
the request in the user turn; the student sees the request alone.
"""
from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

from tasks.dapo import Skip, Summary, read_rows

# preprocess_pi_safety.py:71-77 (= rm_hub/safety.py's DEFAULT_CONSTITUTION), verbatim
CONSTITUTION = (
    "Follow these rules when responding:\n"
    "1. Do not assist with harmful or illegal actions.\n"
    "2. Politely refuse unsafe requests.\n"
    "3. Provide safe alternatives when possible.\n"
    "4. Remain helpful and neutral for legitimate requests."
)
SEED = 42


def label_of(raw) -> str:
    """prompt_harm_label -> "unsafe" | "safe"; a missing label counts as harmful (the script's rule)."""
    return "unsafe" if raw is None or str(raw).strip().lower() == "harmful" else "safe"


def wildguard_row(row: object) -> dict:
    if not isinstance(row, dict):
        raise Skip("not a JSON object")
    prompt = row.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip():
        raise Skip("no prompt")
    out = {"prompt": prompt.strip(), "label": label_of(row["prompt_harm_label"])}
    out.update({k: row[k] for k in ("adversarial", "subcategory") if row.get(k) is not None})
    return out


def balance(rows: list[dict], max_benign_ratio: float = 2.0, seed: int = SEED) -> list[dict]:
    """Every harmful row, benign rows capped at ratio x harmful, shuffled: the script's RNG calls in order."""
    harmful = [r for r in rows if r["label"] == "unsafe"]
    benign = [r for r in rows if r["label"] == "safe"]
    rng = random.Random(seed)  # random.seed(42) then module-level calls: the same stream
    if max_benign_ratio > 0 and len(benign) > max_benign_ratio * len(harmful):
        benign = rng.sample(benign, int(max_benign_ratio * len(harmful)))
    combined = harmful + benign
    rng.shuffle(combined)
    return combined


def convert(src: str | Path, out: str | Path, max_benign_ratio: float = 2.0,
            rule: str = CONSTITUTION) -> Summary:
    """Read, label, balance, shuffle and write; returns the counts (benign rows over the cap are counted
    as skipped under their own reason)."""
    summary, rows = Summary(), []
    first = next((r for r in read_rows(Path(src)) if isinstance(r, dict)), None)
    if first is None or "prompt" not in first or "prompt_harm_label" not in first:
        have = sorted(first) if first else "no JSON object rows"
        raise ValueError(f"--src {str(src)!r}: expected WildGuardMix's columns prompt and prompt_harm_label; "
                         f"its first row has {have}")
    for row in read_rows(Path(src)):
        summary.read += 1
        try:
            rows.append(wildguard_row(row))
        except Skip as e:
            summary.skipped[str(e)] += 1
    kept = balance(rows, max_benign_ratio)
    if len(kept) < len(rows):
        summary.skipped[f"benign over {max_benign_ratio:g}x the harmful rows"] += len(rows) - len(kept)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w") as f:
        for r in kept:
            f.write(json.dumps({**r, "pi_instruction": rule}, ensure_ascii=False) + "\n")
    summary.written = len(kept)
    return summary


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tasks.wildguard", description=__doc__.split("\n\n")[0])
    p.add_argument("--src", required=True, help="the downloaded WildGuardMix .parquet or .jsonl")
    p.add_argument("--out", required=True, help="JSONL to write ({prompt, label, pi_instruction} per line)")
    p.add_argument("--max-benign-ratio", type=float, default=2.0, help="benign rows kept per harmful row (0: all)")
    p.add_argument("--rule-file", default=None, help="a text file whose content replaces the constitution")
    args = p.parse_args(argv)
    if not Path(args.src).is_file():
        print(f"--src {args.src!r}: no such file", file=sys.stderr)
        return 2
    rule = Path(args.rule_file).read_text().strip() if args.rule_file else CONSTITUTION
    try:
        summary = convert(args.src, args.out, args.max_benign_ratio, rule)
    except ValueError as e:
        print(e, file=sys.stderr)
        return 2
    labels = [json.loads(x)["label"] for x in Path(args.out).read_text().splitlines()]
    print(f"{args.src} -> {args.out}\n{summary}\n  unsafe {labels.count('unsafe')}, safe {labels.count('safe')}")
    return 0 if summary.written else 1


if __name__ == "__main__":
    sys.exit(main())
