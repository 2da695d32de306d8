"""Experiment manifests: YAML -> typed dataclasses, with errors that name the key.

A manifest may `extends: other.yaml` (relative to itself); `key=value` overrides come last.
Unknown keys, wrong types, missing required values and impossible combinations all stop the run
here, before Ray, models or data are touched.
"""
from __future__ import annotations

import difflib
import dataclasses
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException


@dataclass
class RunConfig:
    name: str = MISSING
    output_dir: str = "runs"
    seed: int = 0
    steps: int = MISSING
    resume: bool = False          # continue from runs/<name>/checkpoints/latest if present


@dataclass
class ClusterConfig:
    mode: str = "local"           # local: start Ray in-process | ray: join a running cluster
    address: Optional[str] = None  # ray mode; None means "auto" (what `ray job submit` sets up)
    num_cpus: int = 2             # local mode: CPUs Ray may use
    num_gpus: int = 0
    threads_per_actor: int = 1    # torch intra-op threads inside each actor


@dataclass
class ModelConfig:
    path: str = MISSING           # Hugging Face model directory (student)
    dtype: str = "float32"


@dataclass
class TeacherConfig:
    kind: str = "hf"              # hf | vllm | self (the student's own weights) | none
    path: Optional[str] = None    # required for hf / vllm; `self` uses model.path
    prompt_template: str = "{prompt}"  # row fields by name; OPSD puts privileged info here
    live: bool = False            # self-teacher follows the student's weights every step
    num_actors: int = 1


@dataclass
class RolloutConfig:
    engine: str = "hf"            # hf | vllm
    num_actors: int = 1
    prompts_per_step: int = 16
    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0


@dataclass
class LearnerConfig:
    num_ranks: int = 1
    zero_stage: int = 0
    micro_batch_size: int = 16
    grad_accum: Optional[int] = None  # derived from the batch when null; checked when given
    optimizer: str = "adamw"      # adamw | sgd (plain SGD makes the update equal lr x gradient)
    lr: float = 1e-4
    schedule: str = "cosine"      # cosine | linear | constant (after warm-up)
    warmup_ratio: float = 0.1
    min_lr_ratio: float = 0.0
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0


@dataclass
class LossConfig:
    name: str = "sampled_token_rkl"
    params: dict[str, Any] = field(default_factory=dict)


@dataclass
class DataConfig:
    train: str = MISSING          # .jsonl or .parquet
    eval: Optional[str] = None
    prompt_field: str = "prompt"
    answer_field: str = "answer"
    prompt_template: str = "{prompt}"  # the student's prompt; row fields by name


@dataclass
class EvalConfig:
    interval: int = 10            # steps between evaluations (0: only at start and end)
    size: int = 128
    verifier: str = "exact_match"
    max_new_tokens: Optional[int] = None  # default: rollout.max_new_tokens
    temperature: float = 0.0      # 0 = greedy


@dataclass
class CheckpointConfig:
    interval: int = 0             # steps between checkpoints (0: only the final one)
    keep: int = 2


@dataclass
class LoggingConfig:
    console: bool = True
    jsonl: bool = True
    tensorboard: bool = True
    wandb: bool = False
    wandb_project: str = "opd"


