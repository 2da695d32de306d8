"""Bad input answered before any work, in one line that names the key or file: a top-k larger than
the vocabulary, prompts longer than the models' context (skipped and counted), a manifest that is not
YAML or not a mapping, negative intervals."""
import json

import pytest

from launch.cli import main
from launch.config import ManifestError
from launch.manifest import load_manifest
from launch.inputs import load_inputs


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


def test_topk_larger_than_the_vocabulary_is_refused_before_ray(write_manifest, tmp_path, capsys):
    manifest = write_manifest(loss={"name": "topk_reverse_kl_sg", "params": {"k": 4000}})
    assert main(["train", str(manifest)]) == 2
    line = one_line_error(capsys)
    assert line.startswith("opd: bad input: loss.params.k: 4000 is larger than the vocabulary of model.path (")
    assert "use k <= " in line
    assert not (tmp_path / "runs").exists()


def test_topk_inside_a_weighted_sum_is_checked_too(write_manifest):
    components = [{"name": "topk_reverse_kl_sg", "weight": 1.0, "params": {"k": 999}}]
    cfg = load_manifest(write_manifest(loss={"name": "weighted_sum", "params": {"components": components}}))
    with pytest.raises(ManifestError, match=r"loss.params.components\[0\].params.k: 999 is larger"):
        load_inputs(cfg)


def test_prompts_longer_than_the_context_are_skipped_and_counted(write_manifest, assets, tmp_path):
    train = tmp_path / "train.jsonl"
    rows = [json.loads(line) for line in assets["train"].read_text().splitlines()[:20]]
    long_prompt = "1+" * 200 + "1="  # 402 characters: over the tiny model's 256 positions
    rows += [{"prompt": long_prompt, "answer": "2"}, {"prompt": long_prompt, "answer": "3"}]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    inputs = load_inputs(load_manifest(write_manifest(data={"train": str(train)})))
    assert len(inputs.train.rows) == 20 and inputs.train.skipped == 2
    assert inputs.skipped_rows["data.train"] == {"prompt over 252 tokens": 2}
    sft = load_inputs(load_manifest(write_manifest(data={"train": str(train)}, algorithm="sft",
                                                   loss={"name": "sft"}, teacher={"kind": "none"})))
    assert sft.skipped_rows["data.train"] == {"prompt + answer over 256 tokens": 2}
    with pytest.raises(ManifestError, match="rollout.max_new_tokens: 300 leaves no room for a prompt"):
        load_inputs(load_manifest(write_manifest(rollout={"max_new_tokens": 300})))


def test_a_run_prints_skipped_rows_by_reason(ray_session, write_manifest, assets, tmp_path, capsys):
    train = tmp_path / "train.jsonl"
    train.write_bytes(assets["train"].read_bytes() + b'{"prompt": "1+1="}\nnot json\n')
    manifest = write_manifest(data={"train": str(train), "eval": str(assets["eval"])}, eval={"interval": 0},
                              run={"name": "t", "output_dir": str(tmp_path / "runs"), "steps": 1})
    assert main(["train", str(manifest)]) == 0
    out = capsys.readouterr().out
    assert "opd: skipped rows: data.train 2 (missing field 'answer': 1, not JSON: 1); data.eval 0" in out
    summary = json.loads((tmp_path / "runs" / "t" / "summary.json").read_text())
    assert summary["skipped_rows"]["data.train"] == {"not JSON": 1, "missing field 'answer'": 1}


@pytest.mark.parametrize("text, expected", [
    ("run: {name: x\nsteps: 2\n", r"manifest.yaml: line \d+: not valid YAML"),
    ("- run\n- model\n", r"manifest.yaml: the manifest must be a mapping of sections \(run:, model:, ...\), not a list"),
])
def test_manifest_that_is_not_a_yaml_mapping_is_one_line(tmp_path, capsys, text, expected):
    path = tmp_path / "manifest.yaml"
    path.write_text(text)
    assert main(["train", str(path)]) == 2
    line = one_line_error(capsys)
    assert line.startswith("opd: bad manifest: ") and __import__("re").search(expected, line), line


@pytest.mark.parametrize("override, key", [("eval.interval=-1", "eval.interval"),
                                           ("checkpoint.interval=-5", "checkpoint.interval"),
                                           ("checkpoint.keep=0", "checkpoint.keep"),
                                           ("learner.max_nonfinite_steps=0", "learner.max_nonfinite_steps"),
                                           ("cluster.call_timeout_s=0", "cluster.call_timeout_s"),
                                           ("run.name=../elsewhere", "run.name")])
def test_impossible_reliability_values_are_refused(write_manifest, override, key):
    with pytest.raises(ManifestError, match=f"^{key}: "):
        load_manifest(write_manifest(), [override])


def test_opd_eval_refuses_an_engine_kind_nobody_registered_before_loading_anything(tmp_path, capsys):
    """--engine names a rollout engine kind (actors/kinds.py); an unknown one stops before the model or the
    data are read (neither exists here)."""
    assert main(["eval", "--model", str(tmp_path / "none"), "--data", str(tmp_path / "none.jsonl"),
                 "--engine", "sglang"]) == 2
    assert one_line_error(capsys) == "opd eval: --engine 'sglang' is not one of ['hf', 'vllm']"
