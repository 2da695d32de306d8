"""The checks a type system cannot express, run on a loaded manifest before any work. They read the
manifest and never change it (launch/derived.py:resolve writes in what they accept); the loss against
the teachers is launch/capabilities.py's, the layout against the GPUs launch/placement.py's."""
from __future__ import annotations

from pathlib import Path

from actors.kinds import ENGINE_KINDS, engine_kind
from launch.capabilities import check_loss, configured_loss
from launch.config import ExperimentConfig, ManifestError
from launch.derived import pipeline_unit, reference_rows, rows_per_step, sampling_spec
from launch.evaluation import eval_set_specs
from launch.placement import check_resources
from launch.routing import check_teachers, teacher_specs
from opd.weight_sync.transports import TRANSPORTS, default_transport
from teachers.kinds import TEACHER_KINDS, kind_of, kinds_where


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
    for t in teacher_specs(cfg):
        _choice(f"{t.key}.kind", t.config.kind, (*TEACHER_KINDS, "none"))
        _choice(f"{t.key}.full_vocab_transport", t.config.full_vocab_transport, ("auto", "logprobs", "hidden_states"))
        _positive(f"{t.key}.num_actors", t.config.num_actors)
        _positive(f"{t.key}.max_tokens_per_batch", t.config.max_tokens_per_batch)
        _positive(f"{t.key}.max_logprobs_transport_gb", t.config.max_logprobs_transport_gb)
    _choice("rollout.engine", cfg.rollout.engine, ENGINE_KINDS)
    threads = cfg.cluster.threads_per_actor
    if threads != "auto" and not (isinstance(threads, int) and not isinstance(threads, bool) and threads > 0):
        raise ManifestError(f"cluster.threads_per_actor: {threads!r} is not a positive number of threads or auto")
    _choice("learner.zero_stage", cfg.learner.zero_stage, (0, 1, 2, 3))
    _choice("learner.optimizer", cfg.learner.optimizer, ("adamw", "sgd"))
    fused_head = str(cfg.learner.fused_head).lower()  # YAML reads true/false as booleans
    _choice("learner.fused_head", fused_head, ("auto", "true", "false"))
    if fused_head == "true" and cfg.learner.zero_stage == 3:
        raise ManifestError("learner.fused_head: true needs the whole output layer on every rank; ZeRO stage 3 "
                            "partitions it (use auto or false with learner.zero_stage: 3)")
    _choice("learner.teacher_head_thread", str(cfg.learner.teacher_head_thread).lower(), ("auto", "true", "false"))
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
    eval_set_specs(cfg)
    _positive("eval.verify_timeout_s", cfg.eval.verify_timeout_s)
    _positive("rollout.temperature", cfg.rollout.temperature)
    stop = cfg.eval.stop_at_accuracy
    if stop is not None and not (0 < stop <= 1 and cfg.eval.interval > 0):
        raise ManifestError(f"eval.stop_at_accuracy: {stop} needs a value in (0, 1] and eval.interval > 0 "
                            f"(eval.interval is {cfg.eval.interval})")

    _positive("learner.updates_per_step", cfg.learner.updates_per_step)
    _choice("loss.reduction", cfg.loss.reduction, ("token_mean", "sample_mean"))
    configured_loss(cfg)  # it must build before a step's rows are counted: an SFT mix adds reference rows
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
        k, tc, kind = t.key, t.config, kind_of(t.config)
        if needs_teacher and kind is None:
            raise ManifestError(f"{k}.kind: algorithm 'opd' needs a teacher ({kinds_where()})")
        if needs_teacher and not kind.student_weights and not tc.path:
            raise ManifestError(f"{k}.path: required for {k}.kind {tc.kind!r}")
        if tc.live and not (kind and kind.follows_student):
            raise ManifestError(f"{k}.live: only a self-teacher ({k}.kind: {kinds_where(follows_student=True)}) "
                                "can follow live weights")
    if cfg.cluster.mode == "local":
        _check_local_gpus(cfg.cluster.num_gpus)
    _check_cluster(cfg)
    _check_engines(cfg)
    _check_overlap(cfg)
    _check_pipeline(cfg)
    check_resources(cfg)
    check_loss(cfg)


