"""Teacher on Hugging Face transformers. Also the OPSD self-teacher: load the student's path and,
for a live teacher, receive the student's weights after every step."""
from __future__ import annotations

from typing import Optional

import torch

from opd.contracts import Rollout, SamplingSpec, ScoreRequest, TeacherScores, concat_scores
from opd.modeling import actor_device, completion_hidden, completion_logits, load_model, output_head
from opd.sampling import generate
from opd.tokens import special_ids
from opd.weight_sync.gloo import HFModelReceiver
from teachers.base import ScoresRollouts, capabilities_for, check_same_tokenizer


class HFTeacher(HFModelReceiver, ScoresRollouts):
    capabilities = capabilities_for("hf")

    def __init__(self, model_path: str, dtype: str = "float32", student_path: Optional[str] = None,
                 threads: int = 0, micro_batch: int = 64, use_gpu: bool = False, trust_remote_code: bool = False):
        self.model, tok = load_model(model_path, dtype, actor_device(use_gpu), threads, trust_remote_code)
        if student_path and student_path != model_path:
            from transformers import AutoTokenizer
            check_same_tokenizer(tok, AutoTokenizer.from_pretrained(student_path))
        ids = special_ids(tok, model_path)
        self.pad_id, self.eos_id = ids.pad, ids.eos
        self.gen = torch.Generator(next(self.model.parameters()).device).manual_seed(0)
        self.micro_batch = micro_batch
        self.weight_version = 0

    def generate(self, teacher_prompts: list[list[int]], spec: SamplingSpec) -> Rollout:
        """Completions the teacher writes from its own prompts: reference rows for an SFT mix
        (loss.reference.source: teacher)."""
        return generate(self.model, teacher_prompts, spec, self.gen, self.pad_id, self.eos_id, self.weight_version)

    @torch.no_grad()
    def score(self, teacher_prompts: list[list[int]], completion_ids: torch.Tensor,
              completion_mask: torch.Tensor, request: ScoreRequest,
              student_topk_ids: Optional[torch.Tensor] = None) -> TeacherScores:
        mb = self.micro_batch
        parts = [self._score(teacher_prompts[s:s + mb], completion_ids[s:s + mb], completion_mask[s:s + mb], request,
                             None if student_topk_ids is None else student_topk_ids[s:s + mb])
                 for s in range(0, len(teacher_prompts), mb)]
        return concat_scores(parts)

    def _score(self, prompts, completion_ids, completion_mask, request, student_topk_ids) -> TeacherScores:
        hidden = None
        if request.hidden_states:  # the learner re-applies this model's head to them, chunk by chunk
            hidden = completion_hidden(self.model, prompts, completion_ids, completion_mask, self.pad_id)
            hidden = hidden.masked_fill(~completion_mask.to(hidden.device)[..., None], 0.0)
            if not (request.sampled or request.topk or request.at_student_topk):
                return TeacherScores(hidden_states=hidden.cpu())  # no output layer here at all
            logits = output_head(self.model)(hidden)
        else:
            logits = completion_logits(self.model, prompts, completion_ids, completion_mask, self.pad_id)
        z = logits.float() / request.temperature  # [n, T, V] on the model's device
        del logits
        mask = completion_mask.to(z.device)
        ids = completion_ids.to(z.device)
        sampled, rank, entropy, lse = token_stats(z, ids)
        masked = lambda x: x.masked_fill(~mask[..., None] if x.dim() == 3 else ~mask, 0).cpu()  # noqa: E731
        at = lambda ids: masked(z.gather(-1, ids.to(z.device)) - lse[..., None])  # noqa: E731  log q at ids
        out = TeacherScores(sampled_logprobs=masked(sampled), sampled_rank=masked(rank), entropy=masked(entropy))
        if request.topk:
            top = z.topk(request.topk, -1).indices
            out.topk_ids, out.topk_logprobs = top.cpu(), at(top)
        if request.at_student_topk:
            if student_topk_ids is None:
                raise ValueError("teacher: log-probs at the student's top-k were requested but the rollout "
                                 "returned no student_topk_ids")
            out.at_student_topk = at(student_topk_ids)
        if request.full_vocab:
            out.full_logprobs = z.sub_(lse[..., None]).cpu()  # z is not read after this
        if hidden is not None:
            out.hidden_states = hidden.cpu()
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
        out.append(torch.stack([(zy - lse).squeeze(-1), 1 + (c > zy).sum(-1).to(c.dtype), entropy, lse.squeeze(-1)]))
    sampled, rank, entropy, lse = torch.cat(out, 1).reshape(4, *z.shape[:-1]) if out else z.new_zeros(4, *z.shape[:-1])
    return sampled, rank.long(), entropy, lse
