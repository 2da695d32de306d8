"""Manifests: typed loading, extends, overrides, and errors that name the key before any work."""
import pytest

from launch.config import ManifestError

from launch.manifest import load_manifest, to_yaml


def test_loads_typed_with_overrides(write_manifest):
    cfg = load_manifest(write_manifest(), ["rollout.temperature=0.7", "loss.params.coef=2.0"])
    assert cfg.rollout.temperature == 0.7 and isinstance(cfg.run.steps, int)
    assert cfg.loss.params == {"coef": 2.0}
    assert "temperature: 0.7" in to_yaml(cfg)


def test_extends_merges_parent_then_child(tmp_path, write_manifest):
    parent = write_manifest(rollout={"max_new_tokens": 3})
    child = tmp_path / "child.yaml"
    child.write_text(f"extends: {parent.name}\nrun: {{name: child}}\n")
    cfg = load_manifest(child)
    assert cfg.run.name == "child" and cfg.rollout.max_new_tokens == 3 and cfg.run.steps == 2


# A Ray cluster's GPUs (local mode would ask this machine for CUDA devices) with vLLM rollouts.
GPUS_2 = ["cluster.mode=ray", "cluster.num_gpus=2", "rollout.engine=vllm"]


@pytest.mark.parametrize("override,message", [
    (["rollout.temprature=0.5"], r"unknown key 'rollout.temprature'; did you mean 'rollout.temperature'"),
    (["learner.lr=fast"], r"learner.lr"),
    (["cluster.mode=slurm"], r"cluster.mode: 'slurm' is not one of"),
    (["learner.micro_batch_size=3"], r"learner.micro_batch_size: 8 rows per step"),
    (["learner.grad_accum=5"], r"learner.grad_accum: 5"),
    (["model.path=/nowhere/model"], r"model.path: path '/nowhere/model' does not exist"),
    (["cluster.num_gpus=1"], r"cluster.num_gpus: 1 requested but this machine has 0 CUDA device"),
    (["cluster.mode=ray", "cluster.num_gpus=3", "rollout.engine=vllm", "rollout.vllm.tensor_parallel_size=2"],
     r"cluster.num_gpus: 3, but the layout needs 4 \(1 learner rank\(s\) 1 GPU, 1 rollout engine\(s\) 2 GPU"),
    (["cluster.colocate=true"], r"cluster.colocate: .* needs cluster.num_gpus > 0"),
    (["sync.backend=nccl"], r"sync.backend: 'nccl' moves weights between GPUs"),
    (["rollout.engine=vllm", "rollout.temperature=0.7", "rollout.top_p=0.9"], r"no exact vLLM logprobs mode"),
    (["teacher.kind=vllm", "rollout.temperature=0.7"], r"rollout.temperature: 0.7 .* scores at temperature 1.0 only"),
    (["teacher.kind=vllm", "loss.name=topk_reverse_kl_sg", "loss.params={k: 4, support: student}"],
     r"loss.name: 'topk_reverse_kl_sg' needs exact teacher log-probs at the student's top-k ids .* 'vllm' teacher"),
    (["teacher.kind=vllm", "loss.name=full_reverse_kl"], r"full-vocabulary .* 'vllm' teacher"),
    (["teacher.kind=vllm", "loss.name=topk_reverse_kl_sg", "loss.params={k: 32, support: teacher}"],
     r"top-32 \(this teacher returns at most 20\)"),
    # Layouts that Ray's arithmetic accepts and the GPUs refuse (one line each).
    (GPUS_2 + ["cluster.colocate=true", "sync.backend=nccl"], r"sync.backend: nccl with cluster.colocate: true puts "
     r"two NCCL ranks \(learner and engine\) on one GPU"),
    (GPUS_2 + ["sync.backend=ipc"], r"sync.backend: ipc shares CUDA memory within one GPU, so it needs the engines on "
     r"the learner's GPUs \(cluster.colocate: true\)"),
    (GPUS_2 + ["cluster.colocate=true", "rollout.vllm.tensor_parallel_size=2"],
     r"rollout.vllm.tensor_parallel_size: 2 with cluster.colocate: true, but a colocated engine shares one learner GPU"),
    (["sync.close_timeout_s=0"], r"sync.close_timeout_s: must be > 0, got 0"),
    # vLLM's CPU build runs no Model Runner V2: the refusal says so.
    (["teacher.kind=vllm", "loss.name=topk_reverse_kl_sg", "loss.params={k: 4, support: student}"],
     r"'vllm' teacher \(vLLM's CPU build runs Model Runner V1, and only V2 serves log-probs at given ids"),
    (["loss.name=topk_reverse_klsg"], r"loss.name: unknown loss 'topk_reverse_klsg'.*did you mean"),
    (["teacher.kind=none"], r"teacher.kind: algorithm 'opd' needs a teacher"),
    (["algorithm=sft"], r"loss.name: algorithm 'sft'"),
    (["algorithm=grpo", "loss.name=weighted_sum", "loss.params.components=[{name: grpo}, {name: sft, weight: 0.1}]"],
     r"loss.params: 'weighted_sum' has an sft component; reference rows are added to algorithm 'opd' steps only"),
    (["loss.name=weighted_sum", "loss.params.components=[{name: sampled_token_rkl}, {name: sft, weight: 0.1}]",
      "learner.micro_batch_size=8"],  # 8 samples + 4 reference rows (one per prompt)
     r"learner.micro_batch_size: 12 rows per step do not split into 1 ranks x micro-batches of 8"),
    (["loss.name=weighted_sum", "loss.params.components=[{name: sampled_token_rkl}, {name: sft}]",
      "learner.micro_batch_size=6", "loss.reference.source=teacher", "teacher.kind=vllm"],
     r"loss.reference.source: 'teacher' samples from an HF teacher; teacher.kind is 'vllm'"),
    (["loss.reference.source=book"], r"loss.reference.source: 'book' is not one of"),
])
def test_bad_manifest_names_the_key(write_manifest, override, message):
    with pytest.raises(ManifestError, match=message):
        load_manifest(write_manifest(), override)


