"""Experiment manifests: YAML -> typed dataclasses, with errors that name the key.

A manifest may `extends: other.yaml` (relative to itself); several manifests merge left to right
(`opd train arm.yaml cpu.yaml`); `key=value` overrides come last.
Unknown keys, wrong types, missing required values and impossible combinations all stop the run
here, before Ray, models or data are touched.

Paths (model.path, teacher.path, data.train, data.eval, eval.sets[i].data, run.output_dir) are relative to the
directory `opd` is started from: the repository root locally, the job's working directory under
`ray job submit --working-dir`, so the same manifest means the same files on both. They are made
absolute here, so the run's saved manifest says exactly which files it read.
"""
from __future__ import annotations

import difflib
import dataclasses
import glob
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, Optional

import yaml
from omegaconf import MISSING, DictConfig, ListConfig, OmegaConf
from omegaconf.errors import ConfigKeyError, OmegaConfBaseException

from tasks.data import source_kind


@dataclass
class RunConfig:
    name: str = MISSING
    output_dir: str = "runs"
    seed: int = 0
    steps: int = MISSING
    # false: a fresh run (a folder already holding a different run is refused) | true: continue from
    # the newest complete checkpoint in runs/<name>/checkpoints (none is an error) | auto: continue if
    # there is one, else start afresh. Continuing is exact: the same per-step metrics as a run never stopped.
    resume: Any = False
    overwrite: bool = False       # replace whatever runs/<name>/ holds (metrics, checkpoints, final model)


@dataclass
class ClusterConfig:
    mode: str = "local"           # local: start Ray in-process | ray: join a running cluster
    address: Optional[str] = None  # ray mode; None means "auto" (what `ray job submit` sets up)
    num_cpus: int = 2             # local mode: CPUs Ray may use
    num_gpus: int = 0             # GPUs the run may use; 0: everything on CPU
    colocate: bool = False        # rollout engines share the learner's GPUs (asleep during its step)
    placement_timeout_s: float = 120.0  # how long to wait for the cluster to hold the layout
    strategy: str = "PACK"        # Ray placement strategy: PACK | SPREAD | STRICT_PACK | STRICT_SPREAD
    # role -> a custom resource its bundles require, to pin roles to node kinds: {rollout: rollout_node}
    # places rollout engines on nodes started with `ray start --resources '{"rollout_node": 1000}'`.
    node_resources: dict[str, str] = field(default_factory=dict)
    threads_per_actor: int = 1    # torch intra-op threads inside each actor
    # Deadline for every remote call (a step's rollouts, scores, learner step, sync): a rollout engine or
    # teacher that misses it (or dies) is replaced in its slot and its work retried; a learner rank stops the run.
    call_timeout_s: float = 600.0
    connect_timeout_s: float = 30.0  # ray mode: how long cluster.address may take to answer before the run stops
    dashboard: bool = False       # local mode: start Ray's dashboard (local Ray binds to 127.0.0.1 either way)


@dataclass
class VLLMConfig:
    """A vLLM engine's settings (rollout.vllm, teacher.vllm); read only when that side uses vLLM."""
    tensor_parallel_size: int = 1
    gpu_memory_utilization: Optional[float] = None  # default 0.85 on a GPU of its own, 0.4 colocated
    kv_cache_memory_gb: Optional[float] = None  # explicit KV-cache size; CPU runs default to 0.25
    max_model_len: Optional[int] = None  # default: the model's context length
    dtype: Optional[str] = None   # default: model.dtype (the learner sends weights in this dtype)
    max_logprobs: int = 20        # the largest student / teacher top-k it can return
    enforce_eager: bool = False   # skip CUDA graphs (faster start, slower decode)


