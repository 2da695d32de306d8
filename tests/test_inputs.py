"""Tokenizers, data and prompt templates are checked on the driver before Ray or a run folder:
each problem is one line naming the manifest key, and `opd train` exits 2 leaving nothing behind."""
import json
import shutil

import pytest

from launch.cli import main
from launch.config import ManifestError
from launch.manifest import load_manifest
from launch.inputs import load_inputs, template_fields


def rows_file(tmp_path, rows):
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_templates_pass_on_the_command_line_as_written(write_manifest):
    cfg = load_manifest(write_manifest(), ["teacher.prompt_template={hint}{prompt}",
                                           "data.prompt_template=q: {prompt} a:"])
    assert cfg.teacher.prompt_template == "{hint}{prompt}" and cfg.data.prompt_template == "q: {prompt} a:"
    inputs = load_inputs(cfg)
    row = inputs.train.rows[0]
    assert inputs.fmt.teacher(row)[1:] == inputs.tokenizer(row["hint"] + row["prompt"]).input_ids


def test_override_without_equals_is_refused(write_manifest):
    with pytest.raises(ManifestError, match=r"command line: 'rollout.temperature' is not key=value"):
        load_manifest(write_manifest(), ["rollout.temperature"])


@pytest.mark.parametrize("template,message", [
    ("{hint", r"teacher.prompt_template: '\{hint' is not a valid template"),
    ("{0}{prompt}", r"teacher.prompt_template: .* positional field \{0\}"),
])
def test_template_that_does_not_parse(template, message):
    with pytest.raises(ManifestError, match=message):
        template_fields("teacher.prompt_template", template)


@pytest.mark.parametrize("override,message", [
    (["teacher.prompt_template={hnt}{prompt}"],
     r"teacher.prompt_template: field 'hnt' is in no row of data.train .*\(its rows have: answer, hint, prompt\)"),
    (["data.prompt_template=Q {question}"], r"data.prompt_template: field 'question' is in no row of data.train"),
    (["data.prompt_field=question"], r"data.prompt_field: field 'question' is in no row of data.train"),
    (["data.answer_field=solution"], r"data.answer_field: field 'solution' is in no row of data.train"),
])
def test_template_field_no_row_has(write_manifest, override, message):
    with pytest.raises(ManifestError, match=message):
        load_inputs(load_manifest(write_manifest(), override))


def test_rows_lacking_a_template_field_are_skipped_and_counted(write_manifest, tmp_path):
    train = rows_file(tmp_path, [{"prompt": "1+1=", "answer": "2", "hint": "h"}, {"prompt": "2+2=", "answer": "4"}])
    inputs = load_inputs(load_manifest(write_manifest(data={"train": train}), ["teacher.prompt_template={hint}{prompt}"]))
    assert len(inputs.train.rows) == 1 and inputs.train.skip_reasons == {"missing field 'hint'": 1}


def test_empty_training_file(write_manifest, tmp_path):
    train = tmp_path / "empty.jsonl"
    train.write_text("")
    with pytest.raises(ManifestError, match=r"data.train: .* no usable rows"):
        load_inputs(load_manifest(write_manifest(data={"train": str(train)})))


def test_student_path_that_is_a_file(write_manifest, assets):
    with pytest.raises(ManifestError, match=r"model.path: .*config.json' is not a Hugging Face model directory"):
        load_inputs(load_manifest(write_manifest(), [f"model.path={assets['tiny'] / 'config.json'}"]))


def test_teacher_with_another_tokenizer(write_manifest, assets, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(assets["tiny"], other)
    vocab = json.loads((other / "tokenizer.json").read_text())
    v = vocab["model"]["vocab"]
    v["0"], v["1"] = v["1"], v["0"]
    (other / "tokenizer.json").write_text(json.dumps(vocab))
    with pytest.raises(ManifestError, match=r"teacher.path: tokenizer maps 2 tokens differently"):
        load_inputs(load_manifest(write_manifest(), [f"teacher.path={other}"]))


def test_cli_bad_input_exits_2_with_no_run_folder(write_manifest, tmp_path, capsys):
    assert main(["train", str(write_manifest()), "teacher.prompt_template={hnt}{prompt}"]) == 2
    assert "opd: bad input: teacher.prompt_template: field 'hnt'" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_prompts_tokenized_together_equal_prompts_tokenized_one_by_one(write_manifest):
    """The driver tokenizes a step's prompts (and the dataset's, for the length check) in one call."""
    inputs = load_inputs(load_manifest(write_manifest(), ["teacher.prompt_template={hint} | {prompt}"]))
    tok, fmt = inputs.tokenizer, inputs.fmt
    rows = inputs.train.rows[:4] + [{"prompt": "1+1=", "hint": ""}, {"prompt": "12+345=", "hint": "about 357. "}]
    one = lambda text: [tok.bos_token_id] + tok(text, add_special_tokens=False).input_ids  # noqa: E731
    assert fmt.students(rows) == [one(r["prompt"]) for r in rows] == [fmt.student(r) for r in rows]
    assert fmt.teachers(rows) == [one(f"{r['hint']} | {r['prompt']}") for r in rows]
    assert len({len(ids) for ids in fmt.teachers(rows)}) > 1  # ragged: nothing was padded
    assert fmt.students([]) == []


def test_the_length_check_skips_and_counts_alike_whatever_its_chunk(write_manifest):
    from launch.inputs import _drop_long
    from tasks.data import Dataset
    rows = [{"prompt": "x" * n} for n in (1, 9, 2, 8, 3, 7, 4)]
    limits = [("prompt", lambda rs: [len(r["prompt"]) for r in rs], 5)]
    results = []
    for chunk in (1, 3, 1024):
        ds = Dataset(rows=list(rows))
        _drop_long("data.train", ds, limits, chunk=chunk)
        results.append(([r["prompt"] for r in ds.rows], ds.skipped, ds.skip_reasons))
    assert results[0] == results[1] == results[2] == (["x", "xx", "xxx", "xxxx"], 3, {"prompt over 5 tokens": 3})
