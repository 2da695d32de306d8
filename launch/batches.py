"""From dataset rows to prompts, and from rollouts + teacher scores to a TrainBatch."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Optional

import torch

from losses import group_normalised_advantages
from opd.contracts import Rollout, ScoreRequest, TeacherScores, TrainBatch, pad_rows
from opd.tokens import special_ids


@dataclass(frozen=True)
class ChatSettings:
    """data.chat_template on: prompts are rendered by the tokenizer's chat template."""
    kwargs: dict = field(default_factory=dict)   # data.chat_template_kwargs, e.g. {"enable_thinking": False}
    student_system: Optional[str] = None          # data.system_prompt (None: the row's own, if any)
    teacher_system: Optional[str] = None          # teacher.system_prompt (None: the student's; "": none)
    messages_field: str = "messages"


class PromptFormatter:
    """Renders the student's and the teacher's prompts from one row, as token ids. For OPSD the teacher's
    template (and, in chat format, its system message) carries privileged information the student never
    sees; completions are shared token for token, so only the prompts differ.

    Plain text: <bos> (where the tokenizer has one and the text does not already start with it) + the
    template's tokens. Chat: the row's conversation (its messages, or one user turn holding the prompt)
    with the template applied to the last user turn, the system message set, rendered by
    apply_chat_template(add_generation_prompt=True) and tokenized with no special tokens added (the
    template writes any BOS itself, so none is doubled)."""

    def __init__(self, tokenizer, student_template: str, teacher_template: str, chat: Optional[ChatSettings] = None):
        self.tok, self.student_template, self.teacher_template, self.chat = tokenizer, student_template, teacher_template, chat

    def encode(self, texts: list[str]) -> list[list[int]]:
        """The tokens of each text, <bos> first where the tokenizer has one. One tokenizer call for the list:
        a call per text costs ~4x more, and a step tokenizes every prompt twice (student and teacher)."""
        if not texts:
            return []
        ids = self.tok(texts, add_special_tokens=False).input_ids
        bos = self.tok.bos_token_id
        if self.chat is not None or bos is None:
            return ids
        return [x if x[:1] == [bos] else [bos] + x for x in ids]

    def students(self, rows: list[dict]) -> list[list[int]]:
        return self.encode(self.render(rows, self.student_template, self.chat and self.chat.student_system))

    def teachers(self, rows: list[dict]) -> list[list[int]]:
        system = None
        if self.chat is not None:
            system = self.chat.student_system if self.chat.teacher_system is None else self.chat.teacher_system
        return self.encode(self.render(rows, self.teacher_template, system))

    def render(self, rows: list[dict], template: str, system: Optional[str] = None) -> list[str]:
        """The prompt texts (before tokenization)."""
        if self.chat is None:
            return [template.format(**r) for r in rows]
        convs = [self.conversation(r, template, system) for r in rows]
        return self.tok.apply_chat_template(convs, add_generation_prompt=True, tokenize=False, **self.chat.kwargs)

    def conversation(self, row: dict, template: str, system: Optional[str]) -> list[dict]:
        """The row's messages up to its last user turn (a trailing assistant answer is not prompt), that
        turn's content replaced by the template (whose {prompt} is the turn as written), and the system
        message replaced by `system` ("" removes it; None keeps the row's)."""
        msgs = [dict(m) for m in (row.get(self.chat.messages_field) or [{"role": "user", "content": row["prompt"]}])]
        last_user = max(i for i, m in enumerate(msgs) if m["role"] == "user")
        msgs = msgs[:last_user + 1]
        msgs[last_user]["content"] = template.format(**row)
        if system is not None:
            msgs = [m for i, m in enumerate(msgs) if not (i == 0 and m["role"] == "system")]
            msgs = ([{"role": "system", "content": system}] if system else []) + msgs
        return msgs

    def with_chat_kwargs(self, kwargs: Optional[dict]) -> "PromptFormatter":
        """This formatter with `kwargs` merged over its chat_template_kwargs (itself when there are none)."""
        if not kwargs or self.chat is None:
            return self
        chat = replace(self.chat, kwargs={**self.chat.kwargs, **kwargs})
        return PromptFormatter(self.tok, self.student_template, self.teacher_template, chat)

    def for_teacher(self, template: str, system: Optional[str]) -> "PromptFormatter":
        """This formatter with another teacher's prompt template and system prompt (one per entry of teachers:)."""
        chat = None if self.chat is None else replace(self.chat, teacher_system=system)
        return PromptFormatter(self.tok, self.student_template, template, chat)

    def student(self, row: dict) -> list[int]:
        return self.students([row])[0]

    def teacher(self, row: dict) -> list[int]:
        return self.teachers([row])[0]

    def text(self, ids: list[int]) -> str:
        """A completion as text for the verifier: special tokens (end of turn, EOS) left out."""
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
    """Reference rows: the completion is the row's target text followed by EOS (a chat tokenizer's EOS is
    its end of turn)."""
    special = special_ids(fmt.tok)
    targets = [t + [special.eos] for t in fmt.tok([r[target_field] for r in rows], add_special_tokens=False).input_ids]
    ids = pad_rows(targets, special.pad)
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