def test_missing_required_value(tmp_path):
    path = tmp_path / "m.yaml"
    path.write_text("run: {name: x}\n")
    with pytest.raises(ManifestError, match=r"required value missing: .*model.path"):
        load_manifest(path)


def test_cli_bad_manifest_exits_2_before_work(write_manifest, capsys):
    from launch.cli import main
    assert main(["train", str(write_manifest()), "rollout.samples_per_prompt=0"]) == 2
    assert "rollout.samples_per_prompt: must be > 0" in capsys.readouterr().err


def test_relative_paths_resolve_against_the_launch_directory(write_manifest, assets, tmp_path, monkeypatch):
    monkeypatch.chdir(assets["tiny"].parent)
    cfg = load_manifest(write_manifest(model={"path": "tiny"}), ["run.output_dir=out"])
    assert cfg.model.path == str(assets["tiny"]) and cfg.run.output_dir == str(assets["tiny"].parent / "out")


def test_missing_path_on_a_cluster_says_where_paths_must_live(write_manifest):
    with pytest.raises(ManifestError, match=r"model.path: path '/nowhere' does not exist where the job runs; "
                                            r"paths must be reachable from the cluster"):
        load_manifest(write_manifest(), ["model.path=/nowhere", "cluster.mode=ray"])


def test_several_manifests_merge_left_to_right_before_overrides(tmp_path, write_manifest):
    base = write_manifest(rollout={"max_new_tokens": 3, "temperature": 0.5})
    (tmp_path / "small_parent.yaml").write_text("learner: {lr: 0.5}\nrollout: {temperature: 0.9}\n")
    small = tmp_path / "small.yaml"  # extends: still works inside a later manifest
    small.write_text("extends: small_parent.yaml\nrollout: {max_new_tokens: 5}\nrun: {steps: 7}\n")
    cfg = load_manifest([base, small], ["run.steps=9"])
    assert (cfg.rollout.max_new_tokens, cfg.rollout.temperature, cfg.learner.lr) == (5, 0.9, 0.5)
    assert cfg.run.steps == 9 and cfg.run.name == "t"  # the override last; base's keys where small is silent
    assert load_manifest([small, base]).rollout.max_new_tokens == 3  # the order decides
    with pytest.raises(ManifestError, match=r"small.yaml: unknown key 'rollout.temprature'"):
        small.write_text("rollout: {temprature: 1}\n")
        load_manifest([base, small])


def test_cli_takes_manifests_up_to_the_first_override(tmp_path, write_manifest, capsys):
    from launch.cli import main
    base = write_manifest()
    more = tmp_path / "more.yaml"
    more.write_text("rollout: {samples_per_prompt: 0}\n")
    assert main(["check", str(base), "rollout.max_new_tokens=3"]) == 0
    assert main(["check", str(base), str(more)]) == 2
    assert "rollout.samples_per_prompt: must be > 0" in capsys.readouterr().err
    assert main(["check", str(base), str(more), "rollout.samples_per_prompt=2"]) == 0
    assert f"{base} + {more}: valid (opd" in capsys.readouterr().out
    assert main(["train", str(base), str(more)]) == 2  # train merges the same way, and stops before work
    assert "rollout.samples_per_prompt: must be > 0" in capsys.readouterr().err
    assert main(["check", str(base), "run.steps=2", str(more)]) == 2  # a path after an override is no override
    assert "is not key=value" in capsys.readouterr().err


def test_tensor_parallel_engines_pass_the_check_on_a_cpu(write_manifest):
    """vLLM's CPU build runs tensor_parallel_size 2 here (tests/test_vllm.py builds one), so the manifest
    check no longer refuses it; a student-support loss with a vLLM teacher passes on GPUs, where the
    built engine's runner decides (checked again when the teacher starts)."""
    cfg = load_manifest(write_manifest(), ["rollout.engine=vllm", "rollout.vllm.tensor_parallel_size=2",
                                           "teacher.kind=vllm", "teacher.vllm.tensor_parallel_size=2"])
    assert cfg.rollout.vllm.tensor_parallel_size == cfg.teacher.vllm.tensor_parallel_size == 2
    load_manifest(write_manifest(), GPUS_2 + ["cluster.num_gpus=3", "teacher.kind=vllm", "loss.name=topk_reverse_kl_sg",
                                              "loss.params={k: 4, support: student}"])
