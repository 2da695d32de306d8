"""`opd experiment NAME`: a named comparison, run arm by arm, into runs/experiments/NAME/:

    results.json   one object per arm: arm, metric, start, end, steps, wall_s (+ loss, run folder, and
                   gap_closed where the experiment names a `gap_to` arm); with `tasks:` (task name -> metric
                   key, e.g. one eval set per task) one per arm and task, with its `task`
    results.md     the same as a table (with tasks: arms x tasks), the gap closed, then the plots
    *.png          every arm's curves, one metric per plot (launch/report.py)
    runs/ARM/      each arm's ordinary run folder (manifest, metrics.jsonl, final model)
    data/, models/ what the experiment's `prepare` step wrote (datasets, tiny initial models)

configs/experiments/NAME.yaml (or any experiment file, by its path) lists the arms. An arm is an
ordinary manifest (or a list of manifests, merged left to right) plus overrides; an arm
marked `stage: true` is a step others build on (reported in the table, left out of the plots). In
overrides, `${root}` is runs/experiments/NAME, `${data}` its data folder, and `${final:ARM}` an earlier arm's final model,
so stages feed each other by name. Every arm's manifest is checked before the first one runs.

`prepare` lists what writes the experiment's inputs before any arm: each entry "module:function", or
{call: "module:function", args: {...}} with keyword arguments from the file (e.g. a task's size). The
function gets the experiment folder, plus `seed=` (the arms' run.seed) where it takes one, so
`opd experiment NAME run.seed=1` remakes models and data from that seed too.

`gap_to: ARM` (a teacher stage) adds to every other arm that is not a stage the fraction of its gap to
that arm it closed: gap_closed = (end - start) / (ARM's end - start), as the demo reports it.
"""
from __future__ import annotations

import importlib
import inspect
import json
import re
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import yaml

from launch.config import ExperimentConfig, ManifestError

from launch.manifest import load_manifest
from launch.report import CURVES, fmt, gap_closed, markdown_table, plot_all, read_metrics, summarise

EXPERIMENTS = Path(__file__).resolve().parent.parent / "configs" / "experiments"
_REF = re.compile(r"\$\{(root|data|final:([A-Za-z0-9_.-]+))\}")


@dataclass
class Arm:
    name: str
    manifest: str | list[str]
    overrides: list[str] = field(default_factory=list)
    stage: bool = False

    def command(self) -> str:
        """The arm as an `opd train` command line (before the experiment's own run.* overrides)."""
        manifests = [self.manifest] if isinstance(self.manifest, str) else self.manifest
        return " ".join(["opd train", *manifests, *self.overrides])


@dataclass
class Experiment:
    name: str
    description: str
    metric: str                      # what eval/accuracy measures in this experiment, in words
    prepare: list["Prepare"]         # what writes models and data into the experiment folder, before any arm
    arms: list[Arm]
    plots: list[str] = field(default_factory=list)  # metric keys to plot (default: launch.report.CURVES)
    gap_to: Optional[str] = None     # an arm (the teacher) whose end the other arms' gap_closed is measured to
    tasks: dict[str, str] = field(default_factory=dict)  # task -> its metric key (eval/<set>/accuracy)


@dataclass
class Prepare:
    call: str                                   # "module:function"
    args: dict = field(default_factory=dict)    # keyword arguments from the experiment file

    def __call__(self, root: Path, seed: int) -> None:
        module, name = self.call.split(":")
        fn = getattr(importlib.import_module(module), name)
        extra = {"seed": seed} if "seed" in inspect.signature(fn).parameters else {}
        fn(root, **extra, **self.args)


def _prepare(src: str, i: int, entry) -> Prepare:
    if isinstance(entry, dict) and set(entry) <= {"call", "args"} and "call" in entry:
        spec, args = entry["call"], entry.get("args") or {}
    else:
        spec, args = entry, {}
    if not (isinstance(spec, str) and spec.count(":") == 1 and isinstance(args, dict)) or "seed" in args:
        raise ManifestError(f"{src}: prepare[{i}]: give \"module:function\" or {{call: \"module:function\", "
                            f"args: {{...}}}} (the seed comes from run.seed); got {entry!r}")
    return Prepare(spec, dict(args))