@dataclass
class LoraConfig:
    """A LoRA student (peft; learner/lora.py): the learner trains rank-r adapters on the frozen model.path.
    Engines receive merged weights of the touched modules; final/ is the merged model, final/adapter the
    adapter. LoRA wants a larger learning rate than full fine-tuning (docs/lora.md)."""
    r: int = 0                    # rank; 0: no LoRA, every weight trains
    # The adapter's output is scaled by alpha / r. Fixed across ranks (LoRA Without Regret's choice), the
    # best learning rate barely moves with r.
    alpha: float = 32.0
    # Linear module names (suffixes, as peft matches them: [q_proj, v_proj]), or [all-linear]: every Linear
    # but the output layer.
    target_modules: list[str] = field(default_factory=lambda: ["all-linear"])
    dropout: float = 0.0          # on the adapter's input, in training only


@dataclass
class ModelConfig:
    path: str = MISSING           # Hugging Face model directory (student)
    dtype: str = "float32"
    trust_remote_code: bool = False  # run the model folder's own Python (a custom architecture or tokenizer)
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class TeacherConfig:
    """`teacher:` (one teacher) or one entry of `teachers:` (several, routed per row: launch/routing.py)."""
    kind: str = "hf"              # hf | vllm | self (the student's own weights) | none
    # teachers: only. Its name in teacher_routing and in its metrics (teacher/<name>/...); `teacher:` is
    # the one teacher and keeps the metric names it always had.
    name: Optional[str] = None
    # teachers: only. Multiplies the loss weight of every token of this teacher's rows; the reduction's
    # denominators stay the global token (or sample) counts, so 1 everywhere is the plain mean
    # (launch/routing.py says it exactly).
    weight: float = 1.0
    path: Optional[str] = None    # required for hf / vllm; `self` uses model.path
    prompt_template: str = "{prompt}"  # row fields by name; OPSD puts privileged info here
    # data.chat_template on: the teacher's system message. null: the student's (data.system_prompt);
    # "": none. OPSD with a shared rule: the student has none, the teacher has the rule here.
    system_prompt: Optional[str] = None
    trust_remote_code: bool = False  # as model.trust_remote_code, for teacher.path
    live: bool = False            # self-teacher follows the student's weights every step
    num_actors: int = 1
    # How a full-vocabulary loss gets the teacher's distribution. logprobs: the teacher ships [N, T, V]
    # log-probs. hidden_states: it ships its final hidden states [N, T, H] and the learner applies the
    # teacher's output layer chunk by chunk inside the loss: same values, H/V of the transport, no
    # [N, T, V] teacher tensor anywhere (HF and self teachers; a plain linear head). auto: hidden_states
    # where the teacher can give them, else logprobs (launch/capabilities.py resolves it before work).
    full_vocab_transport: str = "auto"
    # The log-prob transport ships N x T x V float32 a step; above this many GB (at rollout.max_new_tokens)
    # the run is refused before work, naming the size (use hidden_states, or fewer rows or tokens).
    max_logprobs_transport_gb: float = 8.0
    # HF and self teachers score rows grouped to at most this many padded tokens a forward pass (rows of
    # like length together), and apply the output layer to a few positions at a time: memory is set by
    # this budget, not by rows x length x vocabulary (docs/long-responses.md).
    max_tokens_per_batch: int = 16384
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class TeacherRoutingConfig:
    """Which of `teachers:` scores a row: the row's `field` value, looked up in `routes` (value -> teacher
    name; without an entry, the value itself must be a teacher's name), else `default`."""
    field: Optional[str] = None   # a data field, e.g. data_source; null: every row goes to default
    routes: dict[str, str] = dataclasses.field(default_factory=dict)  # `field` is a key here
    default: Optional[str] = None  # a teacher's name; null: a row that names no teacher is an error


@dataclass
class RolloutConfig:
    engine: str = "hf"            # hf | vllm
    num_actors: int = 1
    prompts_per_step: int = 16
    samples_per_prompt: int = 4
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    # Extra stops besides every end id the tokenizer and generation_config.json name (both engines stop
    # at the same set): token ids, or strings that are one token (e.g. "<|im_end|>").
    stop: list[Any] = field(default_factory=list)
    # How many weight versions the sampling policy may trail the learner. 0: sample each step with the
    # newest weights (strictly sequential steps). 1: the engines sample step n+1 while the teacher scores
    # and the learner trains step n (launch/overlap.py); each batch is then one version stale, which
    # sampled_token_rkl's importance ratio corrects token by token. Ignored by algorithm: sft (no
    # rollouts); refused with cluster.colocate and with a live self-teacher.
    max_lag: int = 0
    vllm: VLLMConfig = field(default_factory=VLLMConfig)


