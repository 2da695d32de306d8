"""Rollout actors: engines that sample student trajectories (HF on CPU, vLLM on GPU)."""
