"""Teachers: score student completions (an external model, or the student's own weights for OPSD).

Each kind registers itself in teachers/kinds.py when its module is imported; this line imports them all."""
from teachers import hf_teacher, vllm_teacher, self_teacher  # noqa: F401  (registers hf, vllm, self)