def available() -> list[str]:
    return sorted(p.stem for p in EXPERIMENTS.glob("*.yaml"))


def is_experiment_file(path: str) -> bool:
    """Whether `path` is an experiment file (a YAML mapping with `arms:`) rather than a manifest."""
    p = Path(path)
    if p.suffix not in (".yaml", ".yml") or not p.is_file():
        return False
    try:
        doc = yaml.safe_load(p.read_text())
    except yaml.YAMLError:
        return False  # a manifest's YAML error is load_manifest's to report
    return isinstance(doc, dict) and "arms" in doc


def load_experiment(name: str) -> Experiment:
    """An experiment by name (configs/experiments/NAME.yaml) or by the path of its file."""
    by_path = name.endswith((".yaml", ".yml"))
    path = Path(name) if by_path else EXPERIMENTS / f"{name}.yaml"
    if by_path and not is_experiment_file(name):
        raise ManifestError(f"experiment {name!r}: not an experiment file (a YAML mapping with arms:)")
    if not path.exists():
        raise ManifestError(f"experiment {name!r}: no {path.relative_to(EXPERIMENTS.parent.parent)}; "
                            f"known: {', '.join(available())}")
    name = path.stem
    doc = yaml.safe_load(path.read_text())
    src = f"{path.name}"
    unknown = set(doc) - {"description", "metric", "prepare", "arms", "plots", "gap_to", "tasks"}
    if unknown:
        raise ManifestError(f"{src}: unknown key(s) {sorted(unknown)}")
    arms = []
    for i, a in enumerate(doc.get("arms") or []):
        bad = set(a) - {"name", "manifest", "overrides", "stage"}
        if bad or "name" not in a or "manifest" not in a:
            raise ManifestError(f"{src}: arms[{i}] needs name and manifest (and may have overrides, stage); "
                                f"got {sorted(a)}")
        arms.append(Arm(a["name"], a["manifest"], list(a.get("overrides") or []), bool(a.get("stage", False))))
    if not arms:
        raise ManifestError(f"{src}: arms: at least one arm is needed")
    gap_to = doc.get("gap_to")
    if gap_to is not None and gap_to not in [a.name for a in arms]:
        raise ManifestError(f"{src}: gap_to: {gap_to!r} is not an arm; name one of {[a.name for a in arms]}")
    return Experiment(name, doc.get("description", ""), doc.get("metric", "eval/accuracy"),
                      [_prepare(src, i, p) for i, p in enumerate(doc.get("prepare") or [])], arms,
                      list(doc.get("plots") or []), gap_to, dict(doc.get("tasks") or {}))


def resolve(exp: Experiment, root: Path, extra: list[str] = ()) -> list[tuple[Arm, ExperimentConfig]]:
    """Every arm's manifest, loaded and validated before any work; paths produced by earlier arms or
    by `prepare` need not exist yet. `extra` overrides apply to every arm (e.g. run.seed=1)."""
    done: set[str] = set()
    out = []
    for arm in exp.arms:
        def sub(m: re.Match) -> str:
            if m.group(1) in ("root", "data"):
                return str(root if m.group(1) == "root" else root / "data")
            ref = m.group(2)
            if ref not in done:
                raise ManifestError(f"experiment {exp.name}: arm {arm.name!r} uses ${{final:{ref}}}, "
                                    f"but no earlier arm is named {ref!r}")
            return str(root / "runs" / ref / "final")
        overrides = [_REF.sub(sub, o) for o in arm.overrides]
        # the experiment owns runs/experiments/NAME/runs/: running it again redoes every arm
        overrides += [f"run.name={arm.name}", f"run.output_dir={root / 'runs'}", "run.overwrite=true", *extra]
        try:
            cfg = load_manifest(arm.manifest, overrides, check_paths=False)
        except ManifestError as e:
            raise ManifestError(f"experiment {exp.name}, arm {arm.name!r}: {e}") from None
        out.append((arm, cfg))
        done.add(arm.name)
    return out


