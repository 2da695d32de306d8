"""`opd train` on the tiny models with the keys the paper's scripts need, all at once: the masked
student-support TopK (T1 / T2, support: student_masked) from an HF teacher and from a vLLM teacher
(its CPU build) that returns only its own top-k, the per-sample reduction, several optimizer updates per
step and the frozen-reference KL."""
import json
import math

import pytest

from launch.cli import main
from launch.config import ManifestError
from launch.manifest import load_manifest

PAPER = {"reduction": "sample_mean", "kl_to_reference": {"coef": 0.01, "estimator": "low_var_kl"}}
VLLM = {"kind": "vllm", "vllm": {"kv_cache_memory_gb": 0.0625, "max_logprobs": 5}}


def masked_topk(name: str, k: int, teacher_k: int) -> dict:
    return {"name": name, "params": {"k": k, "support": "student_masked", "teacher_k": teacher_k}, **PAPER}


@pytest.mark.parametrize("over", [
    dict(loss=masked_topk("topk_reverse_kl_biased", 3, 5)),
    dict(loss=masked_topk("topk_reverse_kl_sg", 1, 5), teacher=VLLM,
         rollout={"engine": "vllm", "vllm": {"kv_cache_memory_gb": 0.0625}}),
], ids=["t1-hf-teacher", "t2-vllm-teacher"])
def test_paper_keys_run_end_to_end(ray_session, write_manifest, tmp_path, over):
    manifest = write_manifest(learner={"micro_batch_size": 2, "lr": 1e-3, "updates_per_step": 2}, **over)
    assert main(["train", str(manifest), "eval.interval=0"]) == 0
    rows = [json.loads(x) for x in (tmp_path / "runs" / "t" / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "train/loss" in r]
    assert len(steps) == 2
    for r in steps:
        for key in ("train/loss", "train/kl_to_reference", "train/teacher_topk_hit_fraction",
                    "train/student_mass_on_support", "train/grad_norm"):
            assert math.isfinite(r[key]), key
        assert r["train/skipped_updates"] == 0 and 0 <= r["train/teacher_topk_hit_fraction"] <= 1
    # step 1's first update starts from the reference's weights; its second has moved away from them
    assert steps[0]["train/kl_to_reference"] >= 0 and steps[1]["train/kl_to_reference"] > 0


def test_a_vllm_teacher_serves_the_masked_student_support_but_not_the_exact_one(write_manifest):
    ok = load_manifest(write_manifest(teacher=VLLM, loss=masked_topk("topk_reverse_kl_sg", 1, 5)))
    assert ok.loss.params["support"] == "student_masked"
    with pytest.raises(ManifestError, match="logprobs_at_any_ids"):
        load_manifest(write_manifest(teacher=VLLM, loss={"name": "topk_reverse_kl_sg",
                                                         "params": {"k": 1, "support": "student"}}))
    with pytest.raises(ManifestError, match="top-8"):  # the teacher's own top-k must hold teacher_k ids
        load_manifest(write_manifest(teacher=VLLM, loss=masked_topk("topk_reverse_kl_sg", 1, 8)))