@dataclass
class SyncConfig:
    """Weight sync, learner -> rollout engines (and a live self-teacher), after every step (SFT: only
    before an evaluation, the only time its engines are read)."""
    backend: str = "auto"         # auto | gloo | nccl | ipc. auto: gloo on CPU, ipc when colocated,
                                  # else nccl. HF engines always receive over gloo.
    # How long closing a transfer group may wait for a receiver (when an engine is replaced, at the end of
    # a run). One that has not closed by then (stuck in a broadcast that will never finish) is replaced.
    close_timeout_s: float = 30.0


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
    # auto: the loss takes the student's final hidden states and output layer and makes the logits chunk
    # by chunk (no [M, V] logits or their gradient held; the loss runs once per chunk, not twice) where
    # the model's head is a plain Linear and zero_stage < 3; else from logits. true: that path or an error.
    fused_head: str = "auto"      # auto | true | false
    # Optimizer updates per step: the step's rows split, in order, into this many equal mini-batches, each
    # reduced over its own global counts and stepped on (slime: rollout rows / --global-batch-size). The
    # behaviour log-probs stay the rollout's, so later updates are off-policy by the earlier ones (an
    # importance-ratio loss such as sampled_token_rkl corrects that). The LR schedule counts updates.
    updates_per_step: int = 1
    # Memory at long lengths (docs/long-responses.md). gradient_checkpointing: recompute each layer's
    # activations in backward instead of keeping them. max_tokens_per_micro_batch: micro-batches formed
    # to this many padded tokens, rows grouped by length, each padded only to its own longest row, and
    # rows spread over ranks by tokens; micro_batch_size is then unused. null: micro-batches of
    # micro_batch_size rows in order (padded to the step's longest completion).
    gradient_checkpointing: bool = False
    max_tokens_per_micro_batch: Optional[int] = None
    # A step whose loss or gradient norm is not finite is skipped (no weight change, no sync) and counted
    # (train/skipped_nonfinite); this many in a row stop the run.
    max_nonfinite_steps: int = 3


@dataclass
class ReferenceConfig:
    """Reference rows for an `sft` component of a weighted_sum loss in an OPD run (the SFT-stabilised
    student): one row per prompt of the step, trained in the same optimizer step as the distillation."""
    source: str = "dataset"       # dataset: the row's answer (data.answer_field) then EOS
                                  # teacher: a completion the teacher samples from its own prompt
    temperature: float = 1.0      # the teacher's sampling temperature (source: teacher)
    max_new_tokens: Optional[int] = None  # source: teacher; default rollout.max_new_tokens


@dataclass
class KLToReferenceConfig:
    """coef * KL estimator against a frozen reference model, on every on-policy token (slime's --use-kl-loss
    --kl-loss-coef --kl-loss-type); losses/kl_reference.py says what each estimator's gradient is. The
    reference lives in each learner rank (a frozen copy that scores the sampled tokens per micro-batch)."""
    coef: float = 0.0             # 0: off, nothing loaded
    estimator: str = "low_var_kl"  # k1 | k2 | k3 | low_var_kl (slime's default is k1: zero expected gradient)
    path: Optional[str] = None    # the reference model; null: model.path (the student's initial weights)


@dataclass
class LossConfig:
    name: str = "sampled_token_rkl"
    params: dict[str, Any] = field(default_factory=dict)
    reference: ReferenceConfig = field(default_factory=ReferenceConfig)
    # token_mean: sum over the (mini-)batch's tokens / its token count. sample_mean: each sample's token
    # mean, then the mean over its samples (slime without --calculate-per-token-loss, the paper's scripts).
    # Either over global counts (any rank / micro-batch split); SFT-mix reference rows keep their own.
    reduction: str = "token_mean"
    kl_to_reference: KLToReferenceConfig = field(default_factory=KLToReferenceConfig)