def run_experiment(name: str, out_dir: str = "runs/experiments", extra: list[str] = ()) -> dict:
    from launch.driver import train
    exp = load_experiment(name)
    root = Path(out_dir).absolute() / exp.name
    plan = resolve(exp, root, extra)  # a bad arm stops here, before any work
    t0 = time.time()
    for prepare in exp.prepare:
        prepare(root, plan[0][1].run.seed)
    results = []
    for arm, cfg in plan:
        print(f"\n=== {exp.name} / {arm.name}: {arm.command()}", flush=True)
        t = time.time()
        train(cfg)
        rows, wall = read_metrics(root / "runs" / arm.name), round(time.time() - t, 1)
        common = {"wall_s": wall, "loss": cfg.loss.name, "stage": arm.stage, "run": str(root / "runs" / arm.name)}
        if exp.tasks:
            results += [{"arm": arm.name, "task": task, "metric": key, **summarise(rows, key), **common}
                        for task, key in exp.tasks.items()]
        else:
            results.append({"arm": arm.name, "metric": exp.metric, **summarise(rows), **common})
            add_gaps(exp, results)
        write_results(exp, root, results)  # after every arm: a long experiment shows progress
    print(f"\n=== {exp.name}: {len(results)} arms in {time.time() - t0:.0f}s; {root / 'results.md'}")
    print(f"metric: {exp.metric}\n" + (task_table(results) if exp.tasks else markdown_table(results, "metric")
                                       + gap_lines(exp, results)))
    return {"experiment": exp.name, "results": results, "wall_s": round(time.time() - t0, 1)}


def add_gaps(exp: Experiment, results: list[dict]) -> None:
    """gap_closed on every finished arm that is not a stage, once exp.gap_to's arm has finished (None
    where an arm started level with or above it: no gap to close)."""
    ref = next((r for r in results if r["arm"] == exp.gap_to), None)
    if ref is None or ref["end"] is None:
        return
    for r in results:
        if not r["stage"] and r is not ref and r["start"] is not None and r["end"] is not None:
            r["gap_closed"] = gap_closed(ref["end"], r["start"], r["end"])


def gap_lines(exp: Experiment, results: list[dict]) -> str:
    """One line per arm with a gap_closed, for results.md and the console."""
    ref = next((r for r in results if r["arm"] == exp.gap_to), None)
    lines = []
    for r in results:
        if "gap_closed" not in r:
            continue
        where = f"its start ({r['start']:.1%}) and {ref['arm']} ({ref['end']:.1%}); it ended at {r['end']:.1%}"
        if r["gap_closed"] is None:
            lines.append(f"gap closed by {r['arm']}: none to close (it started level with or above {ref['arm']}): "
                         f"between {where}")
        else:
            lines.append(f"gap closed by {r['arm']}: {r['gap_closed']:.1%} of the {(ref['end'] - r['start']) * 100:.1f}"
                         f"-point gap between {where}")
    return "".join(f"\n{line}\n" for line in lines)


def write_results(exp: Experiment, root: Path, results: list[dict]) -> None:
    (root / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    runs = {r["arm"]: read_metrics(Path(r["run"])) for r in results if not r["stage"]}
    images = plot_all(runs, root, exp.plots or CURVES)
    md = f"# opd experiment {exp.name}\n\n{exp.description.strip()}\n\nMetric: {exp.metric}.\n\n"
    md += task_table(results) if exp.tasks else markdown_table(results, "metric") + gap_lines(exp, results)
    md += "\n" + "".join(f"![{p.stem}]({p.name})\n" for p in images)
    (root / "results.md").write_text(md)


def task_table(results: list[dict]) -> str:
    """Per-task results as one Markdown row per arm: each task's metric at the start and the end."""
    tasks = list(dict.fromkeys(r["task"] for r in results))
    arms = list(dict.fromkeys(r["arm"] for r in results))
    by = {(r["arm"], r["task"]): r for r in results}
    lines = ["| arm | " + " | ".join(f"{t}: start -> end" for t in tasks) + " | steps | wall s |",
             "|---|" + "---|" * (len(tasks) + 2)]
    for arm in arms:
        first = by[arm, tasks[0]]
        cells = [f"{fmt(by[arm, t]['start'], True)} -> {fmt(by[arm, t]['end'], True)}" for t in tasks]
        name = f"{arm} (stage)" if first["stage"] else arm
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {first['steps']} | {fmt(first['wall_s'])} |")
    return "\n".join(lines) + "\n"
