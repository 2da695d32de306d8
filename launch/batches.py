"""From dataset rows to prompts, and from rollouts + teacher scores to a TrainBatch."""
from __future__ import annotations

from collections import Counter

import torch

from losses import group_normalised_advantages
from opd.contracts import Rollout, ScoreRequest, TeacherScores, TrainBatch, pad_rows


class PromptFormatter:
    """Renders the student's and the teacher's prompts from one row. For OPSD the teacher's template
    carries privileged fields the student's never sees; completions are shared token for token."""

    def __init__(self, tokenizer, student_template: str, teacher_template: str):
        self.tok, self.student_template, self.teacher_template = tokenizer, student_template, teacher_template

    def encode(self, texts: list[str]) -> list[list[int]]:
        """<bos> + the tokens of each text. One tokenizer call for the list: a call per text costs
        ~4x more, and a step tokenizes every prompt twice (student and teacher)."""
        bos = [] if self.tok.bos_token_id is None else [self.tok.bos_token_id]
        return [bos + ids for ids in self.tok(texts, add_special_tokens=False).input_ids] if texts else []

    def students(self, rows: list[dict]) -> list[list[int]]:
        return self.encode([self.student_template.format(**r) for r in rows])

    def teachers(self, rows: list[dict]) -> list[list[int]]:
        return self.encode([self.teacher_template.format(**r) for r in rows])

    def student(self, row: dict) -> list[int]:
        return self.students([row])[0]

    def teacher(self, row: dict) -> list[int]:
        return self.teachers([row])[0]

    def text(self, ids: list[int]) -> str:
        return self.tok.decode(ids, skip_special_tokens=True)


def score_request(needs, temperature: float, full_vocab_transport: str = "logprobs",
                  self_teacher: bool = False) -> ScoreRequest:
    """What to ask the teachers for. With hidden states and a loss that reads nothing else, the teacher
    skips its output layer (the learner applies it, and computes the teacher's token statistics), except
    for a self-teacher, whose per-sequence log q(y) the driver needs for opsd/pi_gap_nats."""
    hidden = needs.teacher_full and full_vocab_transport == "hidden_states"
    head_free = hidden and not (needs.teacher_sampled or needs.teacher_topk or needs.teacher_at_student_topk
                                or self_teacher)
    return ScoreRequest(topk=needs.teacher_topk, at_student_topk=needs.teacher_at_student_topk,
                        full_vocab=needs.teacher_full and not hidden, hidden_states=hidden, sampled=not head_free,
                        temperature=temperature)


def distill_batch(rollout: Rollout, scores: TeacherScores) -> TrainBatch:
    return TrainBatch(prompt_ids=rollout.prompt_ids, completion_ids=rollout.completion_ids,
                      completion_mask=rollout.completion_mask, behaviour_logprobs=rollout.behaviour_logprobs,
                      student_topk_ids=rollout.student_topk_ids,
                      student_topk_logprobs=rollout.student_topk_logprobs, teacher=scores,
                      weight_version=rollout.weight_version)


def reward_batch(rollout: Rollout, rewards: list[float], group_ids: list[int]) -> TrainBatch:
    adv = group_normalised_advantages(torch.tensor(rewards), torch.tensor(group_ids))
    return TrainBatch(prompt_ids=rollout.prompt_ids, completion_ids=rollout.completion_ids,
                      completion_mask=rollout.completion_mask, behaviour_logprobs=rollout.behaviour_logprobs,
                      advantages=adv, weight_version=rollout.weight_version)


def sft_batch(fmt: PromptFormatter, rows: list[dict], target_field: str) -> TrainBatch:
    """Reference rows: the completion is the row's target text followed by EOS."""
    targets = [t + [fmt.tok.eos_token_id] for t in fmt.tok([r[target_field] for r in rows],
                                                             add_special_tokens=False).input_ids]
    ids = pad_rows(targets, fmt.tok.pad_token_id)
    mask = pad_rows([[1] * len(t) for t in targets], 0).bool()
    return TrainBatch(prompt_ids=fmt.students(rows), completion_ids=ids, completion_mask=mask,
                      is_reference=torch.ones(len(rows), dtype=torch.bool))


def rollout_stats(rollout: Rollout) -> dict[str, float]:
    """Length, how often generation stopped by itself, and the 3-gram repetition rate (the paper's
    symptom of a collapsing student)."""
    comps = rollout.completions()
    repeats = total = 0
    for c in comps:
        grams = Counter(tuple(c[i:i + 3]) for i in range(len(c) - 2))
        total += sum(grams.values())
        repeats += sum(v - 1 for v in grams.values())
    return {"rollout/response_length": sum(map(len, comps)) / max(1, len(comps)),
            "rollout/stop_fraction": sum(f == "stop" for f in rollout.finish_reasons) / max(1, len(rollout)),
            "rollout/repetition_3gram": repeats / max(1, total)}


def teacher_stats(rollout: Rollout, scores: TeacherScores, self_teacher: bool) -> dict[str, float]:
    """The teacher's view of the student's samples (the evidence for failure mechanism 1: a teacher
    grading prefixes it would never write), token means: teacher/logprob_sampled log q(y_t),
    teacher/rank_sampled the teacher's rank of y_t (1 = its argmax), teacher/top1_fraction how often
    y_t is that argmax, teacher/entropy H(q) (HF teachers). For OPSD, opsd/pi_gap_nats: how much likelier the PI-conditioned teacher finds each completion than
    the PI-free student that wrote it, sum_t log q(y_t | x, PI) - log p(y_t | x), averaged over
    completions (p: the behaviour log-probs, at the same temperature as q).

    Empty when the teacher sent hidden states only: the learner reports the same token means."""
    if scores.sampled_logprobs is None:
        return {}
    mask = rollout.completion_mask.float()
    q = scores.sampled_logprobs * mask
    tokens = mask.sum().clamp(min=1)
    out = {"teacher/logprob_sampled": float(q.sum() / tokens)}
    if scores.sampled_rank is not None:
        rank = scores.sampled_rank.float() * mask
        out["teacher/rank_sampled"] = float(rank.sum() / tokens)
        out["teacher/top1_fraction"] = float(((rank == 1).float() * mask).sum() / tokens)
    if scores.entropy is not None:
        out["teacher/entropy"] = float((scores.entropy * mask).sum() / tokens)
    if self_teacher and rollout.behaviour_logprobs is not None:
        gap = ((scores.sampled_logprobs - rollout.behaviour_logprobs) * mask).sum(-1)
        out["opsd/pi_gap_nats"] = float(gap.mean())
    return out