def _run_keys(cfg: ExperimentConfig) -> None:
    """run.resume as true / false / "auto"; a run.name that stays under run.output_dir (its folder is
    emptied on overwrite)."""
    value = cfg.run.resume.lower() if isinstance(cfg.run.resume, str) else cfg.run.resume
    if not (isinstance(value, bool) or value in ("true", "false", "auto")):
        raise ManifestError(f"run.resume: {cfg.run.resume!r} is not one of true, false, auto")
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
    _choice("sync.backend", cfg.sync.backend, ("auto", *TRANSPORTS))
    _positive("sync.close_timeout_s", cfg.sync.close_timeout_s)
    on_gpu = cfg.cluster.num_gpus > 0
    if cfg.sync.backend != "auto" and TRANSPORTS[cfg.sync.backend].gpus and not on_gpu:
        raise ManifestError(f"sync.backend: {cfg.sync.backend!r} moves weights between GPUs; with "
                            f"cluster.num_gpus: 0 use {default_transport(False, False).name} (or auto)")
    if cfg.cluster.colocate and not on_gpu:
        raise ManifestError("cluster.colocate: shares the learner's GPUs with the rollout engines; "
                            "it needs cluster.num_gpus > 0")
    if cfg.cluster.colocate and cfg.rollout.num_actors != cfg.learner.num_ranks:
        raise ManifestError(f"rollout.num_actors: {cfg.rollout.num_actors}, but colocated engines sit one per "
                            f"learner GPU: set it to learner.num_ranks ({cfg.learner.num_ranks})")
    _check_colocation_layout(cfg)
    engine = engine_kind(cfg.rollout.engine)
    sides = [("rollout", engine.vllm, cfg.rollout.vllm)] + [
        (t.key, bool(kind_of(t.config) and kind_of(t.config).vllm), t.config.vllm) for t in teacher_specs(cfg)]
    for side, vllm, v in sides:
        if not vllm:
            continue
        _positive(f"{side}.vllm.tensor_parallel_size", v.tensor_parallel_size)
        if v.max_model_len is not None:
            _positive(f"{side}.vllm.max_model_len", v.max_model_len)
        _positive(f"{side}.vllm.max_logprobs", v.max_logprobs)
        if v.dtype is not None:
            _choice(f"{side}.vllm.dtype", v.dtype, ("float32", "bfloat16", "float16"))
        if v.gpu_memory_utilization is not None and not 0 < v.gpu_memory_utilization <= 1:
            raise ManifestError(f"{side}.vllm.gpu_memory_utilization: must be in (0, 1], got {v.gpu_memory_utilization}")
    if engine.vllm:
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
    engine = engine_kind(cfg.rollout.engine)
    t = TRANSPORTS.get(cfg.sync.backend)  # None: auto, which fits the layout
    if engine.receiver == "vllm" and t and t.colocated is not None and t.colocated != cfg.cluster.colocate:
        raise ManifestError(t.layout_problem)
    if cfg.cluster.colocate and engine.gpus(cfg.rollout) > 1:
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
    live = [t.key for t in teacher_specs(cfg) if t.config.live]
    if cfg.algorithm == "opd" and live:
        raise ManifestError(f"rollout.max_lag: 1 with {live[0]}.live: true is refused: the live self-teacher would "
                            "score a rollout with weights a version newer than the ones that sampled it; "
                            f"set rollout.max_lag: 0 or {live[0]}.live: false")


def _check_pipeline(cfg: ExperimentConfig) -> None:
    """rollout.pipeline_chunks > 1 (launch/pipeline.py) splits one on-policy OPD step of one optimizer update
    into chunks of whole micro-batches; everything else keeps 1."""
    c = cfg.rollout.pipeline_chunks
    _positive("rollout.pipeline_chunks", c)
    if c == 1:
        return
    why = None
    if cfg.algorithm != "opd":
        why = (f"algorithm {cfg.algorithm!r} is not pipelined (GRPO's advantages are normalised over the whole "
               "step's groups; SFT samples nothing); only opd is")
    elif cfg.rollout.max_lag:
        why = ("rollout.max_lag: 1 already overlaps the next step's sampling and scoring with the learner; "
               "the two are not combined")
    elif cfg.learner.updates_per_step > 1:
        why = (f"learner.updates_per_step: {cfg.learner.updates_per_step} steps on each mini-batch; a pipelined "
               "step accumulates every chunk into one update")
    elif reference_rows(cfg):
        why = "the loss's SFT mix adds reference rows to the step, which the chunks do not carry"
    elif cfg.cluster.colocate:
        why = "cluster.colocate: true puts the engines to sleep during the learner's work, which overlaps them here"
    if why:
        raise ManifestError(f"rollout.pipeline_chunks: {c} is refused: {why}; set rollout.pipeline_chunks: 1")
    units = rows_per_step(cfg) // pipeline_unit(cfg)
    if units < c:
        raise ManifestError(f"rollout.pipeline_chunks: {c} chunks of whole micro-batches need at least {c} of them, "
                            f"but a step has {units} ({rows_per_step(cfg)} rows, {pipeline_unit(cfg)} per micro-batch "
                            "over the learner's ranks); use fewer chunks")
