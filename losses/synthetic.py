"""Random but mutually consistent (logits, LossBatch) pairs for tests and benchmarks.

Consistent means: tokens are sampled from the student, behaviour log-probs are the student's own
(on-policy), and every teacher field (sampled, top-k, at-student-top-k) is read off one full
teacher distribution, so identities between losses hold exactly."""
from __future__ import annotations

import torch

from losses.base import LossBatch


def synthetic_batch(n_seq: int = 3, length: int = 5, vocab: int = 11, k: int = 4, ks: int = 4,
                    seed: int = 0, dtype: torch.dtype = torch.float64, scale: float = 2.0,
                    empty_seq: bool = True, n_reference: int = 0, teacher_full: bool = True):
    """-> (logits [M, V] leaf requiring grad, LossBatch), M = n_seq * length rows flattened
    row-major. Sequence 0 has no completion tokens when empty_seq (a mask with an empty row);
    the last n_reference sequences are reference rows (is_reference)."""
    g = torch.Generator().manual_seed(seed)
    m = n_seq * length
    lengths = torch.randint(1, length + 1, (n_seq,), generator=g)
    if empty_seq:
        lengths[0] = 0
    mask = torch.arange(length)[None, :] < lengths[:, None]                      # [N, T]
    weights = (mask.to(dtype) / max(int(mask.sum()), 1)).reshape(m)
    logits = (torch.randn(m, vocab, generator=g, dtype=dtype) * scale)
    logq = torch.log_softmax(torch.randn(m, vocab, generator=g, dtype=dtype) * scale, -1)
    logp = torch.log_softmax(logits, -1)
    tokens = torch.multinomial(logp.exp(), 1, generator=g).squeeze(-1)
    is_ref = (torch.arange(n_seq) >= n_seq - n_reference)[:, None].expand(n_seq, length).reshape(m)
    t_ids = logq.topk(k, -1).indices
    s_ids = logp.topk(ks, -1).indices
    batch = LossBatch(
        tokens=tokens, weights=weights,
        behaviour_logprobs=logp.gather(-1, tokens[:, None]).squeeze(-1),
        teacher_sampled_logprobs=logq.gather(-1, tokens[:, None]).squeeze(-1),
        teacher_topk_ids=t_ids, teacher_topk_logprobs=logq.gather(-1, t_ids),
        student_topk_ids=s_ids, student_topk_logprobs=logp.gather(-1, s_ids),
        teacher_at_student_topk=logq.gather(-1, s_ids),
        teacher_full_logprobs=logq if teacher_full else None,
        advantages=torch.randn(n_seq, 1, generator=g, dtype=dtype).expand(n_seq, length).reshape(m).clone(),
        is_reference=is_ref if n_reference else None,
        seq_ids=torch.arange(n_seq)[:, None].expand(n_seq, length).reshape(m).clone(),
    )
    return logits.requires_grad_(), batch
