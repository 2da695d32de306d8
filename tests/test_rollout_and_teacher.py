"""HF rollout engine and HF teacher, built in-process (the same classes Ray runs as actors)."""
import pytest
import torch
from transformers import AutoTokenizer

from actors.hf_engine import HFEngine
from opd.sampling import sample
from opd.contracts import SamplingSpec, ScoreRequest
from teachers.base import check_same_tokenizer
from teachers.kinds import capabilities_for
from teachers.hf_teacher import HFTeacher

PROMPTS = [[1, 5, 6, 41, 7, 8, 44], [1, 9, 41, 4, 44], [1, 44]]  # ragged on purpose


def test_generate_shapes_logprobs_and_stop(assets):
    eng = HFEngine(str(assets["tiny"]), seed=0)
    r = eng.generate(PROMPTS, SamplingSpec(max_new_tokens=5, return_topk=3, seed=1))
    n, t = r.completion_ids.shape
    assert n == 3 and t <= 5 and r.student_topk_ids.shape == (3, t, 3)
    assert (r.behaviour_logprobs[r.completion_mask] < 0).all()
    assert (r.behaviour_logprobs[~r.completion_mask] == 0).all()
    for row, mask, reason in zip(r.completion_ids, r.completion_mask, r.finish_reasons):
        toks = row[mask].tolist()
        assert (reason == "stop") == (eng.eos_id in toks)
        assert eng.eos_id not in toks[:-1]  # nothing after EOS is part of the completion


def test_seeded_sampling_is_reproducible_and_greedy_is_argmax(assets):
    eng = HFEngine(str(assets["tiny"]))
    spec = SamplingSpec(max_new_tokens=4, seed=7)
    assert torch.equal(eng.generate(PROMPTS, spec).completion_ids, eng.generate(PROMPTS, spec).completion_ids)
    g = eng.generate(PROMPTS, SamplingSpec(max_new_tokens=1, temperature=0))
    logits = eng.model(torch.tensor([PROMPTS[0]])).logits[0, -1]
    assert g.completion_ids[0, 0] == logits.argmax()


def test_top_p_keeps_the_nucleus_only():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]])).repeat(2000, 1)
    tok, lp = sample(logits, SamplingSpec(max_new_tokens=1, top_p=0.7), torch.Generator().manual_seed(0))
    assert set(tok.tolist()) == {0, 1}  # 0.5 + 0.3 reaches 0.7; 0.15 and 0.05 are cut
    assert torch.allclose(lp[tok == 1], torch.log(torch.tensor(0.3)))  # behaviour log-prob is pre-top-p


def test_self_teacher_rescoring_equals_behaviour_logprobs(assets):
    """Scoring the student's own samples with the same weights reproduces the sampler's log-probs:
    proves completion positions are aligned across left padding and ragged prompts."""
    path = str(assets["tiny"])
    r = HFEngine(path).generate(PROMPTS, SamplingSpec(max_new_tokens=5, temperature=0.8, seed=3, return_topk=4))
    s = HFTeacher(path).score(PROMPTS, r.completion_ids, r.completion_mask,
                              ScoreRequest(topk=4, at_student_topk=True, full_vocab=True, temperature=0.8),
                              r.student_topk_ids)
    m = r.completion_mask
    assert torch.allclose(s.sampled_logprobs[m], r.behaviour_logprobs[m], atol=1e-5)
    assert torch.equal(s.topk_ids[m], r.student_topk_ids[m])
    assert torch.allclose(s.full_logprobs.exp().sum(-1)[m], torch.ones(int(m.sum())), atol=1e-5)
    assert torch.allclose(s.at_student_topk[m], s.topk_logprobs[m], atol=1e-6)
    # the teacher's view of each sampled token: its rank (1 = argmax) and the teacher's entropy
    full = s.full_logprobs[m]
    sampled = full.gather(-1, r.completion_ids[m][:, None])
    assert torch.equal(s.sampled_rank[m], 1 + (full > sampled).sum(-1))
    assert torch.allclose(s.entropy[m], -(full.exp() * full).sum(-1), atol=1e-5)
    assert (s.sampled_rank[~m] == 0).all() and (s.entropy[~m] == 0).all()


def test_teacher_prompt_with_privileged_info_scores_row_by_row(assets):
    """OPSD: teacher prompts differ in length from the student's; scores in token batches equal unpadded ones."""
    t = HFTeacher(str(assets["tiny"]), max_tokens_per_batch=30)  # groups of two rows and one
    teacher_prompts = [[1, 30, 31, 32] + p[1:] for p in PROMPTS]
    comp = torch.tensor([[5, 6, 2, 0], [7, 2, 0, 0], [8, 9, 10, 11]])
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 1, 1, 1]]).bool()
    s = t.score(teacher_prompts, comp, mask, ScoreRequest())
    for i, prompt in enumerate(teacher_prompts):
        toks = comp[i][mask[i]].tolist()
        logp = torch.log_softmax(t.model(torch.tensor([prompt + toks])).logits[0].float(), -1)
        ref = torch.stack([logp[len(prompt) - 1 + j, tok] for j, tok in enumerate(toks)])
        assert torch.allclose(s.sampled_logprobs[i][mask[i]], ref, atol=1e-5)


def test_teacher_with_other_tokenizer_is_rejected(assets, tmp_path):
    tok = AutoTokenizer.from_pretrained(assets["tiny"])
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"teacher.path: tokenizer vocab 56 differs from student vocab 55"):
        check_same_tokenizer(AutoTokenizer.from_pretrained(tmp_path), AutoTokenizer.from_pretrained(assets["tiny"]))


def test_capability_table_lives_with_the_teachers():
    hf, vllm = capabilities_for("hf"), capabilities_for("vllm", max_logprobs=32)
    assert hf.full_vocab and hf.logprobs_at_any_ids and not hf.temperature_one_only
    assert not vllm.full_vocab and not vllm.logprobs_at_any_ids and vllm.max_topk == 32 and vllm.temperature_one_only
    assert "CPU build runs Model Runner V1" in vllm.limits
    assert capabilities_for("vllm", on_gpu=True).logprobs_at_any_ids  # the built engine's runner decides
    assert HFTeacher.capabilities == hf
    with pytest.raises(ValueError, match="teacher.kind: 'mlx'"):
        capabilities_for("mlx")
