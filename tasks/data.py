"""Datasets (JSONL or Parquet files, globs of them, save_to_disk folders, hub names) with configurable field
names, and a resumable prompt stream.

A row missing a required field (or a JSONL line that is not UTF-8 JSON) is skipped and counted, never
fatal: `Dataset.skipped` reaches metrics.jsonl as `data/skipped_rows`.
"""
from __future__ import annotations

import glob
import json
import random
import re
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


HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+(:[\w.-]+)?$")  # org/name or org/name:split
GLOB_CHARS = set("*?[")


def source_kind(source: str) -> str:
    """How `source` is read: "file" (.jsonl/.json/.parquet), "glob" (several such files), "folder" (the
    datasets library's save_to_disk) or "hub" (a dataset name, loaded with datasets.load_dataset). A name
    like org/name is a hub name only when no such path exists here."""
    path = Path(source)
    if GLOB_CHARS & set(source):
        return "glob"
    if path.is_dir():
        return "folder"
    if path.exists() or path.suffix in (".jsonl", ".json", ".parquet"):
        return "file"
    return "hub" if HUB_NAME.match(source) else "file"


def load_dataset(source: str, required: list[str], messages_field: str = "messages") -> Dataset:
    """Read `source` (see source_kind); keep rows that have every `required` field. Row values become
    strings, except `messages_field`, which stays a list of {role, content} (a chat conversation)."""
    kind = source_kind(source)
    if kind == "file":
        raw = _read_file(Path(source))
    elif kind == "glob":
        files = sorted(glob.glob(source, recursive=True))
        if not files:
            raise FileNotFoundError(f"data source {source!r} matches no file")
        raw = [row for f in files for row in _read_file(Path(f))]
    else:
        raw = _read_with_datasets(source, kind)
    ds = Dataset(rows=[], source=str(source))
    for row in raw:
        reason = _problem(row, required, messages_field)
        if reason:
            ds.skipped += 1
            ds.skip_reasons[reason] = ds.skip_reasons.get(reason, 0) + 1
        else:
            ds.rows.append({k: v if k == messages_field else str(v) for k, v in row.items()})
    if not ds.rows:
        raise ValueError(f"data source {source!r}: no usable rows ({ds.skip_reasons}); "
                         f"check the field names {required}")
    return ds


def _problem(row, required: list[str], messages_field: str) -> str | None:
    """Why a row is unusable, or None."""
    if isinstance(row, _Unreadable):
        return row.reason
    if not isinstance(row, dict):
        return "not a JSON object"
    missing = [k for k in required if row.get(k) in (None, "", [])]
    if missing:
        return f"missing field {missing[0]!r}"
    if messages_field in row and row[messages_field] is not None and not _is_conversation(row[messages_field]):
        return f"{messages_field!r} is not a list of {{role, content}} messages"
    return None


def _is_conversation(messages) -> bool:
    return (isinstance(messages, list) and bool(messages) and all(
        isinstance(m, dict) and m.get("role") in ("system", "user", "assistant", "tool")
        and isinstance(m.get("content"), str) for m in messages))


def _read_file(path: Path) -> list:
    if not path.exists():
        raise FileNotFoundError(f"data source {str(path)!r} does not exist")
    if path.suffix == ".parquet":
        import pyarrow.parquet as pq
        return pq.read_table(path).to_pylist()
    if path.suffix not in (".jsonl", ".json"):
        raise ValueError(f"data source {str(path)!r}: expected a .jsonl or .parquet file, a glob of them, a folder "
                         "written by datasets' save_to_disk, or a hub dataset name (org/name)")
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
    return raw


def _read_with_datasets(source: str, kind: str) -> list:
    """A save_to_disk folder, or a hub dataset (its `train` split unless the name says org/name:split)."""
    import datasets
    if kind == "folder":
        try:
            loaded = datasets.load_from_disk(source)
        except FileNotFoundError as e:
            raise ValueError(f"data source {source!r}: a folder, but not one written by datasets' save_to_disk "
                             f"({str(e).splitlines()[0][:160]})") from None
        if isinstance(loaded, datasets.DatasetDict):
            raise ValueError(f"data source {source!r} holds the splits {sorted(loaded)}; name one: "
                             f"{source.rstrip('/')}/{sorted(loaded)[0]}")
        return loaded.to_list()
    name, _, split = source.partition(":")
    try:
        return datasets.load_dataset(name, split=split or "train").to_list()
    except Exception as e:  # noqa: BLE001 - offline, unknown name, no such split: one line either way
        raise ValueError(f"data source {source!r} is no file or folder here, and as a hub dataset it could not be "
                         f"loaded ({type(e).__name__}: {str(e).splitlines()[0][:160]})") from None


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