@dataclass
class DataConfig:
    # .jsonl / .parquet file, a glob of them ("data/part-*.parquet"), a folder written by the datasets
    # library's save_to_disk, or a hub dataset name ("org/name" or "org/name:split") where the hub is reachable
    train: str = MISSING
    eval: Optional[str] = None
    prompt_field: str = "prompt"
    answer_field: str = "answer"  # what the verifier compares against
    sft_field: Optional[str] = None  # the text SFT (and loss.reference.source: dataset) trains on; null: answer_field
    # The student's prompt, row fields by name. With chat_template on it is the content of the last user
    # turn ({prompt} is that turn as the row has it).
    prompt_template: str = "{prompt}"
    # Chat models: render prompts with the tokenizer's chat template (apply_chat_template with
    # add_generation_prompt) instead of as plain text. A row's conversation is its messages_field (a list
    # of {role, content}) or else one user turn holding prompt_field.
    chat_template: bool = False
    chat_template_kwargs: dict[str, Any] = field(default_factory=dict)  # e.g. {enable_thinking: false}
    system_prompt: Optional[str] = None  # a system message for the student (replaces the row's own)
    messages_field: str = "messages"


@dataclass
class EvalSetConfig:
    """One set of eval.sets (launch/evaluation.py); a field left null takes the eval: section's value."""
    data: str = MISSING           # as data.eval: .jsonl or .parquet, same fields and prompt template
    name: Optional[str] = None    # logged as eval/<name>/accuracy, eval/<name>/pass@k; default: data's file stem
    size: Optional[int] = None
    samples_per_prompt: Optional[int] = None
    max_new_tokens: Optional[int] = None
    temperature: Optional[float] = None
    top_p: Optional[float] = None
    verifier: Optional[str] = None
    # data.chat_template on: this set's kwargs, merged over data.chat_template_kwargs (e.g. thinking on for
    # one set only)
    chat_template_kwargs: Optional[dict[str, Any]] = None


@dataclass
class EvalConfig:
    interval: int = 10            # steps between evaluations (0: only at start and end)
    size: int = 128
    verifier: str = "exact_match"
    max_new_tokens: Optional[int] = None  # default: rollout.max_new_tokens
    temperature: float = 0.0      # 0 = greedy
    top_p: float = 1.0
    # Samples per eval prompt (n): eval/accuracy is the mean over all of them (avg@n), eval/pass@k is
    # logged for k = 1, 2, 4, ... <= n and n. 1: one answer per prompt, as before this key existed.
    samples_per_prompt: int = 1
    # math_equiv's limit per answer, in eval and in GRPO rewards: an answer still being compared after
    # this many seconds scores 0 (its worker process is killed; tasks/verify_worker.py).
    verify_timeout_s: float = 5.0
    # Several evaluation sets, each reported apart; the first is the headline eval/accuracy. Without
    # them, data.eval is the one set. e.g. [{name: aime24, data: aime24.jsonl, samples_per_prompt: 16,
    # max_new_tokens: 16384}, {name: math500, data: math500.jsonl}]. Refused together with data.eval.
    sets: list[EvalSetConfig] = field(default_factory=list)
    # Stop the run at the first evaluation whose accuracy is at least this (null: run every step): the
    # final model and summary are that step's. The demo's student warm start stops at 0.2, so it is
    # partly competent whatever its seed (where an SFT run leaves its loss plateau varies by 100+ steps).
    stop_at_accuracy: Optional[float] = None


