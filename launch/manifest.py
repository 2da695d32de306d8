"""Experiment manifests: YAML -> the typed dataclasses of launch/config.py, with errors that name the key.

A manifest may `extends: other.yaml` (relative to itself); several manifests merge left to right
(`opd train arm.yaml cpu.yaml`); `key=value` overrides come last.
Unknown keys, wrong types, missing required values and impossible combinations (launch/validation.py)
all stop the run here, before Ray, models or data are touched.

Paths (model.path, teacher.path, data.train, data.eval, eval.sets[i].data, run.output_dir) are relative to the
directory `opd` is started from: the repository root locally, the job's working directory under
`ray job submit --working-dir`, so the same manifest means the same files on both. They are made
absolute here, so the run's saved manifest says exactly which files it read.
"""
from __future__ import annotations

import dataclasses
import difflib
import glob
from dataclasses import fields, is_dataclass
from pathlib import Path
from typing import Optional

import yaml
from omegaconf import DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from launch.config import EvalSetConfig, ExperimentConfig, ManifestError, TeacherConfig
from launch.derived import resolve
from launch.routing import teacher_specs
from launch.validation import validate
from tasks.data import source_kind
from teachers.kinds import kind_of


def _all_keys(cls=ExperimentConfig, prefix="") -> list[str]:
    out = []
    for f in fields(cls):
        key = f"{prefix}{f.name}"
        out.append(key)
        if f.default_factory is not dataclasses.MISSING and is_dataclass(f.default_factory()):
            out += _all_keys(type(f.default_factory()), key + ".")
    return out


def _explain(e: OmegaConfBaseException, source: str) -> ManifestError:
    key = getattr(e, "full_key", None) or "?"
    items = {EvalSetConfig: ("eval.sets[]", "a set"), TeacherConfig: ("teachers[]", "a teacher")}
    item = items.get(getattr(e, "object_type", None))
    if isinstance(e, ConfigKeyError) and item and "." not in key:
        # OmegaConf names a list item's key without its path
        names = [f.name for f in fields(getattr(e, "object_type"))]
        near = difflib.get_close_matches(str(e.key), names, n=1, cutoff=0.6)
        hint = f"; did you mean '{item[0]}.{near[0]}'?" if near else f" ({item[1]} has {', '.join(names)})"
        return ManifestError(f"{source}: unknown key '{item[0]}.{e.key}'{hint}")
    if isinstance(e, ConfigKeyError):
        near = difflib.get_close_matches(key, _all_keys(), n=1, cutoff=0.6)
        hint = f"; did you mean {near[0]!r}?" if near else ""
        return ManifestError(f"{source}: unknown key {key!r}{hint}")
    msg = str(e).split("\n")[0]
    return ManifestError(f"{source}: {key}: {msg}")


def _load_yaml(path: Path, seen: tuple = ()) -> DictConfig:
    if not path.exists():
        raise ManifestError(f"manifest {str(path)!r} does not exist")
    if path.resolve() in seen:
        raise ManifestError(f"{path}: extends: cycle through {[str(p) for p in seen]}")
    try:
        raw = OmegaConf.load(path)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise ManifestError(f"{path}:{where}: not valid YAML ({getattr(e, 'problem', None) or e})") from None
    if not isinstance(raw, DictConfig):
        raise ManifestError(f"{path}: the manifest must be a mapping of sections (run:, model:, ...), "
                            f"not a {'list' if isinstance(raw, ListConfig) else type(raw).__name__}")
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = _load_yaml((path.parent / str(parent)), seen + (path.resolve(),))
    return OmegaConf.merge(base, raw)


def _field_type(key: str) -> Optional[str]:
    """The annotation of a manifest key as written in the dataclasses ("str", "Optional[str]", ...)."""
    cls, parts = ExperimentConfig, key.split(".")
    for i, part in enumerate(parts):
        f = next((f for f in fields(cls) if f.name == part), None)
        if f is None:
            return None
        if i == len(parts) - 1:
            return str(f.type)
        if f.default_factory is dataclasses.MISSING or not is_dataclass(f.default_factory()):
            return None
        cls = type(f.default_factory())
    return None


