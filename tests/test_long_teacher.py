"""Teacher scoring to a token budget (teacher.max_tokens_per_batch): the grouping of rows (opd/batching.py),
scores that do not depend on it, and no [rows, T, V] float32 tensor unless the loss asks for the full
distribution."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from opd.batching import spread_by_tokens, token_batches
from opd.contracts import ScoreRequest
from teachers.hf_teacher import HFTeacher

PROMPTS = [[1, 5, 6, 41], [1, 9, 41, 4, 44, 7], [1, 44], [1, 8, 9], [1, 10, 11, 12, 13]]
LENGTHS = [9, 2, 16, 5, 0]  # one long row, short ones, an empty one


def _rows(T: int = 16):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 50, (len(LENGTHS), T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(LENGTHS)[:, None]
    student_topk = torch.randint(0, 55, (len(LENGTHS), T, 3), generator=g)
    return ids, mask, student_topk


def test_token_batches_respect_the_budget_and_group_like_lengths():
    prompts, comps = [3, 5, 2, 4, 3, 3], [100, 7, 90, 8, 40, 0]
    groups = token_batches(prompts, comps, 210)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        width = max(prompts[i] for i in g) + max(comps[i] for i in g)
        assert len(g) == 1 or len(g) * width <= 210
    assert groups == [[0, 2], [4, 3, 1, 5]]  # the long rows together, not a long row with short ones
    assert token_batches(prompts, comps, 1) == [[i] for i in (0, 2, 4, 3, 1, 5)]  # over budget: alone
    assert token_batches(prompts, comps, 10**6) == [[0, 2, 4, 3, 1, 5]]


def test_spread_by_tokens_balances_tokens_not_rows():
    tokens = [800, 100, 100, 100, 100, 100, 100, 100, 100]
    parts = spread_by_tokens(tokens, 2)
    assert sorted(i for p in parts for i in p) == list(range(9))
    assert [sum(tokens[i] for i in p) for p in parts] == [800, 800]
    assert parts[0] == [0]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_scores_do_not_depend_on_the_token_budget(assets, temperature):
    """Every field, at every budget (one row per forward up to all rows in one), equals the scores of
    today's whole-batch layout: the model's logits over [N, T, V], log-softmax, at the sampled ids."""
    ids, mask, stopk = _rows()
    request = ScoreRequest(topk=4, at_student_topk=True, full_vocab=True, temperature=temperature)
    t = HFTeacher(str(assets["teacher"]))
    from opd.modeling import completion_logits
    with torch.no_grad():
        logq = torch.log_softmax(completion_logits(t.model, PROMPTS, ids, mask, t.pad_id).float() / temperature, -1)
    want_sampled = logq.gather(-1, ids[..., None]).squeeze(-1) * mask
    for budget in (1, 30, 60, 10**6):
        t.max_tokens_per_batch = budget
        s = t.score(PROMPTS, ids, mask, request, stopk)
        torch.testing.assert_close(s.full_logprobs[mask], logq[mask], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.sampled_logprobs, want_sampled, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.at_student_topk[mask], logq.gather(-1, stopk)[mask], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(s.topk_logprobs[mask], logq.topk(4, -1).values[mask], rtol=1e-5, atol=1e-5)
        assert torch.equal(s.sampled_rank[mask], 1 + (logq > want_sampled[..., None]).sum(-1)[mask])
        assert (s.full_logprobs[~mask] == 0).all() and (s.sampled_rank[~mask] == 0).all()
        assert (s.topk_ids[~mask] == 0).all() and (s.entropy[~mask] == 0).all()
        h = t.score(PROMPTS, ids, mask, ScoreRequest(hidden_states=True, sampled=False))
        assert h.sampled_logprobs is None and (h.hidden_states[~mask] == 0).all()
        if budget == 1:
            first = h.hidden_states
        torch.testing.assert_close(h.hidden_states, first, rtol=1e-5, atol=1e-5)


class _LargestFloat32(TorchDispatchMode):
    """Records the largest new float32 tensor any op returns (every intermediate of the teacher's forward,
    its output layer and its statistics), by element count, and the most rows of any [..., V] one."""

    def __init__(self, vocab: int):
        super().__init__()
        self.vocab, self.largest, self.vocab_rows = vocab, (0, ()), 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in torch.utils._pytree.tree_leaves((args, kwargs))
                  if isinstance(a, torch.Tensor)}
        for x in out if isinstance(out, (tuple, list)) else [out]:
            if not isinstance(x, torch.Tensor) or x.untyped_storage().data_ptr() in inputs:
                continue  # a view (a transposed weight): no new memory
            if x.dtype == torch.float32 and x.dim() > 0:
                if x.numel() > self.largest[0]:
                    self.largest = (x.numel(), tuple(x.shape))
                if x.shape[-1] == self.vocab:
                    self.vocab_rows = max(self.vocab_rows, x.numel() // self.vocab)
        return out


def test_no_rows_x_T_x_V_float32_tensor_unless_the_full_distribution_is_asked(tmp_path):
    """Top-k, log-probs at the student's ids, sampled log-prob, rank and entropy: the largest float32
    tensor the teacher builds is one chunk of positions x V, far below [rows, T, V]. Asking for the full
    distribution (the log-prob transport) does build it: the detector sees it."""
    from tasks.tiny import write_tiny_models
    path = write_tiny_models(tmp_path, sizes={"wide": (64, 2, 2)}, vocab_size=4096)["wide"]
    ids, mask, _ = _rows(T=64)
    mask[:, :] = True
    t = HFTeacher(str(path))
    V = t.vocab
    stopk = torch.randint(0, V, (*ids.shape, 3))
    t.chunk_bytes = 8 * 4 * V  # 8 positions a chunk (at V = 151,936 the default is ~27)
    rows_T_V = ids.numel() * V
    with _LargestFloat32(V) as seen:
        t.score(PROMPTS, ids, mask, ScoreRequest(topk=4, at_student_topk=True, temperature=0.7), stopk)
    assert seen.vocab_rows <= 8, seen.vocab_rows  # [chunk, V] blocks only
    assert seen.largest[0] * 20 <= rows_T_V, seen.largest  # the forward's activations are the largest now
    with _LargestFloat32(V) as seen:
        t.score(PROMPTS, ids, mask, ScoreRequest(full_vocab=True), stopk)
    assert seen.largest[0] >= rows_T_V, seen.largest


def test_auto_transport_picks_hidden_states_where_the_teacher_can_send_them(write_manifest, assets):
    from launch.manifest import load_manifest
    cfg = load_manifest(write_manifest(loss={"name": "full_reverse_kl"}))
    assert cfg.teacher.full_vocab_transport == "hidden_states"  # HF teacher, plain Linear head
    assert load_manifest(write_manifest()).teacher.full_vocab_transport == "logprobs"  # sampled_token_rkl
    explicit = load_manifest(write_manifest(loss={"name": "full_reverse_kl"}, teacher={"full_vocab_transport": "logprobs"}))
    assert explicit.teacher.full_vocab_transport == "logprobs"


def test_an_oversized_log_prob_transport_is_refused_with_its_size(write_manifest):
    from launch.config import ManifestError
    from launch.manifest import load_manifest
    over = dict(loss={"name": "full_reverse_kl"}, teacher={"full_vocab_transport": "logprobs",
                                                           "max_logprobs_transport_gb": 1e-6})
    # 4 prompts x 2 samples x 4 tokens x 55 ids x 4 bytes = 7040 bytes
    with pytest.raises(ManifestError, match=r"8 rows x 4 tokens x 55 vocabulary x 4 bytes = 0.0 GB a step.*hidden_states"):
        load_manifest(write_manifest(**over))
