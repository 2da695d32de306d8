"""The learner keys the paper's scripts need, on a real in-process DeepSpeed learner rank against
brute-force references (one unpadded forward per row, float64 sums): several optimizer updates per
step (learner.updates_per_step), the per-sample reduction (loss.reduction), the frozen-reference KL
(loss.kl_to_reference) and Adam's betas (learner.betas) in DeepSpeed and the fused AdamW. Plain SGD
makes an update exactly lr x gradient, so the gradient can be read back from the weights."""
import pytest
import torch
from transformers import AutoModelForCausalLM

from launch.config import ManifestError

from launch.manifest import load_manifest
from learner.worker import LearnerWorker, lr_lambda
from opd.contracts import TeacherScores, TrainBatch

LR = 0.5


def make_batch(vocab: int, n: int = 8) -> TrainBatch:
    g = torch.Generator().manual_seed(0)
    lengths = [5, 1, 3, 4, 2, 5, 1, 3][:n]
    mask = torch.tensor([[j < L for j in range(5)] for L in lengths])
    prompts = [[1] + torch.randint(4, vocab, (1 + i % 3,), generator=g).tolist() for i in range(n)]
    full = torch.log_softmax(torch.randn(n, 5, vocab, generator=g), -1)
    return TrainBatch(prompt_ids=prompts, completion_ids=torch.randint(4, vocab, (n, 5), generator=g),
                      completion_mask=mask, teacher=TeacherScores(sampled_logprobs=torch.zeros(n, 5), full_logprobs=full))


def row_logp(model, b: TrainBatch, i: int) -> torch.Tensor:
    comp = b.completion_ids[i][b.completion_mask[i]].tolist()
    p = b.prompt_ids[i]
    logits = model(torch.tensor([p + comp])).logits[0, len(p) - 1: len(p) - 1 + len(comp)]
    return torch.log_softmax(logits.double(), -1)


def reference_sgd(path: str, b: TrainBatch, updates: int, reduction: str) -> dict[str, torch.Tensor]:
    """Update j: exact reverse KL on rows [j N/u, (j+1) N/u), reduced over that mini-batch alone, one SGD step."""
    model = AutoModelForCausalLM.from_pretrained(path)
    size = len(b) // updates
    for j in range(updates):
        rows = range(j * size, (j + 1) * size)
        tokens = sum(int(b.completion_mask[i].sum()) for i in rows)
        total = 0.0
        for i in rows:
            logp = row_logp(model, b, i)
            kl = (logp.exp() * (logp - b.teacher.full_logprobs[i, : len(logp)].double())).sum(-1)
            total = total + (kl.sum() / tokens if reduction == "token_mean" else kl.mean() / size)
        model.zero_grad()
        total.backward()
        with torch.no_grad():
            for p in model.parameters():
                p -= LR * p.grad
    return {k: v.detach() for k, v in model.named_parameters()}


def sgd_cfg(write_manifest, *extra, micro=2):
    return load_manifest(write_manifest(), [
        "loss.name=full_reverse_kl", "learner.optimizer=sgd", f"learner.lr={LR}", "learner.warmup_ratio=0",
        "learner.schedule=constant", "learner.grad_clip=0", f"learner.micro_batch_size={micro}", *extra])


def worker(cfg, rows=8):
    return LearnerWorker(cfg, 0, 1, rows_per_step=rows)