def parse_overrides(overrides) -> DictConfig:
    """`key=value` pairs from the command line. A string key takes its value as written, so templates
    pass unquoted by YAML (`teacher.prompt_template=rev:{prompt}`); other values are YAML: numbers,
    booleans, lists, `{k: v}` maps."""
    out = OmegaConf.create()
    for item in overrides:
        key, eq, value = item.partition("=")
        if not eq or not key.strip():
            raise ManifestError(f"command line: {item!r} is not key=value (e.g. rollout.temperature=0.7)")
        kind = _field_type(key)
        if kind in ("str", "Optional[str]"):
            OmegaConf.update(out, key, None if kind != "str" and value in ("null", "~") else value, force_add=True)
        else:
            out = OmegaConf.merge(out, OmegaConf.from_dotlist([item]))
    return out


PATH_KEYS = ("model.path", "teacher.path", "data.train", "data.eval", "run.output_dir", "loss.kl_to_reference.path")


def _path_fields(cfg: ExperimentConfig) -> list[tuple[str, object, str]]:
    """(manifest key, the object holding its value, attribute name) of every path the manifest names."""
    out = [(key, _section(cfg, key.split(".")[:-1]), key.split(".")[-1]) for key in PATH_KEYS]
    out += [(f"teachers[{i}].path", t, "path") for i, t in enumerate(cfg.teachers)]
    return out + [(f"eval.sets[{i}].data", s, "data") for i, s in enumerate(cfg.eval.sets)]


def load_manifest(paths: str | Path | list, overrides: list[str] = (), check_paths: bool = True) -> ExperimentConfig:
    """Read, merge, override and validate. Returns a typed ExperimentConfig (not a DictConfig).
    `paths`: one manifest or several, merged left to right (each with its own `extends:`) before the
    `key=value` overrides. check_paths=False (`opd check` on a laptop) skips the existence of files
    the run will read."""
    paths = [paths] if isinstance(paths, (str, Path)) else list(paths)
    if not paths:
        raise ManifestError("no manifest given")
    cfg = OmegaConf.structured(ExperimentConfig)
    layers = [(str(p), lambda p=p: _load_yaml(Path(p))) for p in paths]
    for source, layer in layers + [("command line", lambda: parse_overrides(overrides))]:
        try:
            cfg = OmegaConf.merge(cfg, layer())
        except OmegaConfBaseException as e:
            raise _explain(e, source) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ManifestError(f"{' + '.join(map(str, paths))}: required value missing: {', '.join(missing)}")
    typed: ExperimentConfig = OmegaConf.to_object(cfg)
    for key, holder, name in _path_fields(typed):
        value = getattr(holder, name)
        if value and not (key.startswith(("data.", "eval.sets")) and source_kind(value) == "hub"):  # a hub name stays
            setattr(holder, name, str(Path(value).expanduser().absolute()))
    validate(typed)
    resolve(typed)  # the canonical values and `auto`s the checks accepted, written in
    if check_paths:
        for key in missing_paths(typed):
            raise ManifestError(_missing_path_message(typed, key))
    return typed


def _section(cfg: ExperimentConfig, names: list[str]):
    for n in names:
        cfg = getattr(cfg, n)
    return cfg


def missing_paths(cfg: ExperimentConfig) -> list[str]:
    """Keys whose path the run reads but which does not exist here."""
    read = {"model.path", "data.train", "data.eval"}
    if cfg.algorithm == "opd":
        read |= {f"{t.key}.path" for t in teacher_specs(cfg)  # a self-teacher reads model.path
                 if kind_of(t.config) and not kind_of(t.config).student_weights}
    if cfg.loss.kl_to_reference.coef > 0:
        read.add("loss.kl_to_reference.path")
    return [key for key, holder, name in _path_fields(cfg)
            if (key in read or key.startswith("eval.sets")) and getattr(holder, name)
            and not _source_exists(getattr(holder, name), key)]


def _source_exists(value: str, key: str) -> bool:
    """A data source (file, glob, folder or hub name) or model folder that can be read from here."""
    kind = source_kind(value) if key.startswith(("data.", "eval.sets")) else "file"
    return bool(glob.glob(value)) if kind == "glob" else kind == "hub" or Path(value).exists()


def _missing_path_message(cfg: ExperimentConfig, key: str) -> str:
    value = next(getattr(holder, name) for k, holder, name in _path_fields(cfg) if k == key)
    msg = f"{key}: path {value!r} does not exist"
    if cfg.cluster.mode == "ray":
        msg += (" where the job runs; paths must be reachable from the cluster: shared storage, or inside the "
                "directory `ray job submit --working-dir` uploads (gitignored files such as runs/ are not uploaded)")
    return msg


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))
