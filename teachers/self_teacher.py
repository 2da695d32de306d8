"""The OPSD self-teacher (teacher.kind: self): an HF teacher on the student's own weights, with privileged
information in its prompt; frozen at the student's initial weights, or `live`: synced with the student
every step (docs/design.md, section 5)."""
from __future__ import annotations

from teachers.hf_teacher import capabilities, start
from teachers.kinds import TeacherKind, register

register(TeacherKind("self", lambda max_logprobs, on_gpu: capabilities(), start, student_weights=True,
                     follows_student=True, hf_model=True))
