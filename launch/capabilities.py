"""Does the configured loss fit the algorithm, and can the configured teacher supply what it needs?
Checked before any work, beside launch/validation.py (which builds the loss before it counts a step's rows,
and calls check_loss last); nothing here changes the manifest."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from actors.kinds import engine_kind
from launch.config import ManifestError
from launch.routing import teacher_specs
from teachers.kinds import capabilities_for, kind_of, kinds_where


def build_configured_loss(cfg):
    """The loss as the learner builds it (learner/worker.py), KL-to-reference penalty included."""
    from losses import build_loss
    kl = cfg.loss.kl_to_reference
    return build_loss(cfg.loss.name, dict(cfg.loss.params), temperature=cfg.rollout.temperature,
                      kl_coef=kl.coef, kl_estimator=kl.estimator)


def configured_loss(cfg):
    """The configured loss, built; a ManifestError saying why where it does not build (loss.name,
    loss.params, loss.kl_to_reference)."""
    try:
        return build_configured_loss(cfg)
    except ValueError as e:
        raise ManifestError(str(e)) from None


def check_loss(cfg) -> None:
    needs = configured_loss(cfg).needs
    if cfg.algorithm == "sft" and (needs.needs_teacher or not needs.reference_rows):
        raise ManifestError(f"loss.name: algorithm 'sft' trains on reference tokens; {cfg.loss.name!r} "
                            "is not an SFT loss (use loss.name: sft)")
    if cfg.algorithm == "grpo" and not needs.advantages:
        raise ManifestError(f"loss.name: algorithm 'grpo' needs a reward loss (grpo), got {cfg.loss.name!r}")
    if cfg.algorithm == "opd" and not needs.needs_teacher:
        raise ManifestError(f"loss.name: {cfg.loss.name!r} uses no teacher; algorithm 'opd' needs a distillation loss")
    ref = cfg.loss.reference
    if ref.source not in ("dataset", "teacher"):
        raise ManifestError(f"loss.reference.source: {ref.source!r} is not one of ['dataset', 'teacher']")
    if cfg.algorithm == "grpo" and needs.reference_rows:
        raise ManifestError(f"loss.params: {cfg.loss.name!r} has an sft component; reference rows are added to "
                            "algorithm 'opd' steps only")
    specs = teacher_specs(cfg)
    if cfg.algorithm == "opd" and needs.reference_rows and ref.source == "teacher":
        if len(specs) > 1:
            raise ManifestError("loss.reference.source: 'teacher' with several teachers is not supported (which one "
                                "writes a prompt's reference row?); use source: dataset")
        if not _in_hf_model(specs[0].config):
            raise ManifestError(f"loss.reference.source: 'teacher' samples from an HF teacher; {specs[0].key}.kind is "
                                f"{specs[0].config.kind!r} (use source: dataset, or {specs[0].key}.kind: hf)")
        if ref.temperature < 0:
            raise ManifestError(f"loss.reference.temperature: must be >= 0, got {ref.temperature}")
    max_topk = engine_kind(cfg.rollout.engine).max_topk(cfg.rollout)  # None: no limit (an HF engine)
    if max_topk is not None and needs.student_topk > max_topk:
        raise ManifestError(f"rollout.vllm.max_logprobs: {cfg.rollout.vllm.max_logprobs}, but {cfg.loss.name!r} "
                            f"needs the student's top-{needs.student_topk}; raise it")
    for spec in specs:  # each teacher's transport checked, `auto` as it resolves (launch/derived.py:resolve)
        tc = spec.config
        transport = auto_transport(cfg, needs, tc) if tc.full_vocab_transport == "auto" else tc.full_vocab_transport
        if transport == "hidden_states":
            _check_hidden_transport(cfg, needs, spec)
        elif transport == "logprobs" and cfg.algorithm == "opd" and needs.teacher_full:
            _check_logprobs_transport(cfg, tc)
    if needs.needs_teacher:
        for spec in specs:  # each teacher must serve the loss by itself: it alone scores its rows
            tc = spec.config
            try:
                caps = capabilities_for(tc.kind, tc.vllm.max_logprobs, on_gpu=cfg.cluster.num_gpus > 0)
            except ValueError as e:
                raise ManifestError(str(e)) from None
            check_built_teacher(cfg, caps, spec)


def check_built_teacher(cfg, caps, spec=None) -> None:
    """The configured loss against one teacher's capabilities: before any work from what the manifest
    says, and again from each teacher as built (a vLLM engine picks its runner only when it starts).
    `spec`: which of the run's teachers (launch/routing.py; default the one `teacher:`)."""
    from losses import check_teacher
    spec = spec or teacher_specs(cfg)[0]
    loss = build_configured_loss(cfg)
    why = caps.limits if caps.limits and loss.needs.teacher_at_student_topk else ""  # the reason is about given ids
    name = f"a {spec.config.kind!r} teacher" + (f" ({why})" if why else "")
    if spec.named:  # say which of several teachers cannot serve the loss
        name = f"{spec.key} (teacher {spec.name!r}, {name})"
    try:
        check_teacher(loss, caps, name)
    except ValueError as e:
        raise ManifestError(str(e)) from None


