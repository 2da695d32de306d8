"""Teacher on Hugging Face transformers. Also the OPSD self-teacher: load the student's path and,
for a live teacher, receive the student's weights after every step."""
from __future__ import annotations

from typing import Optional

import torch

from opd.batching import token_batches
from opd.contracts import Rollout, SamplingSpec, ScoreRequest, TeacherScores
from opd.modeling import (actor_device, completion_hidden, completion_logits, load_model, output_head,
                          plain_head_problem)
from opd.sampling import generate
from opd.tokens import special_ids
from opd.weight_sync.gloo import HFModelReceiver
from teachers.base import ScoresRollouts, TeacherCapabilities, check_same_tokenizer
from teachers.kinds import ActorCall, TeacherKind, TeacherStart, register


def capabilities() -> TeacherCapabilities:
    """The full forward runs in-process: anything (full vocabulary, log-probs at any ids, any k, any
    temperature)."""
    return TeacherCapabilities(full_vocab=True, logprobs_at_any_ids=True, max_topk=1 << 30)


class HFTeacher(HFModelReceiver, ScoresRollouts):
    capabilities = capabilities()

    def __init__(self, model_path: str, dtype: str = "float32", student_path: Optional[str] = None,
                 threads: int = 0, max_tokens_per_batch: int = 16384, use_gpu: bool = False,
                 trust_remote_code: bool = False):
        self.model, tok = load_model(model_path, dtype, actor_device(use_gpu), threads, trust_remote_code)
        if student_path and student_path != model_path:
            from transformers import AutoTokenizer
            check_same_tokenizer(tok, AutoTokenizer.from_pretrained(student_path))
        ids = special_ids(tok, model_path)
        self.pad_id, self.eos_id = ids.pad, ids.eos
        self.gen = torch.Generator(next(self.model.parameters()).device).manual_seed(0)
        self.max_tokens_per_batch = max_tokens_per_batch  # teacher.max_tokens_per_batch
        problem = plain_head_problem(self.model)
        self.head = None if problem else output_head(self.model)  # None: the model's own logits path
        self.vocab = self.model.get_output_embeddings().weight.shape[0]
        self.hidden = self.model.config.hidden_size
        # one [chunk, V] float32 block of logits at a time: small enough for a CPU's cache-friendly
        # passes, large enough to keep a GPU busy
        self.chunk_bytes = 2**24 if self.gen.device.type == "cpu" else 2**28
        self.weight_version = 0

    def generate(self, teacher_prompts: list[list[int]], spec: SamplingSpec) -> Rollout:
        """Completions the teacher writes from its own prompts: reference rows for an SFT mix
        (loss.reference.source: teacher)."""
        return generate(self.model, teacher_prompts, spec, self.gen, self.pad_id, self.eos_id, self.weight_version)

    @torch.no_grad()
    def score(self, teacher_prompts: list[list[int]], completion_ids: torch.Tensor,
              completion_mask: torch.Tensor, request: ScoreRequest,
              student_topk_ids: Optional[torch.Tensor] = None) -> TeacherScores:
        """Rows scored in groups of at most `max_tokens_per_batch` padded tokens (rows of like length
        together, each group padded to its own longest row), the output layer applied to a chunk of
        completion positions at a time: memory is set by the budget, not by rows x length x vocabulary.
        Only what `request` asks for is returned ([N, T, V] log-probs only with request.full_vocab)."""
        if request.at_student_topk and student_topk_ids is None:
            raise ValueError("teacher: log-probs at the student's top-k were requested but the rollout "
                             "returned no student_topk_ids")
        out = _empty_scores(request, completion_ids, student_topk_ids, self.vocab, self.hidden, self.model.dtype)
        lengths = completion_mask.sum(-1).tolist()
        for rows in token_batches([len(p) for p in teacher_prompts], lengths, self.max_tokens_per_batch):
            width = max(1, max(lengths[i] for i in rows))
            idx = torch.as_tensor(rows)
            ids, mask = completion_ids[idx, :width], completion_mask[idx, :width]
            topk = None if student_topk_ids is None else student_topk_ids[idx, :width]
            self._score_rows([teacher_prompts[i] for i in rows], ids, mask, request, topk, out, idx)
        return out

    def _score_rows(self, prompts, ids, mask, request, student_topk_ids, out: TeacherScores, rows) -> None:
        """Score one token batch into `out` at `rows` (columns :T of this batch)."""
        T = ids.shape[1]
        if self.head is not None:
            hidden = completion_hidden(self.model, prompts, ids, mask, self.pad_id)  # [n, T, H]
            if request.hidden_states:  # the learner re-applies this model's head to them, chunk by chunk
                out.hidden_states[rows, :T] = hidden.masked_fill(~mask.to(hidden.device)[..., None], 0.0).cpu()
            if not _needs_head(request):
                return  # no output layer here at all
            source, to_logits = hidden[mask.to(hidden.device)], self.head  # [M, H]
        else:  # a head that is not a plain Linear: its logits, bounded by the token budget, then chunked
            logits = completion_logits(self.model, prompts, ids, mask, self.pad_id)
            source, to_logits = logits[mask.to(logits.device)], (lambda x: x)  # [M, V]
            del logits
        where = mask.nonzero()                       # [M, 2]: (row in batch, position)
        r, t = rows[where[:, 0]], where[:, 1]        # positions in the output tensors
        tokens = ids[mask].to(source.device)
        at_ids = None if student_topk_ids is None else student_topk_ids[mask].to(source.device)  # [M, Ks]
        step = max(1, self.chunk_bytes // (4 * self.vocab))
        for s in range(0, source.shape[0], step):
            sl = slice(s, s + step)
            z = to_logits(source[sl]).float() / request.temperature  # [c, V]: the only [*, V] tensor
            sampled, rank, entropy, lse = token_stats(z, tokens[sl])
            cr, ct = r[sl], t[sl]
            if request.sampled:
                out.sampled_logprobs[cr, ct], out.sampled_rank[cr, ct] = sampled.cpu(), rank.cpu()
                out.entropy[cr, ct] = entropy.cpu()
            if request.topk:
                top = z.topk(request.topk, -1).indices
                out.topk_ids[cr, ct] = top.cpu()
                out.topk_logprobs[cr, ct] = (z.gather(-1, top) - lse[:, None]).cpu()
            if request.at_student_topk:
                out.at_student_topk[cr, ct] = (z.gather(-1, at_ids[sl]) - lse[:, None]).cpu()
            if request.full_vocab:
                out.full_logprobs[cr, ct] = z.sub_(lse[:, None]).cpu()
            del z


def _needs_head(request: ScoreRequest) -> bool:
    return bool(request.sampled or request.topk or request.at_student_topk or request.full_vocab)


def _empty_scores(request: ScoreRequest, completion_ids: torch.Tensor, student_topk_ids: Optional[torch.Tensor],
                  vocab: int, hidden: int, hidden_dtype: torch.dtype) -> TeacherScores:
    """Zero-filled [N, T(, ...)] tensors for what `request` asks (zeros stay at padded positions)."""
    N, T = completion_ids.shape
    f = lambda *shape, dtype=torch.float32: torch.zeros(N, T, *shape, dtype=dtype)  # noqa: E731
    out = TeacherScores()
    if request.sampled:
        out.sampled_logprobs, out.sampled_rank, out.entropy = f(), f(dtype=torch.long), f()
    if request.topk:
        out.topk_ids, out.topk_logprobs = f(request.topk, dtype=torch.long), f(request.topk)
    if request.at_student_topk:
        out.at_student_topk = f(student_topk_ids.shape[-1])
    if request.full_vocab:
        out.full_logprobs = f(vocab)
    if request.hidden_states:
        out.hidden_states = f(hidden, dtype=hidden_dtype)
    return out


def token_stats(z: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """From logits z [n, T, V] (already divided by the temperature) and the sampled ids [n, T]:
    log q(y_t), the teacher's rank of y_t (1 + tokens with a higher logit: ties count in the student's
    favour), the entropy H(q), and logsumexp(z), each [n, T].

    Row chunks small enough to stay in cache on a CPU (each [rows, V] intermediate ~1 MB): at a
    32k vocabulary this is ~3x faster than whole-tensor log_softmax, comparison and entropy passes."""
    flat_z, flat_ids = z.reshape(-1, z.shape[-1]), ids.reshape(-1, 1)
    rows = max(1, (2**20 if z.device.type == "cpu" else 2**28) // (4 * z.shape[-1]))
    out = []
    for s in range(0, flat_z.shape[0], rows):
        c = flat_z[s:s + rows]
        lse = torch.logsumexp(c, -1, keepdim=True)
        zy = c.gather(-1, flat_ids[s:s + rows])
        entropy = lse.squeeze(-1) - (torch.softmax(c, -1) * c).sum(-1)  # H = lse - E_q[z]
        rank = 1 + torch.gt(c, zy, out=torch.empty_like(c)).sum(-1)  # into floats: a bool sum was 6-7x slower
        out.append(torch.stack([(zy - lse).squeeze(-1), rank, entropy, lse.squeeze(-1)]))
    sampled, rank, entropy, lse = torch.cat(out, 1).reshape(4, *z.shape[:-1]) if out else z.new_zeros(4, *z.shape[:-1])
    return sampled, rank.long(), entropy, lse


def start(s: TeacherStart) -> ActorCall:
    return ActorCall(HFTeacher, (s.path, s.dtype), dict(
        student_path=s.student_path, threads=s.threads, use_gpu=s.use_gpu,
        max_tokens_per_batch=s.max_tokens_per_batch, trust_remote_code=s.trust_remote_code))


register(TeacherKind("hf", lambda max_logprobs, on_gpu: capabilities(), start, hf_model=True))
