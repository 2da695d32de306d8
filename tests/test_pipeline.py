"""On-policy pipelining inside a step (rollout.pipeline_chunks, launch/pipeline.py) with real Ray, DeepSpeed
and HF engines on the tiny models: a run in chunks hands the learner each chunk with the whole step's
denominators and logs the metrics the one-chunk loop logs, over the whole step; combinations it does not
support are refused before any work, naming the key. The learner's half (chunks' gradients equal the
one-call step's) is tests/test_learner_pipeline.py."""
import json

import pytest
import torch

from launch.cli import main
from launch.cluster import LearnerGroup
from launch.config import ManifestError
from launch.derived import chunk_bounds
from launch.manifest import load_manifest
from launch.pipeline import merge_routed
from launch.teacher_set import RoutedScores
from opd.contracts import TeacherScores


def metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("over,match", [
    (["algorithm=grpo", "loss.name=grpo", "teacher.kind=none"], r"algorithm 'grpo' is not pipelined"),
    (["algorithm=sft", "loss.name=sft", "teacher.kind=none"], r"algorithm 'sft' is not pipelined"),
    (["rollout.max_lag=1"], r"rollout.max_lag: 1 already overlaps"),
    (["learner.updates_per_step=2", "learner.micro_batch_size=2"], r"learner.updates_per_step: 2"),
    (["loss.name=weighted_sum", "loss.params={components: [{name: sampled_token_rkl}, {name: sft, weight: 0.1}]}"],
     r"reference rows"),
    (["cluster.mode=ray", "cluster.num_gpus=1", "cluster.colocate=true"], r"cluster.colocate: true"),
])
def test_unsupported_combinations_are_refused_naming_the_key(write_manifest, over, match):
    with pytest.raises(ManifestError, match=r"^rollout.pipeline_chunks: 2 is refused: .*" + match):
        load_manifest(write_manifest(), ["rollout.pipeline_chunks=2", *over])


def test_chunks_are_whole_micro_batches(write_manifest):
    with pytest.raises(ManifestError, match=r"^rollout.pipeline_chunks: 3 chunks of whole micro-batches need at "
                                            r"least 3 of them, but a step has 2"):
        load_manifest(write_manifest(), ["rollout.pipeline_chunks=3"])  # 8 rows, micro-batches of 4
    with pytest.raises(ManifestError, match=r"^rollout.pipeline_chunks: must be > 0"):
        load_manifest(write_manifest(), ["rollout.pipeline_chunks=0"])
    cfg = load_manifest(write_manifest(), ["rollout.pipeline_chunks=3", "learner.micro_batch_size=2"])
    assert chunk_bounds(cfg, 8) == [slice(0, 2), slice(2, 6), slice(6, 8)]
    cfg = load_manifest(write_manifest(), ["rollout.pipeline_chunks=3", "learner.max_tokens_per_micro_batch=64"])
    assert [b.stop - b.start for b in chunk_bounds(cfg, 8)] == [3, 2, 3]


def test_refused_by_train_before_any_work(write_manifest, tmp_path, capsys):
    assert main(["train", str(write_manifest()), "rollout.pipeline_chunks=2", "rollout.max_lag=1"]) == 2
    assert "rollout.pipeline_chunks: 2 is refused" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_merged_teacher_statistics_are_the_whole_steps():
    """Two chunks of widths 2 and 3, two teachers routed across them: re-assembled at width 3, every row in
    order, each teacher's rows in row order."""
    a = TeacherScores(sampled_logprobs=torch.tensor([[1., 2.], [3., 4.]]), topk_ids=torch.zeros(2, 2, 1))
    b = TeacherScores(sampled_logprobs=torch.tensor([[5., 6., 7.]]))
    a0, a1 = TeacherScores(sampled_logprobs=a.sampled_logprobs[:1]), TeacherScores(sampled_logprobs=a.sampled_logprobs[1:])
    chunks = [RoutedScores(a, [(0, [0], a0), (1, [1], a1)]), RoutedScores(b, [(1, [0], b)])]
    got = merge_routed(chunks, [2, 1], 3)
    assert torch.equal(got.scores.sampled_logprobs, torch.tensor([[1., 2., 0.], [3., 4., 0.], [5., 6., 7.]]))
    assert got.scores.topk_ids is None  # the loss's inputs went to the learner, not to the statistics
    (g0, idx0, s0), (g1, idx1, s1) = got.parts
    assert (g0, idx0, g1, idx1) == (0, [0], 1, [1, 2])
    assert torch.equal(s0.sampled_logprobs, torch.tensor([[1., 2., 0.]]))
    assert torch.equal(s1.sampled_logprobs, torch.tensor([[3., 4., 0.], [5., 6., 7.]]))


@pytest.mark.parametrize("loss,reduction", [("sampled_token_rkl", "token_mean"), ("full_reverse_kl", "sample_mean")])
def test_a_run_in_chunks_trains_on_the_whole_steps_denominators(ray_session, write_manifest, tmp_path,
                                                                monkeypatch, loss, reduction):
    seen, original = [], LearnerGroup.submit_chunk

    def wrapped(self, chunk, counts, last):
        seen.append((chunk, counts, last))
        return original(self, chunk, counts, last)
    monkeypatch.setattr(LearnerGroup, "submit_chunk", wrapped)
    over = dict(run={"name": "piped", "output_dir": str(tmp_path / "runs"), "steps": 2},
                loss={"name": loss, "reduction": reduction},
                learner={"micro_batch_size": 2, "lr": 1e-3}, eval={"interval": 0, "size": 8})
    assert main(["train", str(write_manifest(**over)), "rollout.pipeline_chunks=3"]) == 0
    assert main(["train", str(write_manifest(**{**over, "run": {**over["run"], "name": "one"}}))]) == 0
    assert len(seen) == 6 and [last for _, _, last in seen] == [False, False, True] * 2
    rows = [r for r in metrics(tmp_path / "runs" / "piped") if "train/loss" in r]
    one = [r for r in metrics(tmp_path / "runs" / "one") if "train/loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    for step, row in enumerate(rows):
        chunks = seen[3 * step: 3 * step + 3]
        assert [len(c) for c, _, _ in chunks] == [2, 4, 2]
        tokens = sum(int(c.completion_mask.sum()) for c, _, _ in chunks)
        whole = (tokens, 0) if reduction == "token_mean" else (8, 0)  # the step's tokens, or its rows
        assert all(counts == whole for _, counts, _ in chunks)  # the whole step's, in every chunk
        lengths = [int(n) for c, _, _ in chunks for n in c.completion_mask.sum(-1)]
        assert row["rollout/response_length"] == pytest.approx(sum(lengths) / len(lengths))
        assert row["train/skipped_nonfinite"] == 0 and torch.isfinite(torch.tensor(row["train/loss"]))
    assert set(rows[0]) == set(one[0])  # the same metrics as the one-chunk loop
