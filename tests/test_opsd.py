"""OPSD building blocks on the real classes, in-process: the student's and the PI-conditioned
teacher's prompts differ in length (left padding differs per side) while completions are right-padded,
and every loss a self-teacher can serve sees the two aligned token for token."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.hf_engine import HFEngine
from launch.batches import PromptFormatter, distill_batch, score_request, teacher_stats
from learner.worker import loss_batch
from losses import build_loss
from opd.contracts import SamplingSpec
from opd.modeling import completion_logits, load_named_tensors
from teachers.hf_teacher import HFTeacher

# name, params, stationary at p = q: every loss that makes sense for a self-teacher (it returns anything
# an HF teacher can). Two are not stationary when student and teacher agree, the paper's pitfall: biased
# TopK's gradient there is +grad P(S) (minimising it pushes mass out of the support S), and the
# top-k-truncated forward KL's is -grad P(S).
SELF_TEACHER_LOSSES = [
    ("sampled_token_rkl", {}, True), ("full_reverse_kl", {}, True), ("full_forward_kl", {}, True),
    ("generalized_jsd", {"beta": 0.5}, True), ("topk_reverse_kl_sg", {"k": 4}, True),
    ("topk_reverse_kl_sg", {"k": 4, "support": "student"}, True), ("topk_reverse_kl_renorm", {"k": 4}, True),
    ("topk_reverse_kl_tail", {"k": 4}, True),
    ("topk_reverse_kl_biased", {"k": 4}, False), ("topk_forward_kl", {"k": 4}, False),
]
ROWS = [{"prompt": "12+34=", "hint": "the answer is 64. "}, {"prompt": "5+5=", "hint": "hint: 01. "},
        {"prompt": "99+99=", "hint": "!"}, {"prompt": "1+2=", "hint": "the sum reversed is 3. "}]


@pytest.fixture(scope="module")
def setup(assets):
    path = str(assets["tiny"])
    tok = AutoTokenizer.from_pretrained(path)
    torch.manual_seed(0)
    student = AutoModelForCausalLM.from_pretrained(path)
    with torch.no_grad():  # a random-init model is near uniform; sharpen it so PI changes its scores
        student.lm_head.weight.mul_(20)
    return path, tok, student


def rollout_and_scores(path, tok, student, teacher_template, loss):
    fmt = PromptFormatter(tok, "{prompt}", teacher_template)
    engine, teacher = HFEngine(path, seed=0), HFTeacher(path)
    load_named_tensors(engine.model, dict(student.named_parameters()))
    load_named_tensors(teacher.model, dict(student.named_parameters()))  # frozen self-teacher at the start
    rollout = engine.generate([fmt.student(r) for r in ROWS], SamplingSpec(max_new_tokens=6, seed=1,
                                                                           return_topk=loss.needs.student_topk))
    scores = teacher.score([fmt.teacher(r) for r in ROWS], rollout.completion_ids, rollout.completion_mask,
                           score_request(loss.needs, 1.0), rollout.student_topk_ids)
    return fmt, rollout, scores, teacher


def grad_norm(student, tok, rollout, scores, loss, prompts) -> float:
    student.zero_grad()
    batch = distill_batch(rollout, scores)
    logits = completion_logits(student, prompts, batch.completion_ids, batch.completion_mask, tok.pad_token_id)
    value, _ = loss(logits.reshape(-1, logits.shape[-1]), loss_batch(batch, batch.token_counts))
    value.backward()
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in student.parameters() if p.grad is not None])))


def test_student_and_teacher_positions_align_under_different_padding(setup):
    """Learner side: a batch whose prompts differ in length (left padding) and whose completions are
    ragged (right padding) gives each row exactly its unpadded forward's logits."""
    path, tok, student = setup
    prompts = [[1] + tok(r["hint"] + r["prompt"], add_special_tokens=False).input_ids for r in ROWS]
    completions = [[5, 6, 2], [7, 2], [8, 9, 10, 11], [12]]
    ids = torch.zeros(4, 4, dtype=torch.long)
    mask = torch.zeros(4, 4, dtype=torch.bool)
    for i, c in enumerate(completions):
        ids[i, :len(c)], mask[i, :len(c)] = torch.tensor(c), True
    with torch.no_grad():
        batched = completion_logits(student, prompts, ids, mask, tok.pad_token_id)
        for i, (p, c) in enumerate(zip(prompts, completions)):
            alone = student(torch.tensor([p + c])).logits[0, len(p) - 1:len(p) - 1 + len(c)]
            assert torch.allclose(batched[i, :len(c)], alone, atol=1e-4), f"row {i}"


