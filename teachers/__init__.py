"""Teachers: score student completions (an external model, or the student's own weights for OPSD)."""