@dataclass
class ExperimentConfig:
    algorithm: str = "opd"        # opd | sft | grpo
    run: RunConfig = field(default_factory=RunConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    data: DataConfig = field(default_factory=DataConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)


class ManifestError(ValueError):
    """A manifest problem, raised before any work starts. The message names the key."""


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
    raw = OmegaConf.load(path)
    parent = raw.pop("extends", None)
    if parent is None:
        return raw
    base = _load_yaml((path.parent / str(parent)), seen + (path.resolve(),))
    return OmegaConf.merge(base, raw)


def load_manifest(path: str | Path, overrides: list[str] = ()) -> ExperimentConfig:
    """Read, merge, override and validate. Returns a typed ExperimentConfig (not a DictConfig)."""
    cfg = OmegaConf.structured(ExperimentConfig)
    for source, layer in ((str(path), lambda: _load_yaml(Path(path))),
                          ("command line", lambda: OmegaConf.from_dotlist(list(overrides)))):
        try:
            cfg = OmegaConf.merge(cfg, layer())
        except OmegaConfBaseException as e:
            raise _explain(e, source) from None
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ManifestError(f"{path}: required value missing: {', '.join(missing)}")
    typed: ExperimentConfig = OmegaConf.to_object(cfg)
    validate(typed)
    return typed


def to_yaml(cfg: ExperimentConfig) -> str:
    return OmegaConf.to_yaml(OmegaConf.structured(cfg))


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ManifestError(f"{key}: {value!r} is not one of {list(choices)}")


def _positive(key: str, value, allow_zero=False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ManifestError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def _exists(key: str, path: Optional[str]) -> None:
    if path and not Path(path).exists():
        raise ManifestError(f"{key}: path {path!r} does not exist")


def validate(cfg: ExperimentConfig) -> None:
    """Checks a type system cannot express. Paths are checked in local mode (on a cluster they
    may live on the workers' storage)."""
    _choice("algorithm", cfg.algorithm, ("opd", "sft", "grpo"))
    _choice("cluster.mode", cfg.cluster.mode, ("local", "ray"))
    _choice("teacher.kind", cfg.teacher.kind, ("hf", "vllm", "self", "none"))
    _choice("rollout.engine", cfg.rollout.engine, ("hf", "vllm"))
    _choice("learner.zero_stage", cfg.learner.zero_stage, (0, 1, 2, 3))
    _choice("learner.optimizer", cfg.learner.optimizer, ("adamw", "sgd"))
    _choice("learner.schedule", cfg.learner.schedule, ("cosine", "linear", "constant"))
    _choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16"))
    for key in ("run.steps", "rollout.prompts_per_step", "rollout.samples_per_prompt",
                "rollout.max_new_tokens", "rollout.num_actors", "learner.num_ranks",
                "learner.micro_batch_size", "teacher.num_actors"):
        section, name = key.split(".")
        _positive(key, getattr(getattr(cfg, section), name))
    _positive("learner.lr", cfg.learner.lr)
    if not 0 < cfg.rollout.top_p <= 1:
        raise ManifestError(f"rollout.top_p: must be in (0, 1], got {cfg.rollout.top_p}")
    _positive("rollout.temperature", cfg.rollout.temperature)

    rows = cfg.rollout.prompts_per_step * (1 if cfg.algorithm == "sft" else cfg.rollout.samples_per_prompt)
    per_pass = cfg.learner.micro_batch_size * cfg.learner.num_ranks
    if rows % per_pass:
        raise ManifestError(f"learner.micro_batch_size: {rows} rows per step do not split into "
                            f"{cfg.learner.num_ranks} ranks x micro-batches of {cfg.learner.micro_batch_size}")
    if cfg.learner.grad_accum is not None and cfg.learner.grad_accum != rows // per_pass:
        raise ManifestError(f"learner.grad_accum: {cfg.learner.grad_accum} but {rows} rows / "
                            f"({per_pass} rows per pass) = {rows // per_pass}; remove it or make it match")

    needs_teacher = cfg.algorithm == "opd"
    if needs_teacher and cfg.teacher.kind == "none":
        raise ManifestError("teacher.kind: algorithm 'opd' needs a teacher (hf, vllm or self)")
    if needs_teacher and cfg.teacher.kind in ("hf", "vllm") and not cfg.teacher.path:
        raise ManifestError(f"teacher.path: required for teacher.kind {cfg.teacher.kind!r}")
    if cfg.teacher.live and cfg.teacher.kind != "self":
        raise ManifestError("teacher.live: only a self-teacher (teacher.kind: self) can follow live weights")
    if cfg.cluster.mode == "local":
        _exists("model.path", cfg.model.path)
        _exists("data.train", cfg.data.train)
        _exists("data.eval", cfg.data.eval)
        if needs_teacher and cfg.teacher.kind in ("hf", "vllm"):
            _exists("teacher.path", cfg.teacher.path)
        if cfg.cluster.num_gpus == 0 and "vllm" in (cfg.rollout.engine, cfg.teacher.kind):
            raise ManifestError("rollout.engine / teacher.kind: vllm needs GPUs (cluster.num_gpus > 0); "
                                "use 'hf' on CPU")
    if "vllm" in (cfg.rollout.engine, cfg.teacher.kind):
        # The adapters exist and are contract-tested (actors/vllm_engine.py, teachers/vllm_teacher.py),
        # but the driver does not place them yet: refuse rather than silently run the HF engine.
        raise ManifestError("rollout.engine / teacher.kind: 'vllm' is not wired into the driver yet; "
                            "use 'hf' (see docs/vllm.md)")
    from launch.capabilities import check_loss  # the loss registry is heavier; import late
    check_loss(cfg)
