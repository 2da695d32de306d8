"""Rollout actors: engines that sample student trajectories (HF on CPU, vLLM on GPU).

Each kind registers itself in actors/kinds.py when its module is imported; this line imports them all."""
from actors import hf_engine, vllm_engine  # noqa: F401  (registers hf, vllm)