@pytest.mark.parametrize("name,params,stationary", SELF_TEACHER_LOSSES,
                         ids=[f"{n}-{p.get('support', '')}" for n, p, _ in SELF_TEACHER_LOSSES])
def test_self_teacher_without_pi_gives_zero_gradient_and_with_pi_does_not(setup, name, params, stationary):
    """The teacher is the student's own network: with the student's own prompt the gradient of every
    stationary loss vanishes (same distributions, aligned positions); with PI in the teacher's prompt
    it does not."""
    path, tok, student = setup
    loss = build_loss(name, params)
    norms, gaps = {}, {}
    for template in ("{prompt}", "{hint}{prompt}"):
        fmt, rollout, scores, _ = rollout_and_scores(path, tok, student, template, loss)
        norms[template] = grad_norm(student, tok, rollout, scores, loss, [fmt.student(r) for r in ROWS])
        gaps[template] = teacher_stats(rollout, scores, self_teacher=True)["opsd/pi_gap_nats"]
    # without PI only float noise is left (the sampler decodes incrementally, the teacher in one pass)
    assert (norms["{prompt}"] < 1e-3 * norms["{hint}{prompt}"]) == stationary and norms["{hint}{prompt}"] > 1e-3, norms
    assert abs(gaps["{prompt}"]) < 1e-4 < abs(gaps["{hint}{prompt}"]), gaps


def test_live_self_teacher_follows_the_student(setup):
    """teacher.live: after a step the self-teacher receives the student's weights, and its scores under
    the student's own prompt are the updated student's log-probs (the frozen teacher's are not)."""
    path, tok, student = setup
    loss = build_loss("full_reverse_kl")
    fmt, rollout, scores, teacher = rollout_and_scores(path, tok, student, "{hint}{prompt}", loss)
    opt = torch.optim.SGD(student.parameters(), lr=1.0)
    grad_norm(student, tok, rollout, scores, loss, [fmt.student(r) for r in ROWS])
    opt.step()
    prompts = [fmt.student(r) for r in ROWS]
    with torch.no_grad():
        logits = completion_logits(student, prompts, rollout.completion_ids, rollout.completion_mask, tok.pad_token_id)
    want = torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids[..., None]).squeeze(-1)
    m = rollout.completion_mask
    req = score_request(loss.needs, 1.0)
    frozen = teacher.score(prompts, rollout.completion_ids, m, req).sampled_logprobs
    assert not torch.allclose(frozen[m], want[m], atol=1e-3)
    load_named_tensors(teacher.model, dict(student.named_parameters()))  # what a live sync delivers
    live = teacher.score(prompts, rollout.completion_ids, m, req).sampled_logprobs
    assert torch.allclose(live[m], want[m], atol=1e-4)


def test_teacher_stats_are_token_means_over_the_mask():
    from opd.contracts import Rollout, TeacherScores
    mask = torch.tensor([[True, True, False], [True, False, False]])
    rollout = Rollout(prompt_ids=[[1], [1]], completion_ids=torch.zeros(2, 3, dtype=torch.long), completion_mask=mask,
                      behaviour_logprobs=torch.tensor([[-1.0, -1.0, 0.0], [-2.0, 0.0, 0.0]]),
                      finish_reasons=["stop", "stop"], weight_version=0)
    scores = TeacherScores(sampled_logprobs=torch.tensor([[-0.5, -3.0, 9.0], [-1.0, 9.0, 9.0]]),
                           sampled_rank=torch.tensor([[1, 4, 7], [1, 7, 7]]), entropy=torch.tensor([[1.0, 2.0, 9.0], [3.0, 9.0, 9.0]]))
    stats = teacher_stats(rollout, scores, self_teacher=True)
    assert stats == pytest.approx({"teacher/logprob_sampled": -1.5, "teacher/rank_sampled": 2.0,
                                   "teacher/top1_fraction": 2 / 3, "teacher/entropy": 2.0,
                                   "opsd/pi_gap_nats": ((-0.5 + 1 - 3 + 1) + (-1 + 2)) / 2})
