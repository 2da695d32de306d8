"""Learner micro-batches to a token budget (learner.max_tokens_per_micro_batch) and activation
checkpointing (learner.gradient_checkpointing) on a real in-process DeepSpeed rank: whatever the grouping,
the update is the whole batch's (brute-force float64 SGD reference, both loss.reduction values, one and
two updates per step), each micro-batch is padded only to its own longest row, and the key unset keeps
the row-count micro-batches."""
import pytest
import torch

from launch.config import ManifestError

from launch.manifest import load_manifest
from opd.batching import split_to, weightless
from opd.contracts import trimmed
from test_learner_paper_keys import make_batch, reference_sgd, sgd_cfg, worker


@pytest.mark.parametrize("updates,reduction,budget,checkpointing", [
    (1, "token_mean", 12, False), (1, "sample_mean", 12, True), (2, "token_mean", 9, True),
    (2, "sample_mean", 1, False)])  # budget 1: one row a micro-batch
def test_token_budget_micro_batches_give_the_whole_batch_gradient(write_manifest, assets, updates, reduction,
                                                                  budget, checkpointing):
    cfg = sgd_cfg(write_manifest, f"learner.updates_per_step={updates}", f"loss.reduction={reduction}",
                  f"learner.max_tokens_per_micro_batch={budget}", f"learner.gradient_checkpointing={checkpointing}")
    w = worker(cfg)
    assert w.engine.module.is_gradient_checkpointing == checkpointing
    batch = make_batch(w.engine.module.config.vocab_size)
    size = len(batch) // updates
    counts = [batch.denominators(reduction, slice(j * size, (j + 1) * size)) for j in range(updates)]
    micros = [trimmed(batch.select(rows)) for rows in w._micro_plan(batch, range(0, size))]
    assert len(micros) > 1
    for m in micros:  # each padded to its own longest completion, within the budget unless a row alone
        assert m.completion_mask[:, -1].any()
        width = max(len(p) for p in m.prompt_ids) + m.completion_ids.shape[1]
        assert len(m) == 1 or len(m) * width <= budget
    metrics = w.train_step(batch, counts[0] if updates == 1 else counts)
    expect = reference_sgd(str(assets["tiny"]), batch, updates, reduction)
    got = dict(w.engine.module.named_parameters())
    for name, v in expect.items():
        torch.testing.assert_close(got[name].detach(), v, atol=2e-5, rtol=1e-4, msg=name)
    assert w.engine.global_steps == updates and metrics["skipped_nonfinite"] == 0
    assert metrics["padding_fraction"] < 0.35  # rows grouped by length: little padding left


def test_token_budget_and_row_count_micro_batches_agree(write_manifest, assets):
    """The same step by both layouts: the same loss, diagnostics and weights (float tolerance), with far
    fewer padded columns by tokens."""
    out = {}
    for name, extra in (("rows", []), ("tokens", ["learner.max_tokens_per_micro_batch=16"])):
        w = worker(sgd_cfg(write_manifest, *extra))
        batch = make_batch(w.engine.module.config.vocab_size)
        metrics = w.train_step(batch, batch.token_counts)
        out[name] = metrics, {k: v.detach().clone() for k, v in w.engine.module.named_parameters()}
    (m_rows, w_rows), (m_tok, w_tok) = out["rows"], out["tokens"]
    assert m_rows["loss"] == pytest.approx(m_tok["loss"], rel=1e-5)
    for name in w_rows:
        torch.testing.assert_close(w_tok[name], w_rows[name], atol=1e-6, rtol=1e-5, msg=name)
    assert m_tok["padding_fraction"] < m_rows["padding_fraction"]


def test_trimmed_cuts_every_per_position_tensor_to_the_longest_row():
    b = make_batch(40, n=4)  # lengths 5, 1, 3, 4
    t = trimmed(b.select([1, 2]))
    assert t.completion_ids.shape == (2, 3) and t.teacher.full_logprobs.shape == (2, 3, 40)
    assert torch.equal(t.teacher.full_logprobs, b.teacher.full_logprobs[1:3, :3])
    assert trimmed(b) is b  # row 0 uses every column
    assert weightless(b).loss_tokens == 0


def test_split_to_gives_every_rank_the_same_micro_batch_count():
    assert split_to([[0, 1, 2, 3], [4]], 3) == [[0, 1], [2, 3], [4]]
    assert split_to([[0], [1]], 3) == [[0], [1], []]  # nothing to split: an empty (weightless) micro-batch


def test_bad_token_budget_keys_stop_before_work(write_manifest):
    with pytest.raises(ManifestError, match="learner.max_tokens_per_micro_batch"):
        load_manifest(write_manifest(learner={"max_tokens_per_micro_batch": 0}))
    cfg = load_manifest(write_manifest(learner={"max_tokens_per_micro_batch": 64, "micro_batch_size": 3}))
    assert cfg.learner.micro_batch_size == 3  # unused with a token budget: no divisibility demanded
