"""`opd report RUN [RUN ...]`: any runs' metrics.jsonl curves as PNGs, and a Markdown table.

A RUN is a run folder (holding metrics.jsonl) or a run name under runs/. `opd experiment` draws its
plots with the same functions.
"""
from __future__ import annotations

import json
from pathlib import Path

# metric key -> plot title. Drawn when at least one run logged it.
CURVES = {
    "eval/accuracy": "held-out accuracy / compliance (greedy)",
    "train/loss": "training loss",
    "train/reverse_kl": "exact reverse KL(student || teacher)",
    "train/sampled_log_ratio": "sampled-token log p - log q",
    "opsd/pi_gap_nats": "OPSD: log q(y | PI) - log p(y | no PI), per completion",
    "train/entropy": "student entropy",
    "train/student_mass_on_support": "P(S): student mass on the top-k support",
    "teacher/logprob_sampled": "teacher log-prob of the student's tokens",
    "teacher/rank_sampled": "teacher's rank of the student's token (1 = its argmax)",
    "teacher/entropy": "teacher entropy on the student's prefixes",
    "rollout/repetition_3gram": "3-gram repetition rate",
    "rollout/response_length": "response length (tokens)",
}


def find_run(arg: str) -> Path:
    for path in (Path(arg), Path("runs") / arg):
        if (path / "metrics.jsonl").exists():
            return path
    raise FileNotFoundError(f"{arg!r}: no metrics.jsonl there or under runs/{arg}")


def read_metrics(run: Path) -> list[dict]:
    rows = []
    for line in (run / "metrics.jsonl").read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:  # a run killed mid-write leaves a partial last line
            continue
    return rows


def curve(rows: list[dict], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of `key`. A weighted_sum loss logs its components' diagnostics as
    train/<component>/<name>; a run without train/<name> falls back to its first component that has it
    (each component's diagnostics are token means over that component's rows)."""
    if key.startswith("train/") and not any(key in r for r in rows):
        name = key.split("/", 1)[1]
        alias = next((k for r in rows for k in r if k.startswith("train/") and k.count("/") == 2
                      and k.endswith("/" + name)), None)
        key = alias or key
    points = [(r["step"], r[key]) for r in rows if key in r]
    return [s for s, _ in points], [v for _, v in points]


def plot(runs: dict[str, list[dict]], key: str, path: Path, title: str = "") -> bool:
    """One PNG: `key` against step for every run that logged it. False when none did."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    drawn = [(label, *curve(rows, key)) for label, rows in runs.items()]
    drawn = [d for d in drawn if d[1]]
    if not drawn:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.6))
    for label, steps, values in drawn:
        ax.plot(steps, values, marker="o" if len(steps) < 15 else None, markersize=3, label=label)
    ax.set_xlabel("step")
    ax.set_ylabel(key)
    ax.set_title(title or CURVES.get(key, key), fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def plot_all(runs: dict[str, list[dict]], out: Path, keys=tuple(CURVES)) -> list[Path]:
    """Every curve in `keys` some run logged, as out/<key with / as _>.png."""
    return [p for key in keys if plot(runs, key, p := out / (key.replace("/", "_") + ".png"))]


def summarise(rows: list[dict], key: str = "eval/accuracy") -> dict:
    """First and last value of `key`, the steps run, and the final training loss."""
    steps, values = curve(rows, key)
    train = [r for r in rows if "train/loss" in r]
    return {"start": values[0] if values else None, "end": values[-1] if values else None,
            "steps": max((r["step"] for r in train), default=0),
            "final_loss": train[-1]["train/loss"] if train else None}


def gap_closed(teacher: float, before: float, after: float) -> float | None:
    """(after - before) / (teacher - before): 0 is no progress, 1 is the teacher's accuracy. None when
    the student already matched or beat the teacher (no gap to close)."""
    gap = teacher - before
    return (after - before) / gap if gap > 0 else None


def fmt(v, pct: bool = False) -> str:
    if v is None:
        return "-"
    return f"{v:.1%}" if pct else f"{v:.4g}"


def markdown_table(entries: list[dict], metric: str) -> str:
    """entries: {"arm", "start", "end", "steps", "wall_s", ...} -> a Markdown table."""
    lines = [f"| run | {metric} at start | at end | change | steps | final loss | wall s |",
             "|---|---|---|---|---|---|---|"]
    for e in entries:
        change = None if e["start"] is None or e["end"] is None else e["end"] - e["start"]
        lines.append(f"| {e['arm']} | {fmt(e['start'], True)} | {fmt(e['end'], True)} | "
                     f"{'-' if change is None else f'{change * 100:+.1f} pts'} | {e['steps']} | "
                     f"{fmt(e.get('final_loss'))} | {fmt(e.get('wall_s'))} |")
    return "\n".join(lines) + "\n"


def wall_time(run: Path):
    summary = run / "summary.json"
    return json.loads(summary.read_text()).get("wall_time_s") if summary.exists() else None


def report(args: list[str], out: Path) -> Path:
    """Curves and a table for the runs named in args; returns the Markdown file's path."""
    paths = [find_run(a) for a in args]
    labels = [p.name if [q.name for q in paths].count(p.name) == 1 else str(p) for p in paths]
    runs = {label: read_metrics(p) for label, p in zip(labels, paths)}
    out.mkdir(parents=True, exist_ok=True)
    images = plot_all(runs, out)
    entries = [{"arm": label, **summarise(runs[label]), "wall_s": wall_time(p)} for label, p in zip(labels, paths)]
    md = "# opd report\n\n" + markdown_table(entries, "eval/accuracy") + "\n"
    md += "".join(f"![{p.stem}]({p.name})\n" for p in images)
    (out / "report.md").write_text(md)
    return out / "report.md"