@dataclass
class CheckpointConfig:
    interval: int = 0             # steps between checkpoints (0: none; final/ is always written)
    keep: int = 2                 # complete checkpoints kept (each is written to stepN.tmp, sealed, renamed)


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
    # Several teachers, each scoring the rows teacher_routing gives it (instead of `teacher:`, not beside it).
    teachers: list[TeacherConfig] = field(default_factory=list)
    teacher_routing: TeacherRoutingConfig = field(default_factory=TeacherRoutingConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    sync: SyncConfig = field(default_factory=SyncConfig)
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
    from launch.routing import teacher_specs
    read = {"model.path", "data.train", "data.eval"}
    if cfg.algorithm == "opd":
        read |= {f"{t.key}.path" for t in teacher_specs(cfg) if t.config.kind in ("hf", "vllm")}
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


def _choice(key: str, value, choices) -> None:
    if value not in choices:
        raise ManifestError(f"{key}: {value!r} is not one of {list(choices)}")


def _positive(key: str, value, allow_zero=False) -> None:
    if value < 0 or (value == 0 and not allow_zero):
        raise ManifestError(f"{key}: must be {'>= 0' if allow_zero else '> 0'}, got {value}")


def validate(cfg: ExperimentConfig) -> None:
    """Checks a type system cannot express (file paths are load_manifest's)."""
    _choice("algorithm", cfg.algorithm, ("opd", "sft", "grpo"))
    _choice("cluster.mode", cfg.cluster.mode, ("local", "ray"))
    from launch.routing import check_teachers, teacher_specs  # several teachers: each checked as `teacher:` is
    for t in teacher_specs(cfg):
        _choice(f"{t.key}.kind", t.config.kind, ("hf", "vllm", "self", "none"))
        _choice(f"{t.key}.full_vocab_transport", t.config.full_vocab_transport, ("auto", "logprobs", "hidden_states"))
        _positive(f"{t.key}.num_actors", t.config.num_actors)
        _positive(f"{t.key}.max_tokens_per_batch", t.config.max_tokens_per_batch)
        _positive(f"{t.key}.max_logprobs_transport_gb", t.config.max_logprobs_transport_gb)
    _choice("rollout.engine", cfg.rollout.engine, ("hf", "vllm"))
    _choice("learner.zero_stage", cfg.learner.zero_stage, (0, 1, 2, 3))
    _choice("learner.optimizer", cfg.learner.optimizer, ("adamw", "sgd"))
    cfg.learner.fused_head = str(cfg.learner.fused_head).lower()  # YAML reads true/false as booleans
    _choice("learner.fused_head", cfg.learner.fused_head, ("auto", "true", "false"))
    if cfg.learner.fused_head == "true" and cfg.learner.zero_stage == 3:
        raise ManifestError("learner.fused_head: true needs the whole output layer on every rank; ZeRO stage 3 "
                            "partitions it (use auto or false with learner.zero_stage: 3)")
    if cfg.learner.max_tokens_per_micro_batch is not None:
        _positive("learner.max_tokens_per_micro_batch", cfg.learner.max_tokens_per_micro_batch)
    _choice("learner.schedule", cfg.learner.schedule, ("cosine", "linear", "constant"))
    _choice("model.dtype", cfg.model.dtype, ("float32", "bfloat16", "float16"))
    for key in ("run.steps", "rollout.prompts_per_step", "rollout.samples_per_prompt",
                "rollout.max_new_tokens", "rollout.num_actors", "learner.num_ranks",
                "learner.micro_batch_size"):
        section, name = key.split(".")
        _positive(key, getattr(getattr(cfg, section), name))
    _positive("learner.lr", cfg.learner.lr)
    _run_keys(cfg)
    _check_lora(cfg)
    for key, value in (("eval.interval", cfg.eval.interval), ("checkpoint.interval", cfg.checkpoint.interval)):
        _positive(key, value, allow_zero=True)
    for key, value in (("checkpoint.keep", cfg.checkpoint.keep), ("learner.max_nonfinite_steps",
                       cfg.learner.max_nonfinite_steps), ("cluster.call_timeout_s", cfg.cluster.call_timeout_s),
                       ("cluster.connect_timeout_s", cfg.cluster.connect_timeout_s)):
        _positive(key, value)
    if not 0 < cfg.rollout.top_p <= 1:
        raise ManifestError(f"rollout.top_p: must be in (0, 1], got {cfg.rollout.top_p}")
    from launch.evaluation import eval_set_specs  # every eval.* value and set, with its key
    eval_set_specs(cfg)
    _positive("eval.verify_timeout_s", cfg.eval.verify_timeout_s)
    _positive("rollout.temperature", cfg.rollout.temperature)
    stop = cfg.eval.stop_at_accuracy
    if stop is not None and not (0 < stop <= 1 and cfg.eval.interval > 0):
        raise ManifestError(f"eval.stop_at_accuracy: {stop} needs a value in (0, 1] and eval.interval > 0 "
                            f"(eval.interval is {cfg.eval.interval})")

    _positive("learner.updates_per_step", cfg.learner.updates_per_step)
    _choice("loss.reduction", cfg.loss.reduction, ("token_mean", "sample_mean"))
    rows, updates = rows_per_step(cfg), cfg.learner.updates_per_step
    if rows % updates:
        raise ManifestError(f"learner.updates_per_step: {rows} rows per step do not split into {updates} equal "
                            f"mini-batches; use a divisor of {rows}")
    rows //= updates  # the rows of one optimizer update
    per_pass = cfg.learner.micro_batch_size * cfg.learner.num_ranks
    if cfg.learner.max_tokens_per_micro_batch is not None:
        if rows < cfg.learner.num_ranks:
            raise ManifestError(f"learner.num_ranks: {cfg.learner.num_ranks} ranks but {rows} rows per update; "
                                "every rank needs a row")
    elif rows % per_pass:
        per = "per step" if updates == 1 else f"per update (learner.updates_per_step: {updates})"
        raise ManifestError(f"learner.micro_batch_size: {rows} rows {per} do not split into "
                            f"{cfg.learner.num_ranks} ranks x micro-batches of {cfg.learner.micro_batch_size}")
    if cfg.learner.grad_accum is not None and cfg.learner.grad_accum != rows // per_pass:
        raise ManifestError(f"learner.grad_accum: {cfg.learner.grad_accum} but {rows} rows / "
                            f"({per_pass} rows per pass) = {rows // per_pass}; remove it or make it match")
    kl = cfg.loss.kl_to_reference
    if kl.coef > 0 and cfg.algorithm == "sft":
        raise ManifestError("loss.kl_to_reference.coef: algorithm 'sft' trains on reference rows only, which the "
                            "KL-to-reference penalty skips; set it to 0")

    check_teachers(cfg)
    needs_teacher = cfg.algorithm == "opd"
    for t in teacher_specs(cfg):
        k, tc = t.key, t.config
        if needs_teacher and tc.kind == "none":
            raise ManifestError(f"{k}.kind: algorithm 'opd' needs a teacher (hf, vllm or self)")
        if needs_teacher and tc.kind in ("hf", "vllm") and not tc.path:
            raise ManifestError(f"{k}.path: required for {k}.kind {tc.kind!r}")
        if tc.live and tc.kind != "self":
            raise ManifestError(f"{k}.live: only a self-teacher ({k}.kind: self) can follow live weights")
    if cfg.cluster.mode == "local":
        _check_local_gpus(cfg.cluster.num_gpus)
    _check_cluster(cfg)
    _check_engines(cfg)
    _check_overlap(cfg)
    from launch.placement import check_resources  # GPU arithmetic for the layout the manifest asks for
    check_resources(cfg)
    from launch.capabilities import check_loss  # the loss registry is heavier; import late
    check_loss(cfg)


def _run_keys(cfg: ExperimentConfig) -> None:
    """run.resume as true / false / "auto"; a run.name that stays under run.output_dir (its folder is
    emptied on overwrite)."""
    value = cfg.run.resume.lower() if isinstance(cfg.run.resume, str) else cfg.run.resume
    if not (isinstance(value, bool) or value in ("true", "false", "auto")):
        raise ManifestError(f"run.resume: {cfg.run.resume!r} is not one of true, false, auto")
    cfg.run.resume = {"true": True, "false": False}.get(value, value) if isinstance(value, str) else value
    parts = Path(cfg.run.name).parts
    if not parts or Path(cfg.run.name).is_absolute() or any(p in (".", "..") for p in cfg.run.name.split("/")):
        raise ManifestError(f"run.name: {cfg.run.name!r} must be a folder name under run.output_dir (no '..', "
                            "not absolute)")


def _check_lora(cfg: ExperimentConfig) -> None:
    lora = cfg.model.lora
    if lora.r == 0:
        return
    _positive("model.lora.r", lora.r)
    _positive("model.lora.alpha", lora.alpha)
    if not 0 <= lora.dropout < 1:
        raise ManifestError(f"model.lora.dropout: must be in [0, 1), got {lora.dropout}")
    if not lora.target_modules:
        raise ManifestError("model.lora.target_modules: empty; name Linear modules ([q_proj, v_proj]) or [all-linear]")


def _check_local_gpus(wanted: int) -> None:
    if wanted == 0:
        return
    import torch
    have = torch.cuda.device_count()
    if have < wanted:
        raise ManifestError(f"cluster.num_gpus: {wanted} requested but this machine has {have} CUDA device(s); "
                            "set cluster.num_gpus: 0 to run everything on the CPU")


def _check_cluster(cfg: ExperimentConfig) -> None:
    _choice("cluster.strategy", cfg.cluster.strategy, ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"))
    for role in cfg.cluster.node_resources:
        _choice("cluster.node_resources", role, ("learner", "rollout", "teacher"))
    if cfg.cluster.placement_timeout_s <= 0:
        raise ManifestError(f"cluster.placement_timeout_s: must be > 0, got {cfg.cluster.placement_timeout_s}")


def _check_engines(cfg: ExperimentConfig) -> None:
    _choice("sync.backend", cfg.sync.backend, ("auto", "gloo", "nccl", "ipc"))
    _positive("sync.close_timeout_s", cfg.sync.close_timeout_s)
    on_gpu = cfg.cluster.num_gpus > 0
    if cfg.sync.backend in ("nccl", "ipc") and not on_gpu:
        raise ManifestError(f"sync.backend: {cfg.sync.backend!r} moves weights between GPUs; with "
                            "cluster.num_gpus: 0 use gloo (or auto)")
    if cfg.cluster.colocate and not on_gpu:
        raise ManifestError("cluster.colocate: shares the learner's GPUs with the rollout engines; "
                            "it needs cluster.num_gpus > 0")
    if cfg.cluster.colocate and cfg.rollout.num_actors != cfg.learner.num_ranks:
        raise ManifestError(f"rollout.num_actors: {cfg.rollout.num_actors}, but colocated engines sit one per "
                            f"learner GPU: set it to learner.num_ranks ({cfg.learner.num_ranks})")
    _check_colocation_layout(cfg)
    from launch.routing import teacher_specs
    sides = [("rollout", cfg.rollout.engine, cfg.rollout.vllm)] + [(t.key, t.config.kind, t.config.vllm)
                                                                 for t in teacher_specs(cfg)]
    for side, engine, v in sides:
        if engine != "vllm":
            continue
        _positive(f"{side}.vllm.tensor_parallel_size", v.tensor_parallel_size)
        if v.max_model_len is not None:
            _positive(f"{side}.vllm.max_model_len", v.max_model_len)
        _positive(f"{side}.vllm.max_logprobs", v.max_logprobs)
        if v.dtype is not None:
            _choice(f"{side}.vllm.dtype", v.dtype, ("float32", "bfloat16", "float16"))
        if v.gpu_memory_utilization is not None and not 0 < v.gpu_memory_utilization <= 1:
            raise ManifestError(f"{side}.vllm.gpu_memory_utilization: must be in (0, 1], got {v.gpu_memory_utilization}")
    if cfg.rollout.engine == "vllm":
        from opd.vllm_llm import logprobs_mode_for
        try:
            logprobs_mode_for(sampling_spec(cfg))
        except ValueError as e:
            raise ManifestError(str(e)) from None
        if (cfg.rollout.vllm.max_model_len or 1 << 62) < cfg.rollout.max_new_tokens + 1:
            raise ManifestError(f"rollout.vllm.max_model_len: {cfg.rollout.vllm.max_model_len} leaves no room for "
                                f"a prompt and rollout.max_new_tokens {cfg.rollout.max_new_tokens}")


def _check_colocation_layout(cfg: ExperimentConfig) -> None:
    """Layouts that pass Ray's arithmetic and fail on the GPUs themselves (only vLLM engines receive
    over nccl / ipc; HF receivers always use gloo)."""
    vllm_rollout = cfg.rollout.engine == "vllm"
    if cfg.cluster.colocate and cfg.sync.backend == "nccl" and vllm_rollout:
        raise ManifestError("sync.backend: nccl with cluster.colocate: true puts two NCCL ranks (learner and engine) "
                            "on one GPU, which NCCL refuses; use ipc (or auto) when colocated")
    if cfg.sync.backend == "ipc" and not cfg.cluster.colocate and vllm_rollout:
        raise ManifestError("sync.backend: ipc shares CUDA memory within one GPU, so it needs the engines on the "
                            "learner's GPUs (cluster.colocate: true); use nccl (or auto) for engines on GPUs of their own")
    if cfg.cluster.colocate and vllm_rollout and cfg.rollout.vllm.tensor_parallel_size > 1:
        raise ManifestError(f"rollout.vllm.tensor_parallel_size: {cfg.rollout.vllm.tensor_parallel_size} with "
                            "cluster.colocate: true, but a colocated engine shares one learner GPU (half of it); "
                            "use tensor_parallel_size 1 or cluster.colocate: false")


def _check_overlap(cfg: ExperimentConfig) -> None:
    """rollout.max_lag is 0 or 1. With 1, the engines generate during the learner step, so they cannot
    sleep then (colocate); and a live self-teacher would score a rollout with weights newer than those
    that sampled it, which is refused rather than given a meaning. SFT samples nothing: ignored there."""
    lag = cfg.rollout.max_lag
    if lag not in (0, 1):
        raise ManifestError(f"rollout.max_lag: {lag} is not allowed; use 0 (sample with the newest weights) "
                            "or 1 (sample the next step while the learner trains this one)")
    if lag == 0 or cfg.algorithm == "sft":
        return
    if cfg.cluster.colocate:
        raise ManifestError("rollout.max_lag: 1 needs the engines awake during the learner step, but "
                            "cluster.colocate: true puts them to sleep then; set rollout.max_lag: 0")
    from launch.routing import teacher_specs
    live = [t.key for t in teacher_specs(cfg) if t.config.live]
    if cfg.algorithm == "opd" and live:
        raise ManifestError(f"rollout.max_lag: 1 with {live[0]}.live: true is refused: the live self-teacher would "
                            "score a rollout with weights a version newer than the ones that sampled it; "
                            f"set rollout.max_lag: 0 or {live[0]}.live: false")


def reference_rows(cfg: ExperimentConfig) -> int:
    """Reference rows an OPD step adds for an SFT component of its loss (one per prompt), else 0."""
    if cfg.algorithm != "opd":
        return 0
    from launch.capabilities import build_configured_loss
    try:
        return cfg.rollout.prompts_per_step if build_configured_loss(cfg).needs.reference_rows else 0
    except ValueError:  # a bad loss is check_loss's to report
        return 0


def rows_per_step(cfg: ExperimentConfig) -> int:
    """Rows of one step's TrainBatch: SFT rows, or samples (plus reference rows for an SFT mix)."""
    if cfg.algorithm == "sft":
        return cfg.rollout.prompts_per_step
    return cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt + reference_rows(cfg)


def sampling_spec(cfg: ExperimentConfig, return_topk: int = 0):
    """The training rollouts' SamplingSpec."""
    from opd.contracts import SamplingSpec
    rc = cfg.rollout
    return SamplingSpec(max_new_tokens=rc.max_new_tokens, temperature=rc.temperature, top_p=rc.top_p,
                        return_topk=return_topk)
