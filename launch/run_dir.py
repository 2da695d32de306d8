"""Everything a run writes under runs/<name>/: manifest, metrics (console, JSONL, TensorBoard,
W&B), checkpoints with retention, the final export and summary.json.

It also decides, before Ray starts, what the folder means for this run: a fresh start, a resume from
its newest complete checkpoint (run.resume), or a refusal when it holds a different run."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

from launch.config import ExperimentConfig, ManifestError

from launch.manifest import to_yaml
from learner import checkpoint


class RunDir:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.path = Path(cfg.run.output_dir) / cfg.run.name
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"
        self.resume_from: Optional[Path] = self._choose_start()
        self.resume_state: dict = checkpoint.state(self.resume_from) if self.resume_from else {}
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / "manifest.yaml").write_text(to_yaml(cfg))
        step = self.resume_state.get("step", 0)
        kept = self._truncate_metrics(step) if self.resume_from else []
        lc = cfg.logging
        self._jsonl = (self.path / "metrics.jsonl").open("a" if self.resume_from else "w") if lc.jsonl else None
        self._tb = self._wandb = None
        if lc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            # purge_step drops events a killed run logged after its checkpoint
            self._tb = SummaryWriter(str(self.path / "tensorboard"), purge_step=step + 1 if self.resume_from else None)
        if lc.wandb:
            import wandb
            self._wandb = wandb.init(project=lc.wandb_project, name=cfg.run.name, config=json.loads(
                json.dumps(__import__("dataclasses").asdict(cfg), default=str)))
        self.started = time.time()
        evals = [r for r in kept if "eval/accuracy" in r]
        self.last_eval: float | None = evals[-1]["eval/accuracy"] if evals else None
        self.start_eval: float | None = next((r["eval/accuracy"] for r in evals if r["step"] == 0), None)

    def _choose_start(self) -> Optional[Path]:
        """The checkpoint to resume from, or None for a fresh start (the folder emptied). A folder that
        holds a different run is refused unless run.resume or run.overwrite says what to do with it."""
        rc = self.cfg.run
        if rc.resume:
            for p in checkpoint.incomplete(self.checkpoints):
                print(f"opd: skipping incomplete checkpoint {p} (no {checkpoint.MARKER}); removing it", flush=True)
                shutil.rmtree(p)
            done = checkpoint.complete(self.checkpoints)
            if done:
                print(f"opd: resuming from {done[-1]} (step {checkpoint.state(done[-1])['step']} of {rc.steps})",
                      flush=True)
                return done[-1]
            if rc.resume is True:
                raise ManifestError(f"run.resume: true, but {self.checkpoints} holds no complete checkpoint; "
                                    "use run.resume=auto to start afresh when there is none")
        elif not rc.overwrite and self._holds_other_run():
            raise ManifestError(f"run.name: {self.path} already holds a run; use run.resume=auto to continue it, "
                                "run.overwrite=true to replace it, or another run.name")
        if self.path.exists():
            shutil.rmtree(self.path)
        return None

    def _holds_other_run(self) -> bool:
        manifest, metrics = self.path / "manifest.yaml", self.path / "metrics.jsonl"
        if metrics.exists() and metrics.stat().st_size:
            return True
        return manifest.exists() and _what_runs(manifest.read_text()) != _what_runs(to_yaml(self.cfg))

    def _truncate_metrics(self, step: int) -> list[dict]:
        """Drop what a killed run logged after its checkpoint's step (it is about to be redone)."""
        path = self.path / "metrics.jsonl"
        if not path.exists():
            return []
        rows = []
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
            except json.JSONDecodeError:  # the line a kill cut in half
                continue
            if row.get("step", 0) <= step:
                rows.append(row)
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
        tmp.replace(path)
        return rows

    def log(self, step: int, metrics: dict[str, float]) -> None:
        if "eval/accuracy" in metrics:
            self.last_eval = metrics["eval/accuracy"]
        if self._jsonl:
            self._jsonl.write(json.dumps({"step": step, **metrics}) + "\n")
            self._jsonl.flush()
        if self._tb:
            for k, v in metrics.items():
                self._tb.add_scalar(k, v, step)
        if self._wandb:
            self._wandb.log(metrics, step=step)
        if self.cfg.logging.console and "train/loss" in metrics:
            self._progress(step, metrics)
        elif self.cfg.logging.console and "eval/accuracy" in metrics:
            print(f"eval @ step {step}: accuracy {metrics['eval/accuracy']:.3f}", flush=True)

    def _progress(self, step: int, m: dict) -> None:
        total = self.cfg.run.steps
        elapsed = time.time() - self.started
        eta = elapsed / max(1, step - self.resume_state.get("step", 0)) * (total - step)
        acc = "-" if self.last_eval is None else f"{self.last_eval:.3f}"
        line = (f"step {step}/{total}  loss {m.get('train/loss', float('nan')):+.4f}  eval acc {acc}  "
                f"{m.get('perf/tokens_per_s', 0):.0f} tok/s  {m.get('perf/step_s', 0):.2f}s/step  ETA {eta:.0f}s")
        if sys.stdout.isatty():
            print(line, end="\n" if step == total else "\r", flush=True)
        elif step % max(1, total // 10) == 0 or step == total:  # logs and CI: ten lines per run
            print(line, flush=True)

    def prune_checkpoints(self) -> None:
        """Keep the newest checkpoint.keep complete checkpoints."""
        for old in checkpoint.complete(self.checkpoints)[:-self.cfg.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def resume_hint(self) -> str:
        done = checkpoint.complete(self.checkpoints)
        if not done:
            return "no checkpoint was written (checkpoint.interval)"
        return f"the newest complete checkpoint is {done[-1]}: continue with run.resume=true"

    def close(self, summary: dict) -> None:
        summary = {**summary, "wall_time_s": round(time.time() - self.started, 1)}
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for sink in (self._jsonl, self._tb):
            if sink:
                sink.close()
        if self._wandb:
            self._wandb.finish()


def _what_runs(manifest_yaml: str) -> dict:
    """A saved manifest without the keys that say how to start (resume, overwrite), not what runs."""
    doc = yaml.safe_load(manifest_yaml) or {}
    for key in ("resume", "overwrite"):
        doc.get("run", {}).pop(key, None)
    return doc
