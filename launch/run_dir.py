"""Everything a run writes under runs/<name>/: manifest, metrics (console, JSONL, TensorBoard,
W&B), checkpoints with retention, the final export and summary.json."""
from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

from launch.config import ExperimentConfig, to_yaml


class RunDir:
    def __init__(self, cfg: ExperimentConfig):
        self.cfg = cfg
        self.path = Path(cfg.run.output_dir) / cfg.run.name
        self.path.mkdir(parents=True, exist_ok=True)
        self.checkpoints = self.path / "checkpoints"
        self.final = self.path / "final"
        (self.path / "manifest.yaml").write_text(to_yaml(cfg))
        lc = cfg.logging
        mode = "a" if cfg.run.resume else "w"
        self._jsonl = (self.path / "metrics.jsonl").open(mode) if lc.jsonl else None
        self._tb = self._wandb = None
        if lc.tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(str(self.path / "tensorboard"))
        if lc.wandb:
            import wandb
            self._wandb = wandb.init(project=lc.wandb_project, name=cfg.run.name, config=json.loads(
                json.dumps(__import__("dataclasses").asdict(cfg), default=str)))
        self.started = time.time()
        self.last_eval: float | None = None

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
        eta = elapsed / step * (total - step)
        acc = "-" if self.last_eval is None else f"{self.last_eval:.3f}"
        line = (f"step {step}/{total}  loss {m.get('train/loss', float('nan')):+.4f}  eval acc {acc}  "
                f"{m.get('perf/tokens_per_s', 0):.0f} tok/s  {m.get('perf/step_s', 0):.2f}s/step  ETA {eta:.0f}s")
        if sys.stdout.isatty():
            print(line, end="\n" if step == total else "\r", flush=True)
        elif step % max(1, total // 10) == 0 or step == total:  # logs and CI: ten lines per run
            print(line, flush=True)

    def checkpoint_dirs(self) -> list[Path]:
        if not self.checkpoints.exists():
            return []
        return sorted((p for p in self.checkpoints.iterdir() if p.name.startswith("step")),
                      key=lambda p: int(p.name[4:]))

    def prune_checkpoints(self) -> None:
        for old in self.checkpoint_dirs()[:-self.cfg.checkpoint.keep]:
            shutil.rmtree(old, ignore_errors=True)

    def close(self, summary: dict) -> None:
        summary = {**summary, "wall_time_s": round(time.time() - self.started, 1)}
        (self.path / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        for sink in (self._jsonl, self._tb):
            if sink:
                sink.close()
        if self._wandb:
            self._wandb.finish()
