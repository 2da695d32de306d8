"""Does the configured loss fit the algorithm, and can the configured teacher supply what it needs?
Checked before any work."""
from __future__ import annotations

from teachers.base import capabilities_for


def build_configured_loss(cfg):
    from losses import build_loss
    return build_loss(cfg.loss.name, dict(cfg.loss.params), temperature=cfg.rollout.temperature)


def check_loss(cfg) -> None:
    from launch.config import ManifestError
    from losses import check_teacher
    try:
        loss = build_configured_loss(cfg)
    except ValueError as e:
        raise ManifestError(str(e)) from None
    needs = loss.needs
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
    if cfg.algorithm == "opd" and needs.reference_rows and ref.source == "teacher":
        if cfg.teacher.kind not in ("hf", "self"):
            raise ManifestError(f"loss.reference.source: 'teacher' samples from an HF teacher; teacher.kind is "
                                f"{cfg.teacher.kind!r} (use source: dataset, or teacher.kind: hf)")
        if ref.temperature < 0:
            raise ManifestError(f"loss.reference.temperature: must be >= 0, got {ref.temperature}")
    if cfg.rollout.engine == "vllm" and needs.student_topk > cfg.rollout.vllm.max_logprobs:
        raise ManifestError(f"rollout.vllm.max_logprobs: {cfg.rollout.vllm.max_logprobs}, but {cfg.loss.name!r} "
                            f"needs the student's top-{needs.student_topk}; raise it")
    if needs.needs_teacher:
        try:
            caps = capabilities_for(cfg.teacher.kind, cfg.teacher.vllm.max_logprobs)
            check_teacher(loss, caps, f"a {cfg.teacher.kind!r} teacher")
        except ValueError as e:
            raise ManifestError(str(e)) from None