@pytest.mark.parametrize("updates,reduction", [(2, "token_mean"), (2, "sample_mean"), (4, "sample_mean")])
def test_updates_per_step_are_sequential_minibatch_steps(write_manifest, assets, updates, reduction):
    cfg = sgd_cfg(write_manifest, f"learner.updates_per_step={updates}", f"loss.reduction={reduction}")
    path = str(assets["tiny"])
    w = worker(cfg)
    batch = make_batch(w.engine.module.config.vocab_size)
    size = len(batch) // updates
    counts = [batch.denominators(reduction, slice(j * size, (j + 1) * size)) for j in range(updates)]
    metrics = w.train_step(batch, counts)
    got = dict(w.engine.module.named_parameters())
    expect = reference_sgd(path, batch, updates, reduction)
    for name, v in expect.items():
        torch.testing.assert_close(got[name].detach(), v, atol=2e-5, rtol=1e-4, msg=name)
    one_big = reference_sgd(path, batch, 1, reduction)  # the split really is several updates
    assert max(float((one_big[k] - expect[k]).abs().max()) for k in expect) > 1e-4
    assert metrics["skipped_nonfinite"] == 0 and metrics["skipped_updates"] == 0 and metrics["loss"] > 0
    assert w.engine.global_steps == updates  # the schedule sees every update


def test_one_update_token_mean_no_kl_is_the_plain_step(write_manifest, assets):
    """The defaults take exactly the path a step always took: a single (on-policy, reference) pair."""
    cfg = sgd_cfg(write_manifest)
    assert (cfg.learner.updates_per_step, cfg.loss.reduction, cfg.loss.kl_to_reference.coef) == (1, "token_mean", 0)
    w = worker(cfg)
    assert w.reference is None and not w.loss.needs.frozen_reference_logprobs
    batch = make_batch(w.engine.module.config.vocab_size)
    metrics = w.train_step(batch, batch.token_counts)
    assert "skipped_updates" not in metrics and "kl_to_reference" not in metrics
    expect = reference_sgd(str(assets["tiny"]), batch, 1, "token_mean")
    got = dict(w.engine.module.named_parameters())
    for name, v in expect.items():
        torch.testing.assert_close(got[name].detach(), v, atol=2e-5, rtol=1e-4, msg=name)


def test_schedule_counts_optimizer_updates(write_manifest):
    cfg = load_manifest(write_manifest(), ["loss.name=full_reverse_kl", "learner.updates_per_step=2", "learner.schedule=cosine",
                                           "learner.warmup_ratio=0.25", "learner.lr=0.01", "run.steps=3",
                                           "learner.micro_batch_size=2"])
    w = worker(cfg)
    batch = make_batch(w.engine.module.config.vocab_size)
    metrics = w.train_step(batch, [batch.denominators("token_mean", slice(0, 4)),
                                   batch.denominators("token_mean", slice(4, 8))])
    f = lr_lambda("cosine", 6, 0.25, 0.0)  # 3 steps x 2 updates
    assert metrics["lr"] == pytest.approx(0.01 * f(2), rel=1e-12)
    assert f(2) != lr_lambda("cosine", 3, 0.25, 0.0)(2)


@pytest.mark.parametrize("over,match", [
    (["learner.updates_per_step=3"], "learner.updates_per_step: 8 rows per step do not split into 3"),
    (["learner.updates_per_step=2", "learner.micro_batch_size=8"], "rows per update"),
    (["loss.reduction=per_token"], "loss.reduction"),
    (["loss.kl_to_reference.coef=0.1", "loss.kl_to_reference.estimator=k4"], "kl_to_reference.estimator"),
    (["loss.kl_to_reference.coef=0.1", "loss.kl_to_reference.path=/nonexistent/ref"], "kl_to_reference.path"),
])
def test_bad_paper_keys_stop_before_work(write_manifest, over, match):
    with pytest.raises(ManifestError, match=match):
        load_manifest(write_manifest(), over)


def brute_k2(student: str, reference: str, b: TrainBatch) -> float:
    """Token mean over the batch of (log p(y) - log r(y))^2 / 2, both models scoring the student's prompt."""
    s, r = AutoModelForCausalLM.from_pretrained(student), AutoModelForCausalLM.from_pretrained(reference)
    total, n = 0.0, 0
    with torch.no_grad():
        for i in range(len(b)):
            y = b.completion_ids[i][b.completion_mask[i]]
            d = row_logp(s, b, i).gather(-1, y[:, None]) - row_logp(r, b, i).gather(-1, y[:, None])
            total, n = total + float((d * d / 2).sum()), n + len(y)
    return total / n


