"""Datasets as users hold them (files, globs, save_to_disk folders, hub names), special ids, embedding rows
and remote code: each read through the real library, each problem one line naming the manifest key."""
import json
import shutil

import pytest
import torch

from launch.config import ManifestError

from launch.manifest import load_manifest
from launch.inputs import load_inputs
from losses import build_loss
from losses.reduce import compute_loss
from losses.base import LossBatch
from opd.tokens import generation_config_eos, special_ids, stop_id
from tasks.data import load_dataset, source_kind

ROWS = [{"prompt": f"{i}+1=", "answer": str(i + 1)} for i in range(6)]


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_source_kinds(tmp_path):
    write_jsonl(tmp_path / "a.jsonl", ROWS)
    assert source_kind(str(tmp_path / "a.jsonl")) == "file"
    assert source_kind(str(tmp_path / "*.jsonl")) == "glob"
    assert source_kind(str(tmp_path)) == "folder"
    assert source_kind("BytedTsinghua-SIA/DAPO-Math-17k") == "hub"
    assert source_kind("org/name:test") == "hub"
    assert source_kind("missing/file.jsonl") == "file"  # a file name: "does not exist", not a hub lookup


def test_a_glob_reads_every_file_in_order_and_counts_bad_rows(tmp_path):
    write_jsonl(tmp_path / "part-0.jsonl", ROWS[:3])
    (tmp_path / "part-1.jsonl").write_text(json.dumps(ROWS[3]) + "\nnot json\n" + json.dumps({"prompt": "x"}) + "\n")
    import pyarrow as pa
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist(ROWS[4:]), tmp_path / "part-2.parquet")
    ds = load_dataset(str(tmp_path / "part-*"), ["prompt", "answer"])
    assert [r["prompt"] for r in ds.rows] == [r["prompt"] for r in ROWS]
    assert ds.skip_reasons == {"not JSON": 1, "missing field 'answer'": 1}


def test_a_save_to_disk_folder_loads_and_a_split_dict_names_its_splits(tmp_path):
    import datasets
    datasets.Dataset.from_list(ROWS).save_to_disk(str(tmp_path / "one"))
    assert load_dataset(str(tmp_path / "one"), ["prompt"]).rows == [{k: str(v) for k, v in r.items()} for r in ROWS]
    datasets.DatasetDict({"train": datasets.Dataset.from_list(ROWS)}).save_to_disk(str(tmp_path / "dict"))
    with pytest.raises(ValueError, match=r"holds the splits \['train'\]; name one: .*dict/train"):
        load_dataset(str(tmp_path / "dict"), ["prompt"])
    assert len(load_dataset(str(tmp_path / "dict" / "train"), ["prompt"]).rows) == len(ROWS)


def test_a_hub_name_is_refused_here_in_one_line(write_manifest, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    cfg = load_manifest(write_manifest(), ["data.train=no-such-org/no-such-dataset"], check_paths=False)
    assert cfg.data.train == "no-such-org/no-such-dataset"  # not made an absolute path
    with pytest.raises(ManifestError, match=r"data.train: .*'no-such-org/no-such-dataset' is no file or folder here, "
                                            r"and as a hub dataset it could not be loaded") as e:
        load_inputs(cfg)
    assert "\n" not in str(e.value)


def test_messages_rows_keep_their_structure_and_bad_ones_are_counted(tmp_path):
    good = {"messages": [{"role": "user", "content": "1+1?"}], "answer": "2"}
    bad = [{"messages": "hi", "answer": "1"}, {"messages": [{"role": "bot", "content": "x"}], "answer": "1"}]
    ds = load_dataset(str(write_jsonl(tmp_path / "m.jsonl", [good, *bad])), ["answer"])
    assert ds.rows == [good]
    assert ds.skip_reasons == {"'messages' is not a list of {role, content} messages": 2}


# ---------------------------------------------------------------- special ids

def test_stop_ids_are_the_union_of_tokenizer_generation_config_and_manifest(assets, tmp_path):
    from transformers import AutoTokenizer
    model = tmp_path / "m"
    shutil.copytree(assets["tiny"], model)
    tok = AutoTokenizer.from_pretrained(model)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [tok.eos_token_id, 7]}))
    assert generation_config_eos(str(model)) == [tok.eos_token_id, 7]
    ids = special_ids(tok, str(model), ["=", 9])
    assert ids.stop == tuple(sorted({tok.eos_token_id, 7, 9, tok.convert_tokens_to_ids("=")}))
    assert ids.pad == tok.pad_token_id and ids.eos == tok.eos_token_id
    with pytest.raises(ValueError, match=r"rollout.stop: 'ab' is 2 tokens for this tokenizer"):
        stop_id(tok, "ab")
    with pytest.raises(ValueError, match=r"rollout.stop: id 100000 is outside the tokenizer"):
        stop_id(tok, 100000)


def test_a_tokenizer_without_a_pad_token_pads_with_eos(assets, tmp_path):
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(assets["tiny"])
    tok.pad_token = None
    ids = special_ids(tok)
    assert tok.pad_token_id is None and ids.pad == ids.eos == tok.eos_token_id


def test_a_run_without_a_pad_token_trains(ray_session, write_manifest, assets, tmp_path):
    from launch.cli import main
    from transformers import AutoTokenizer
    model = tmp_path / "nopad"
    shutil.copytree(assets["tiny"], model)
    tok = AutoTokenizer.from_pretrained(model)
    tok.pad_token = None
    tok.save_pretrained(model)
    assert AutoTokenizer.from_pretrained(model).pad_token_id is None
    path = write_manifest(model={"path": str(model)}, teacher={"kind": "hf", "path": str(model)},
                          run={"name": "nopad", "output_dir": str(tmp_path / "runs"), "steps": 1})
    assert main(["train", str(path)]) == 0


