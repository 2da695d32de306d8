"""Datasets from JSONL or Parquet with configurable field names, and a resumable prompt stream.

A row missing a required field (or a JSONL line that is not UTF-8 JSON) is skipped and counted, never
fatal: `Dataset.skipped` reaches metrics.jsonl as `data/skipped_rows`.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass, field
from pathlib import Path


@dataclass
class Dataset:
    rows: list[dict[str, str]]
    skipped: int = 0
    source: str = ""
    skip_reasons: dict[str, int] = field(default_factory=dict)


@dataclass
class _Unreadable:
    reason: str


def load_dataset(source: str, required: list[str]) -> Dataset:
    """Read `source` (.jsonl/.json lines or .parquet); keep rows that have every `required` field."""
    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"data source {source!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        raw = pq.read_table(path).to_pylist()
    elif path.suffix in (".jsonl", ".json"):
        raw = []
        for line in path.read_bytes().splitlines():
            if not line.strip():
                continue
            try:
                raw.append(json.loads(line.decode("utf-8")))
            except UnicodeDecodeError:
                raw.append(_Unreadable("not UTF-8"))
            except json.JSONDecodeError:
                raw.append(_Unreadable("not JSON"))
    else:
        raise ValueError(f"data source {source!r}: expected a .jsonl or .parquet file")
    ds = Dataset(rows=[], source=str(source))
    for row in raw:
        reason = None
        if isinstance(row, _Unreadable):
            reason = row.reason
        elif not isinstance(row, dict):
            reason = "not a JSON object"
        else:
            missing = [k for k in required if row.get(k) in (None, "")]
            if missing:
                reason = f"missing field {missing[0]!r}"
        if reason:
            ds.skipped += 1
            ds.skip_reasons[reason] = ds.skip_reasons.get(reason, 0) + 1
        else:
            ds.rows.append({k: str(v) for k, v in row.items()})
    if not ds.rows:
        raise ValueError(f"data source {source!r}: no usable rows ({ds.skip_reasons}); "
                         f"check the field names {required}")
    return ds


class PromptStream:
    """Shuffled, epoch-by-epoch stream of rows whose position can be saved and restored exactly."""

    def __init__(self, rows: list[dict], seed: int):
        self.rows, self.seed = rows, seed
        self.epoch, self.pos = 0, 0
        self._order = self._shuffle()

    def _shuffle(self) -> list[int]:
        order = list(range(len(self.rows)))
        random.Random(self.seed * 100003 + self.epoch).shuffle(order)
        return order

    def next_batch(self, n: int) -> list[dict]:
        out = []
        while len(out) < n:
            if self.pos == len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._shuffle()
            out.append(self.rows[self._order[self.pos]])
            self.pos += 1
        return out

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._shuffle()
