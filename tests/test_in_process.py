"""Actors built in-process one after another in one Python process, as unit tests and local debugging
build them: a vLLM engine, then a DeepSpeed learner, then a vLLM engine again. Each leaves process-wide
distributed state behind (vLLM's and DeepSpeed's cached process groups; an engine's shutdown tears
torch's default group down, a learner makes it again), and each must still start and compute."""
import gc

import torch.distributed as dist

from opd.contracts import SamplingSpec
from tests.test_learner_paper_keys import make_batch, sgd_cfg, worker

PROMPTS = [[1, 5, 6, 7], [1, 9, 4]]
SPEC = SamplingSpec(max_new_tokens=4, temperature=0.0)


def greedy(path) -> list:
    from actors.vllm_engine import VLLMEngine
    from opd.vllm_llm import LLMSpec
    engine = VLLMEngine(LLMSpec(model=str(path), dtype="float32", max_model_len=64), SPEC, 0)
    out = engine.generate(PROMPTS, SPEC).completions()
    del engine
    gc.collect()
    return out


def test_a_vllm_engine_a_learner_and_another_vllm_engine_in_one_process(assets, write_manifest):
    first = greedy(assets["tiny"])
    learner = worker(sgd_cfg(write_manifest))
    batch = make_batch(learner.engine.module.config.vocab_size)
    assert learner.train_step(batch, [batch.denominators("token_mean", slice(0, len(batch)))])["loss"] > 0
    dist.destroy_process_group()  # as an engine's shutdown does: the next learner makes the group again
    learner = worker(sgd_cfg(write_manifest))
    assert learner.train_step(batch, [batch.denominators("token_mean", slice(0, len(batch)))])["loss"] > 0
    assert greedy(assets["tiny"]) == first  # same weights, greedy: the same tokens
