"""Does the configured teacher supply what the configured loss needs? Checked before any work."""
from __future__ import annotations

from teachers.base import TeacherCapabilities

# What each teacher kind can return. HF teachers run the full forward in-process, so they can give
# exact log-probs at any id and the whole distribution; vLLM returns only its own top-k.
TEACHER_CAPABILITIES = {
    "hf": TeacherCapabilities(full_vocab=True, logprobs_at_any_ids=True, max_topk=1 << 30),
    "self": TeacherCapabilities(full_vocab=True, logprobs_at_any_ids=True, max_topk=1 << 30),
    "vllm": TeacherCapabilities(full_vocab=False, logprobs_at_any_ids=False, max_topk=20),
}


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
    if cfg.algorithm != "sft" and needs.reference_rows:
        raise ManifestError(f"loss.params: {cfg.loss.name!r} has an sft component, which needs reference rows; "
                            f"the {cfg.algorithm!r} driver does not add them yet. Warm-start with algorithm: sft "
                            "instead (as configs/demo/student_sft.yaml does)")
    if needs.needs_teacher:
        try:
            check_teacher(loss, TEACHER_CAPABILITIES[cfg.teacher.kind], f"a {cfg.teacher.kind!r} teacher")
        except ValueError as e:
            raise ManifestError(str(e)) from None
