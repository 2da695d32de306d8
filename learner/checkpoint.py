"""Checkpoint folders that are either complete or plainly not: `<dir>/stepN` holds a finished
checkpoint and its marker; anything else (`stepN.tmp`, a `stepN` without the marker) was cut short.

The learner's ranks write into `stepN.tmp`; once every rank is done, rank 0 writes the marker (the
run state as JSON) and renames the folder, one atomic rename. A run killed at any moment therefore
leaves its previous checkpoints intact and at most one unfinished folder, which resume skips.
"""
from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

MARKER = "complete.json"
TMP = ".tmp"
_NAME = re.compile(r"step(\d+)")


def tag(step: int) -> str:
    return f"step{step}"


def staging(directory: str | Path, step: int) -> Path:
    """Where the ranks write step `step`'s checkpoint (emptied first: a killed run may have left one)."""
    return Path(directory) / (tag(step) + TMP)


def seal(directory: str | Path, step: int, state: dict) -> Path:
    """Rank 0, after every rank has written: marker (fsynced), then the atomic rename."""
    src, dst = staging(directory, step), Path(directory) / tag(step)
    with open(src / MARKER, "w") as f:
        json.dump(state, f)
        f.flush()
        os.fsync(f.fileno())
    if dst.exists():  # the same step written again after a resume from an earlier one
        shutil.rmtree(dst)
    os.rename(src, dst)
    return dst


def _step(p: Path) -> int | None:
    m = _NAME.fullmatch(p.name)
    return int(m.group(1)) if m else None


def complete(directory: str | Path) -> list[Path]:
    """Finished checkpoints, oldest first."""
    d = Path(directory)
    found = [p for p in d.iterdir() if _step(p) is not None and (p / MARKER).is_file()] if d.is_dir() else []
    return sorted(found, key=_step)


def incomplete(directory: str | Path) -> list[Path]:
    """Checkpoint folders a killed run left unfinished."""
    d = Path(directory)
    if not d.is_dir():
        return []
    return sorted(p for p in d.iterdir() if p.is_dir() and p.name.startswith("step") and p not in complete(d))


def state(checkpoint: Path) -> dict:
    """The run state sealed into a complete checkpoint (step, data position, weight version, ...)."""
    return json.loads((checkpoint / MARKER).read_text())
