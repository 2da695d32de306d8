"""What a run reads besides model weights (tokenizers, datasets, prompt templates), loaded and checked
on the driver before Ray starts or a run folder exists. Every problem is a ManifestError that names
the manifest key, so `opd train` answers it in one line and leaves nothing behind."""
from __future__ import annotations

import string
from dataclasses import dataclass

from launch.batches import PromptFormatter
from launch.config import ExperimentConfig, ManifestError
from tasks.data import Dataset, load_dataset


@dataclass
class Inputs:
    tokenizer: object
    fmt: PromptFormatter
    train: Dataset
    eval_rows: list[dict]


def template_fields(key: str, template: str) -> list[str]:
    """The row fields a template names ({prompt}, {hint}, ...). `key` is the manifest key, for errors."""
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as e:
        raise ManifestError(f"{key}: {template!r} is not a valid template ({e}); name row fields as {{field}} "
                            "and write a literal brace as {{{{ or }}}}") from None
    names = []
    for _, name, _, _ in parsed:
        if name is None:
            continue
        field = name.split(".")[0].split("[")[0]
        if not field or field.isdigit():
            raise ManifestError(f"{key}: {template!r} has a positional field {{{name}}}; name a row field, "
                                "e.g. {prompt}")
        names.append(field)
    return names


def _tokenizer(key: str, path: str):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for "not a model directory"
        raise ManifestError(f"{key}: {path!r} is not a Hugging Face model directory with a tokenizer "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_inputs(cfg: ExperimentConfig) -> Inputs:
    dc, tc = cfg.data, cfg.teacher
    tok = _tokenizer("model.path", cfg.model.path)
    if cfg.algorithm == "opd" and tc.kind in ("hf", "vllm"):
        from teachers.base import check_same_tokenizer
        try:
            check_same_tokenizer(_tokenizer("teacher.path", tc.path), tok)
        except ValueError as e:
            raise ManifestError(str(e)) from None
    templates = {"data.prompt_template": dc.prompt_template}
    if cfg.algorithm == "opd":
        templates["teacher.prompt_template"] = tc.prompt_template
    fields = {key: template_fields(key, t) for key, t in templates.items()}
    # Templates say {prompt} and {answer} whatever the dataset calls those columns.
    column = {"prompt": dc.prompt_field, "answer": dc.answer_field}
    wanted = sorted({column.get(f, f) for names in fields.values() for f in names} | {dc.answer_field})
    train = _load("data.train", dc.train, wanted, column, fields)
    eval_rows = []
    if dc.eval:
        student_fields = {"data.prompt_template": fields["data.prompt_template"]}
        wanted_eval = sorted({column.get(f, f) for f in fields["data.prompt_template"]} | {dc.answer_field})
        eval_rows = _load("data.eval", dc.eval, wanted_eval, column, student_fields).rows[:cfg.eval.size]
    fmt = PromptFormatter(tok, dc.prompt_template, tc.prompt_template)
    return Inputs(tokenizer=tok, fmt=fmt, train=train, eval_rows=eval_rows)


def _load(key: str, source: str, required: list[str], column: dict, fields: dict[str, list[str]]) -> Dataset:
    try:
        ds = load_dataset(source, required)
    except FileNotFoundError:
        raise ManifestError(f"{key}: {source!r} does not exist") from None
    except ValueError as e:
        have = _columns(source)
        asked = [(n, k) for k, names in fields.items() for n in names] + [("answer", "data.answer_field")]
        for name, owner in asked:
            col = column.get(name, name)
            if have and col not in have:  # say which template (or *_field) asked for the field no row has
                owner = f"data.{name}_field" if col != name else owner
                raise ManifestError(f"{owner}: field {col!r} is in no row of {key} {source!r} "
                                    f"(its rows have: {', '.join(sorted(have))})") from None
        raise ManifestError(f"{key}: {e}") from None
    for row in ds.rows:  # canonical names, so templates and verifiers say {prompt} / answer
        row["prompt"], row["answer"] = row[column["prompt"]], row.get(column["answer"], "")
    return ds


def _columns(source: str) -> set[str]:
    """Every field name any row of `source` has (for error messages)."""
    try:
        return set().union(*load_dataset(source, []).rows)
    except ValueError:
        return set()