def test_plain_prompts_never_double_the_bos(write_manifest):
    cfg = load_manifest(write_manifest(), ["data.prompt_template=<bos>{prompt}"])
    fmt = load_inputs(cfg).fmt
    bos = fmt.tok.bos_token_id
    ids = fmt.student({"prompt": "1+2="})
    assert ids[0] == bos and ids[1] != bos
    assert ids == load_inputs(load_manifest(write_manifest())).fmt.student({"prompt": "1+2="})


# ---------------------------------------------------------------- embedding rows, remote code

def resized_copy(src, dst, rows):
    """The same model and tokenizer with `rows` embedding rows (new rows are padding past the tokenizer)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    model = AutoModelForCausalLM.from_pretrained(src)
    model.resize_token_embeddings(rows, mean_resizing=False)
    model.save_pretrained(dst)
    AutoTokenizer.from_pretrained(src).save_pretrained(dst)
    return dst


def test_embedding_rows_below_the_tokenizer_are_refused_naming_both_sizes(write_manifest, assets, tmp_path):
    from transformers import AutoTokenizer
    n = len(AutoTokenizer.from_pretrained(assets["tiny"]))
    small = resized_copy(assets["tiny"], tmp_path / "small", n - 5)
    with pytest.raises(ManifestError, match=rf"teacher.path: the embedding has {n - 5} rows but the shared tokenizer "
                                            rf"has {n} ids \(student {n} rows, teacher {n - 5} rows\)"):
        load_inputs(load_manifest(write_manifest(), [f"teacher.path={small}"]))


def test_full_vocab_losses_compare_the_common_rows(assets):
    """Student with V rows, teacher with V + 3 padding rows: the loss equals the float64 reverse KL of both
    distributions renormalised over the first V rows, and its gradient reaches the student's rows only."""
    torch.manual_seed(0)
    m, v = 5, 11
    logits = torch.randn(m, v, dtype=torch.float64, requires_grad=True)
    logq_wide = torch.log_softmax(torch.randn(m, v + 3, dtype=torch.float64), -1)
    batch = LossBatch(tokens=torch.randint(0, v, (m,)), weights=torch.full((m,), 1 / m, dtype=torch.float64),
                      teacher_full_logprobs=logq_wide)
    for name in ("full_reverse_kl", "full_forward_kl"):
        loss, _ = compute_loss(build_loss(name, {}).fn, logits, batch)
        logp, logq = torch.log_softmax(logits, -1), torch.log_softmax(logq_wide[:, :v], -1)
        ref = ((logp.exp() * (logp - logq)) if name == "full_reverse_kl" else (logq.exp() * (logq - logp))).sum(-1).mean()
        assert torch.allclose(loss, ref, atol=1e-12)
        g, = torch.autograd.grad(loss, logits)
        g_ref, = torch.autograd.grad(ref, logits)
        assert torch.allclose(g, g_ref, atol=1e-12)
    # the student wider than the teacher: the same rule from the other side
    wide = torch.randn(m, v + 3, dtype=torch.float64, requires_grad=True)
    narrow_q = torch.log_softmax(torch.randn(m, v, dtype=torch.float64), -1)
    loss, _ = compute_loss(build_loss("full_reverse_kl", {}).fn, wide,
                           LossBatch(tokens=batch.tokens, weights=batch.weights, teacher_full_logprobs=narrow_q))
    logp = torch.log_softmax(wide[:, :v], -1)
    assert torch.allclose(loss, (logp.exp() * (logp - narrow_q)).sum(-1).mean(), atol=1e-12)
    assert torch.autograd.grad(loss, wide)[0][:, v:].abs().max() == 0


def test_a_teacher_with_more_padding_rows_trains_with_a_full_vocab_loss(ray_session, write_manifest, assets, tmp_path):
    from launch.cli import main
    from transformers import AutoConfig, AutoTokenizer
    n = len(AutoTokenizer.from_pretrained(assets["tiny"]))
    teacher = resized_copy(assets["tiny"], tmp_path / "wide", n + 64)
    assert AutoConfig.from_pretrained(teacher).vocab_size == n + 64 != AutoConfig.from_pretrained(assets["tiny"]).vocab_size
    for transport in ("logprobs", "hidden_states"):
        path = write_manifest(teacher={"kind": "hf", "path": str(teacher), "full_vocab_transport": transport},
                              loss={"name": "full_reverse_kl"},
                              run={"name": f"wide-{transport}", "output_dir": str(tmp_path / "runs"), "steps": 1})
        assert main(["train", str(path)]) == 0


def test_a_model_that_needs_remote_code_is_refused_naming_the_key(write_manifest, assets, tmp_path):
    custom = tmp_path / "custom"
    shutil.copytree(assets["tiny"], custom)
    config = json.loads((custom / "config.json").read_text())
    config.update(model_type="opd_custom_arch", auto_map={"AutoConfig": "configuration_custom.CustomConfig",
                                                          "AutoModelForCausalLM": "modeling_custom.CustomModel"})
    (custom / "config.json").write_text(json.dumps(config))
    with pytest.raises(ManifestError, match=r"^model.path: .* set model.trust_remote_code: true if you trust it$") as e:
        load_inputs(load_manifest(write_manifest(), [f"model.path={custom}"]))
    assert "\n" not in str(e.value)
