"""The manifest's schema: every key, its type, its default and what it means, as dataclasses.

Loading (`extends:`, several manifests, `key=value` overrides) is launch/manifest.py; the checks a type
system cannot express, launch/validation.py; values computed from a manifest, launch/derived.py. This
module imports nothing of the project's, so every other module can read the schema.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import MISSING


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
    # torch intra-op threads inside each actor, or auto: the cores (this process's CPU affinity, at most
    # num_cpus in local mode; the smallest node's CPUs in ray mode) over the actors that work at the same
    # time (launch/derived.py:auto_threads), at least 1. A number gives the same float sums on any machine.
    threads_per_actor: Any = "auto"
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
    kind: str = "hf"              # hf | vllm | self (the student's own weights) | none; teachers/kinds.py registers them
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
    engine: str = "hf"            # hf | vllm; actors/kinds.py registers them
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
    # On-policy pipelining inside a step (launch/pipeline.py): the step's rows split into this many chunks,
    # sampled as separate engine calls; the teachers score chunk k as soon as its rollout exists and the
    # learner runs forward and backward on each scored chunk while later ones are scored, all with the
    # step's weights, and steps once after the last (the whole step's token counts). The same gradient as
    # 1 chunk (today's loop, same calls). Refused with max_lag 1, updates_per_step > 1, reference rows,
    # algorithms other than opd and cluster.colocate (launch/validation.py).
    pipeline_chunks: int = 1
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
    # A hidden-state teacher's log-probs made on a second CPU thread of the learner, up to two chunks ahead
    # of the student's loss (the fused path; the same results). auto: where the learner computes on a CPU
    # and its ranks' threads leave as many cores again (one step off or pipelined, at auto's threads).
    teacher_head_thread: str = "auto"  # auto | true | false
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
