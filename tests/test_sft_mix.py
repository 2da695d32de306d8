"""SFT mixing in OPD (the SFT-stabilised student): reference rows join the on-policy rows in one
optimizer step, each kind averaged over its own tokens in the whole batch."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.hf_engine import HFEngine
from launch.batches import PromptFormatter, distill_batch, score_request, sft_batch
from launch.cli import main
from learner.worker import loss_batch
from losses import build_loss
from opd.contracts import SamplingSpec, concat_batches
from opd.modeling import completion_logits
from tasks.data import load_dataset
from teachers.hf_teacher import HFTeacher


def gradient(model, tok, batch, loss, rows=None):
    """d loss / d params for `rows` of the batch (all by default), weights from the WHOLE batch's counts."""
    part = batch if rows is None else batch.select(rows)
    model.zero_grad()
    logits = completion_logits(model, part.prompt_ids, part.completion_ids, part.completion_mask, tok.pad_token_id)
    value, _ = loss(logits.reshape(-1, logits.shape[-1]), loss_batch(part, batch.token_counts))
    value.backward()
    return torch.cat([p.grad.flatten() for p in model.parameters()])


def test_sft_mix_gradient_is_the_sum_of_its_parts_and_any_split_adds_up(assets):
    path = str(assets["tiny"])
    tok = AutoTokenizer.from_pretrained(path)
    fmt = PromptFormatter(tok, "{prompt}", "{prompt}")
    rows = load_dataset(str(assets["train"]), ["prompt", "answer"]).rows[:4]
    distill = build_loss("full_reverse_kl")
    rollout = HFEngine(path, seed=0).generate([fmt.student(r) for r in rows for _ in range(2)],
                                              SamplingSpec(max_new_tokens=5, seed=3))
    teacher = HFTeacher(str(assets["student"]))
    scores = teacher.score([fmt.teacher(r) for r in rows for _ in range(2)], rollout.completion_ids,
                           rollout.completion_mask, score_request(distill.needs, 1.0))
    policy, reference = distill_batch(rollout, scores), sft_batch(fmt, rows, "answer")
    mixed = concat_batches(policy, reference)
    assert mixed.token_counts == (policy.loss_tokens, reference.loss_tokens)
    assert mixed.is_reference.tolist() == [False] * 8 + [True] * 4

    student = AutoModelForCausalLM.from_pretrained(path)
    mix = build_loss("weighted_sum", {"components": [{"name": "full_reverse_kl"}, {"name": "sft", "weight": 0.3}]})
    g_mix = gradient(student, tok, mixed, mix)
    g_parts = gradient(student, tok, policy, distill) + 0.3 * gradient(student, tok, reference, build_loss("sft"))
    assert torch.allclose(g_mix, g_parts, atol=1e-6, rtol=1e-4)
    assert g_parts.norm() > 1e-3
    # ranks x micro-batches: any split of the rows, each with the global counts, sums to the whole
    g_split = sum(gradient(student, tok, mixed, mix, part) for part in ([0, 9, 3, 11, 5], [1, 2, 4, 6, 7, 8, 10]))
    assert torch.allclose(g_split, g_mix, atol=1e-6, rtol=1e-4)


def test_teacher_writes_reference_rows_from_its_own_prompt(assets):
    teacher = HFTeacher(str(assets["tiny"]))
    prompts = [[1, 5, 6, 41], [1, 9, 41, 4, 44, 7]]
    spec = SamplingSpec(max_new_tokens=4, temperature=0.7, seed=2, behaviour_logprobs=False)
    a, b = teacher.generate(prompts, spec), teacher.generate(prompts, spec)
    assert torch.equal(a.completion_ids, b.completion_ids) and a.completion_ids.shape[0] == 2
    ref = HFEngine(str(assets["tiny"])).generate(prompts, spec)  # the same sampler as the rollout engine
    assert torch.equal(a.completion_ids, ref.completion_ids)


@pytest.mark.parametrize("source", ["dataset", "teacher"])
def test_opd_run_with_an_sft_mix(ray_session, write_manifest, tmp_path, source):
    manifest = write_manifest(loss={"name": "weighted_sum", "params": {"components": [
        {"name": "sampled_token_rkl"}, {"name": "sft", "weight": 0.5}]}, "reference": {"source": source}},
        learner={"micro_batch_size": 6, "lr": 1e-3})
    assert main(["train", str(manifest)]) == 0
    steps = [json.loads(line) for line in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    steps = [s for s in steps if "train/loss" in s]
    assert len(steps) == 2
    for s in steps:  # both components ran in the step; rows: reference rows' share of tokens-weight (1 = all)
        assert s["train/sft/loss"] > 0 and s["train/sampled_token_rkl/rows"] == pytest.approx(1.0)
        assert s["train/sft/rows"] == pytest.approx(1.0) and "time/reference_s" in s
