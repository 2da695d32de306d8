"""The learner: DeepSpeed ranks that apply the configured loss and export weights for sync."""
