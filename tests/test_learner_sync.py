"""DeepSpeed learner under Ray: any split of a batch over ranks x micro-batches x accumulation (and
any ZeRO stage) gives the gradient of one big batch; weight sync makes the rollout engine equal the
learner. Plain SGD makes the update exactly lr x gradient, so the gradient can be read back."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from actors.hf_engine import HFEngine
from launch.cluster import LearnerGroup, connect_weight_sync
from launch.manifest import load_manifest
from opd.contracts import SamplingSpec, TeacherScores, TrainBatch

LR = 0.05


def make_batch(vocab: int) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    n, t = 8, 5
    lengths = [5, 1, 3, 4, 2, 5, 1, 3]  # ragged, so per-rank token counts differ
    mask = torch.tensor([[j < L for j in range(t)] for L in lengths])
    prompts = [[1] + torch.randint(4, vocab, (1 + i % 3,), generator=g).tolist() for i in range(n)]
    full = torch.log_softmax(torch.randn(n, t, vocab, generator=g), -1)
    return TrainBatch(prompt_ids=prompts, completion_ids=torch.randint(4, vocab, (n, t), generator=g),
                      completion_mask=mask, teacher=TeacherScores(sampled_logprobs=torch.zeros(n, t), full_logprobs=full))


def reference_grads(path: str, b: TrainBatch) -> dict[str, torch.Tensor]:
    """Independent: one unpadded forward per row, exact reverse KL per token, mean over all tokens."""
    model = AutoModelForCausalLM.from_pretrained(path)
    total = 0.0
    for i, prompt in enumerate(b.prompt_ids):
        comp = b.completion_ids[i][b.completion_mask[i]].tolist()
        logits = model(torch.tensor([prompt + comp])).logits[0, len(prompt) - 1: len(prompt) - 1 + len(comp)]
        logp = torch.log_softmax(logits, -1)
        q = b.teacher.full_logprobs[i, : len(comp)]
        total = total + (logp.exp() * (logp - q)).sum()
    (total / b.loss_tokens).backward()
    return {k: p.grad.clone() for k, p in model.named_parameters()}


@pytest.mark.parametrize("ranks,micro,zero,budget", [
    (1, 8, 0, None), (2, 2, 2, None), (2, 4, 3, None),
    # learner.max_tokens_per_micro_batch: rows spread over ranks by tokens, micro-batches by length; at
    # a budget of 1 token every row is a micro-batch of its own and the rank with fewer rows runs a
    # weightless one, so both ranks take part in every reduction
    (2, 1, 2, 12), (2, 1, 0, 1)])
def test_split_gives_one_big_batch_gradient_and_sync_matches(ray_session, placed, write_manifest, assets, ranks, micro,
                                                             zero, budget):
    ray = ray_session
    cfg = load_manifest(write_manifest(), [
        "loss.name=full_reverse_kl", "learner.optimizer=sgd", f"learner.lr={LR}", "learner.warmup_ratio=0",
        "learner.schedule=constant", "learner.grad_clip=0", f"learner.num_ranks={ranks}",
        f"learner.micro_batch_size={micro}", f"learner.zero_stage={zero}",
        f"learner.max_tokens_per_micro_batch={'null' if budget is None else budget}"])
    path = str(assets["tiny"])
    w0 = dict(AutoModelForCausalLM.from_pretrained(path).named_parameters())
    batch = make_batch(w0["lm_head.weight"].shape[0])
    placement = placed(cfg)
    group = LearnerGroup(cfg, rows_per_step=8, placement=placement)
    engine = ray.remote(HFEngine).options(**placement.options(placement.layout.rollout[0])).remote(path)
    try:
        check(ray, cfg, group, engine, path, w0, batch)
    finally:
        group.call("close_weight_sync")
        for actor in group.ranks + [engine]:
            ray.kill(actor)


def check(ray, cfg, group, engine, path, w0, batch):
    metrics = group.train_step(batch)
    assert metrics["loss"] > 0 and metrics["reverse_kl"] == pytest.approx(metrics["loss"], rel=1e-5)

    ref = reference_grads(path, batch)
    weights_ref = group.export_weights()
    w1 = ray.get(weights_ref)
    for name, g in ref.items():
        got = (w0[name].detach() - w1[name]) / LR
        assert torch.allclose(got, g, atol=2e-5, rtol=2e-3), f"{name}: max err {(got - g).abs().max()}"

    connect_weight_sync(cfg, group, [engine], ["hf"])  # gloo, from every rank (ZeRO-3 gathers are collective)
    group.call("sync_weights", 1)
    synced = ray.get(engine.get_weights.remote())
    assert ray.get(engine.generate.remote([[1, 5]], SamplingSpec(max_new_tokens=2))).weight_version == 1
    assert all(torch.equal(synced[k], w1[k]) for k in w1)