def test_kl_to_reference_in_the_learner(write_manifest, assets):
    """Reference = the student's initial weights: log p_ref = log p on the first step, so the k2 penalty and
    its gradient are 0 (the same update as without it), and positive once the student moved. With a path,
    the penalty is that model's, matching a brute-force token mean."""
    kl = ["loss.kl_to_reference.coef=0.5", "loss.kl_to_reference.estimator=k2"]
    plain, with_kl = worker(sgd_cfg(write_manifest)), worker(sgd_cfg(write_manifest, *kl))
    assert with_kl.reference is not None
    batch = make_batch(plain.engine.module.config.vocab_size)
    m0 = plain.train_step(batch, batch.token_counts)
    m1 = with_kl.train_step(batch, batch.token_counts)
    assert abs(m1["kl_to_reference"]) < 1e-9
    assert m1["loss"] == pytest.approx(m0["loss"], rel=1e-6)
    a, b = dict(plain.engine.module.named_parameters()), dict(with_kl.engine.module.named_parameters())
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    m2 = with_kl.train_step(batch, batch.token_counts)
    assert m2["kl_to_reference"] > 1e-6
    del plain, with_kl
    other = worker(sgd_cfg(write_manifest, *kl, f"loss.kl_to_reference.path={assets['teacher']}",
                           f"model.path={assets['student']}", f"teacher.path={assets['teacher']}"))
    m = other.train_step(batch, batch.token_counts)
    assert m["kl_to_reference"] == pytest.approx(brute_k2(str(assets["student"]), str(assets["teacher"]), batch),
                                                 rel=1e-4)


@pytest.mark.parametrize("zero", [0, 2])
def test_adam_betas_reach_the_optimizer(write_manifest, zero):
    """After one AdamW update from zero moments, m = (1 - b1) g and v = (1 - b2) g^2, so
    v (1 - b1)^2 = (1 - b2) m^2 holds only with the manifest's betas."""
    cfg = load_manifest(write_manifest(), ["loss.name=full_reverse_kl", "learner.betas=[0.5, 0.75]",
                                           f"learner.zero_stage={zero}", "learner.micro_batch_size=4"])
    w = worker(cfg)
    batch = make_batch(w.engine.module.config.vocab_size)
    w.train_step(batch, batch.token_counts)
    opt = w.engine.optimizer
    inner = getattr(opt, "optimizer", opt)  # ZeRO wraps our torch AdamW
    assert isinstance(inner, torch.optim.AdamW) and inner.defaults["fused"]
    assert all(tuple(g["betas"]) == (0.5, 0.75) for g in inner.param_groups)
    checked = 0
    for group in inner.param_groups:
        for p in group["params"]:
            st = inner.state.get(p)
            if not st or float(st["exp_avg"].abs().max()) == 0:
                continue
            m, v = st["exp_avg"].double(), st["exp_avg_sq"].double()
            torch.testing.assert_close(v * 0.5 ** 2, 0.25 * m * m, rtol=1e-4, atol=1e-12)
            checked += 1
    assert checked


def test_a_learner_built_after_the_process_group_was_torn_down_trains(write_manifest):
    """An in-process vLLM engine's shutdown (or a test's destroy_process_group) tears the process's
    torch.distributed group down; DeepSpeed keeps the groups it made in module globals. A learner built
    afterwards in the same process must still initialise and step (it failed with "Group ... is not registered")."""
    import torch.distributed as dist
    cfg = sgd_cfg(write_manifest)
    first = worker(cfg)
    batch = make_batch(first.engine.module.config.vocab_size)
    dist.destroy_process_group()
    second = worker(cfg)
    metrics = second.train_step(batch, [batch.denominators("token_mean", slice(0, len(batch)))])
    assert dist.is_initialized() and metrics["loss"] > 0 and second.engine.global_steps == 1
