"""What a teacher of each kind can serve, as far as the manifest tells, before any work (the manifest
check reads `capabilities_for`; each teacher reports its own again once built, `get_capabilities`)."""
from __future__ import annotations

from teachers import hf_teacher, vllm_teacher
from teachers.base import TeacherCapabilities


def capabilities_for(kind: str, max_logprobs: int = 20, on_gpu: bool = False) -> TeacherCapabilities:
    """What teacher.kind can serve (a vLLM teacher's log-probs at given ids depend on the runner its engine
    picks: allowed on GPUs here and checked again on the built engine, `ScoresRollouts.get_capabilities`).
    HF (and the OPSD self-teacher, which is an HF teacher on the student's weights) runs the full forward
    in-process: anything. vLLM: teachers/vllm_teacher.py."""
    if kind in ("hf", "self"):
        return hf_teacher.capabilities()
    if kind == "vllm":
        return vllm_teacher.capabilities(max_logprobs, None if on_gpu else vllm_teacher.CPU_BUILD_LIMIT)
    raise ValueError(f"teacher.kind: {kind!r} is not one of ['hf', 'vllm', 'self']")
