"""The pipelined step's learner half (rollout.pipeline_chunks): a step's rows in chunks, each run forward
and backward as it comes (LearnerWorker.accumulate) with the WHOLE step's denominators, then one optimizer
step (apply_step), gives the weights and the metrics of the one-call step (train_step). Real in-process
DeepSpeed ranks; plain SGD makes the update lr x gradient, so equal weights after one step are equal
gradients. Each chunk is cut to its own longest completion, as a chunk's own rollout is."""
import pytest
import torch

from launch.manifest import load_manifest
from learner.worker import LearnerWorker
from opd.contracts import trimmed
from tests.test_learner_paper_keys import make_batch

LR = 0.5  # plain SGD: an update is LR x the gradient


def worker(write_manifest, *extra):
    cfg = load_manifest(write_manifest(), [
        "loss.name=full_reverse_kl", "learner.optimizer=sgd", f"learner.lr={LR}", "learner.warmup_ratio=0",
        "learner.schedule=constant", "learner.grad_clip=0", "learner.micro_batch_size=2", *extra])
    return LearnerWorker(cfg, 0, 1, rows_per_step=8)


def chunk_rows(n: int, chunks: int, unit: int = 2) -> list[list[int]]:
    units = n // unit
    bounds = [round(k * units / chunks) * unit for k in range(chunks + 1)]
    return [list(range(a, b)) for a, b in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("chunks,extra", [(2, ()), (3, ()), (3, ("loss.reduction=sample_mean",)),
                                          (2, ("learner.max_tokens_per_micro_batch=8",))])
def test_chunked_step_equals_the_one_call_step(write_manifest, chunks, extra):
    whole, piped = worker(write_manifest, *extra), worker(write_manifest, *extra)
    batch = make_batch(whole.engine.module.config.vocab_size)
    reduction = "sample_mean" if "loss.reduction=sample_mean" in extra else "token_mean"
    counts = batch.denominators(reduction)  # the whole step's, before any chunk is trained
    expect = whole.train_step(batch, counts)
    parts = chunk_rows(len(batch), chunks)
    assert len(parts) == chunks and all(parts)
    for k, rows in enumerate(parts):
        assert piped.accumulate(trimmed(batch.select(rows)), counts, last=k == chunks - 1) is None
    got = piped.apply_step()
    w_expect = dict(whole.engine.module.named_parameters())
    moved = 0.0
    for name, p in piped.engine.module.named_parameters():
        torch.testing.assert_close(p.detach(), w_expect[name].detach(), atol=1e-6, rtol=1e-5, msg=name)
    init = worker(write_manifest, *extra)  # the step moved the weights (not a comparison of two no-ops)
    for name, p in init.engine.module.named_parameters():
        moved = max(moved, float((p.detach() - w_expect[name].detach()).abs().max()))
    assert moved > 1e-3
    assert set(got) == set(expect)
    for key in expect:
        if key in ("compute_s", "padding_fraction"):  # the chunks' own padding and timing
            continue
        assert got[key] == pytest.approx(expect[key], rel=1e-5, abs=1e-7), key
    assert got["skipped_nonfinite"] == 0.0 and got["compute_s"] > 0


def test_apply_step_needs_the_last_chunk(write_manifest):
    w = worker(write_manifest)
    batch = make_batch(w.engine.module.config.vocab_size)
    w.accumulate(batch.select([0, 1, 2, 3]), batch.denominators("token_mean"), last=False)
    with pytest.raises(AssertionError, match="last chunk"):
        w.apply_step()