def _check_hidden_transport(cfg, needs, spec) -> None:
    key, tc = f"{spec.key}.full_vocab_transport", spec.config
    if cfg.algorithm != "opd" or not needs.teacher_full:
        raise ManifestError(f"{key}: hidden_states serves losses over the teacher's whole distribution; "
                            f"{cfg.loss.name!r} does not use it (remove the key, or use e.g. full_reverse_kl)")
    if not _in_hf_model(tc):
        raise ManifestError(f"{key}: hidden_states needs the teacher's weights in an HF model ({spec.key}.kind "
                            f"{kinds_where(hf_model=True)}); {spec.key}.kind is {tc.kind!r}")
    from opd.modeling import model_skeleton, plain_head_problem
    path = _teacher_path(cfg, tc)
    if not Path(path).is_dir():
        return  # the model lives where the job runs (`opd check` elsewhere); the run checks it there
    problem = plain_head_problem(model_skeleton(path))  # the architecture only: no weights are read
    if problem:
        raise ManifestError(f"{key}: the teacher at {path} cannot be scored from hidden states: {problem}; "
                            "use logprobs")


def auto_transport(cfg, needs, tc=None) -> str:
    """teacher.full_vocab_transport: auto, resolved: hidden_states where the loss reads the teacher's whole
    distribution and the teacher can send its hidden states (an HF or self teacher whose head is a plain
    Linear), else logprobs. The two give the same loss and gradient to float rounding
    (tests/test_fused_head.py); hidden states are H/V of the bytes and no [N, T, V] teacher tensor exists.
    Left "auto" while the teacher's folder does not exist yet (`opd check` on a stage whose teacher an
    earlier stage trains): the run resolves it when it loads the manifest."""
    tc = tc or cfg.teacher
    if cfg.algorithm != "opd" or not needs.teacher_full or not _in_hf_model(tc) or len(cfg.teachers) > 1:
        return "logprobs"  # several teachers: the learner holds one teacher head (launch/routing.py)
    from opd.modeling import model_skeleton, plain_head_problem
    if not Path(_teacher_path(cfg, tc), "config.json").exists():
        return "auto"
    return "logprobs" if plain_head_problem(model_skeleton(_teacher_path(cfg, tc))) else "hidden_states"


def teacher_head_path(cfg) -> Optional[str]:
    """The folder whose output layer the learner applies to the hidden states a frozen teacher sends
    (teacher.full_vocab_transport: hidden_states), or None: another transport, a live self-teacher (its head
    is the student's own), another algorithm. The run's first teacher: with several, hidden states are refused."""
    if cfg.algorithm != "opd":
        return None
    tc = cfg.teachers[0] if cfg.teachers else cfg.teacher
    return _teacher_path(cfg, tc) if tc.full_vocab_transport == "hidden_states" and not tc.live else None


def _teacher_path(cfg, tc=None) -> str:
    """The folder of teacher `tc` (default `teacher:`): its own path, or the student's for a self-teacher."""
    tc = tc or cfg.teacher
    return kind_of(tc).weights_path(cfg, tc)


def _in_hf_model(tc) -> bool:
    """Whether teacher `tc` holds its weights in an HF model in its process (teachers/kinds.py: hf_model)."""
    return bool(kind_of(tc) and kind_of(tc).hf_model)


def _check_logprobs_transport(cfg, tc=None) -> None:
    """The log-prob transport ships [N, T, V] float32 each step; refuse it where that is not shippable."""
    tc = tc or cfg.teacher
    if not _in_hf_model(tc):
        return  # check_built_teacher names what a vLLM teacher cannot send
    if not Path(_teacher_path(cfg, tc), "config.json").exists():
        return  # the model lives where the job runs (`opd check` elsewhere); the run checks it there
    from opd.modeling import model_skeleton
    vocab = model_skeleton(_teacher_path(cfg, tc)).get_output_embeddings().weight.shape[0]
    rows = cfg.rollout.prompts_per_step * cfg.rollout.samples_per_prompt
    gb = rows * cfg.rollout.max_new_tokens * vocab * 4 / 1e9
    if gb > tc.max_logprobs_transport_gb:
        raise ManifestError(
            f"teacher.full_vocab_transport: logprobs ships {rows} rows x {cfg.rollout.max_new_tokens} tokens x "
            f"{vocab} vocabulary x 4 bytes = {gb:.1f} GB a step, over teacher.max_logprobs_transport_gb = "
            f"{tc.max_logprobs_transport_gb:g}; use full_vocab_transport: hidden_states (or auto), or "
            "fewer rows or tokens")
