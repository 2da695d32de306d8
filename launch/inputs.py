"""What a run reads besides model weights (tokenizers, datasets, prompt templates), loaded and checked
on the driver before Ray starts or a run folder exists. Every problem is a ManifestError that names
the manifest key, so `opd train` answers it in one line and leaves nothing behind."""
from __future__ import annotations

import string
from dataclasses import dataclass, field

from actors.kinds import engine_kind
from launch.batches import ChatSettings, PromptFormatter
from launch.config import ExperimentConfig, ManifestError
from opd.tokens import SpecialIds, special_ids
from launch.evaluation import EvalSet, eval_set_specs
from launch.routing import Router, TeacherSpec, teacher_specs
from tasks.data import Dataset, load_dataset
from teachers.kinds import kind_of


@dataclass
class Inputs:
    tokenizer: object
    fmt: PromptFormatter
    train: Dataset
    eval_sets: list[EvalSet]  # the first is the headline eval/accuracy (launch/evaluation.py)
    special: SpecialIds                 # pad, eos and every stop id (both engines stop at the same set)
    skipped_rows: dict[str, dict[str, int]] = field(default_factory=dict)  # data key -> reason -> rows
    # One per teacher of launch.routing.teacher_specs (its own template and system prompt; `teacher:`: fmt),
    # and which teacher scores each row.
    teacher_fmts: list[PromptFormatter] = field(default_factory=list)
    router: Router | None = None


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


def _remote_code_hint(key: str, e: Exception) -> str:
    """transformers asks for trust_remote_code in a long message; the manifest key is what to name."""
    if "trust_remote_code" not in str(e):
        return ""
    return (f"; it needs its own Python code: set {key.split('.')[0]}.trust_remote_code: true if you trust it")


def _tokenizer(key: str, path: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer
    try:
        return AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds for "not a model directory"
        hint = _remote_code_hint(key, e)
        if hint:
            raise ManifestError(f"{key}: {path!r} has a custom tokenizer{hint}") from None
        raise ManifestError(f"{key}: {path!r} is not a Hugging Face model directory with a tokenizer "
                            f"({type(e).__name__}: {str(e).splitlines()[0][:200]})") from None


def load_inputs(cfg: ExperimentConfig) -> Inputs:
    dc, tc = cfg.data, cfg.teacher
    opd = cfg.algorithm == "opd"
    specs = teacher_specs(cfg) if opd else []
    tok = _tokenizer("model.path", cfg.model.path, cfg.model.trust_remote_code)
    student = _model_config("model.path", cfg.model.path, cfg.model.trust_remote_code)
    _check_embedding_rows(len(tok), student.vocab_size, None)
    for spec in specs:
        t = spec.config
        if kind_of(t) is None or kind_of(t).student_weights:  # a self-teacher is the student's own folder
            continue
        from teachers.base import check_same_tokenizer
        try:
            check_same_tokenizer(_tokenizer(f"{spec.key}.path", t.path, t.trust_remote_code), tok, f"{spec.key}.path")
        except ValueError as e:
            raise ManifestError(str(e)) from None
        teacher = _model_config(f"{spec.key}.path", t.path, t.trust_remote_code)
        _check_embedding_rows(len(tok), student.vocab_size, teacher.vocab_size, f"{spec.key}.path")
    _check_k(cfg.loss.params, "loss.params", len(tok))
    try:
        special = special_ids(tok, cfg.model.path, cfg.rollout.stop)
    except ValueError as e:
        raise ManifestError(str(e)) from None
    templates = {"data.prompt_template": dc.prompt_template}
    templates.update({f"{spec.key}.prompt_template": spec.config.prompt_template for spec in specs})
    fields = {key: template_fields(key, t) for key, t in templates.items()}
    # Templates say {prompt} and {answer} whatever the dataset calls those columns; SFT trains on "target".
    column = {"prompt": dc.prompt_field, "answer": dc.answer_field, "target": dc.sft_field or dc.answer_field}
    wanted = sorted({column.get(f, f) for names in fields.values() for f in names}
                    | {dc.answer_field, column["target"]})
    fmt = PromptFormatter(tok, dc.prompt_template, tc.prompt_template, _chat_settings(cfg, tok))
    teacher_fmts = ([fmt] if not cfg.teachers else
                    [fmt.for_teacher(s.config.prompt_template, s.config.system_prompt) for s in specs])
    router = Router(cfg) if opd else None
    # A template field only one teacher's rows have (a task's own column) is required of that teacher's rows
    # only: rows are loaded with the fields every prompt needs, and checked per teacher below.
    shared = wanted if not cfg.teachers else sorted(set(wanted) - {column.get(f, f) for s in specs
                                                                   for f in fields[f"{s.key}.prompt_template"]})
    train = _load("data.train", dc.train, shared, column, fields, dc.messages_field, dc.chat_template)
    if router:
        router.check("data.train", train.rows)
    for g, spec in enumerate(specs if cfg.teachers else []):
        need = fields[f"{spec.key}.prompt_template"]
        _drop_rows(train, lambda r, g=g, need=need: router.indices([r])[0] == g and any(f not in r for f in need),
                   f"a field of {spec.key}.prompt_template ({', '.join(need)}) missing")
    routes = router.indices(train.rows) if router else []
    _check_renders("data.train", fmt, train.rows[0], False)
    for g, (spec, tfmt) in enumerate(zip(specs, teacher_fmts)):
        first = next((r for r, i in zip(train.rows, routes) if i == g), None)
        if first is not None:
            _check_renders("data.train", tfmt, first, True, spec.key)
    _drop_long("data.train", train, _train_limits(cfg, fmt, student, list(zip(specs, teacher_fmts)), router))
    eval_sets, skipped = [], {"data.train": train.skip_reasons}
    student_fields = {"data.prompt_template": fields["data.prompt_template"]}
    wanted_eval = sorted({column.get(f, f) for f in fields["data.prompt_template"]} | {dc.answer_field})
    for spec in eval_set_specs(cfg):  # data.eval, or each of eval.sets, skipped rows counted under its key
        evals = _load(spec.key, spec.data, wanted_eval, column, student_fields, dc.messages_field, dc.chat_template)
        most = _context(cfg, "rollout", student) - spec.max_new_tokens
        _drop_long(spec.key, evals, [("prompt", lambda rows: [len(p) for p in EvalSet(spec, rows).prompts(fmt)], most)])
        eval_sets.append(EvalSet(spec, evals.rows[:spec.size]))
        skipped[spec.key] = evals.skip_reasons
    return Inputs(tokenizer=tok, fmt=fmt, train=train, eval_sets=eval_sets, special=special, skipped_rows=skipped,
                  teacher_fmts=teacher_fmts, router=router)


def _chat_settings(cfg: ExperimentConfig, tok) -> ChatSettings | None:
    dc = cfg.data
    if not dc.chat_template:
        if (dc.chat_template_kwargs or dc.system_prompt is not None or cfg.teacher.system_prompt is not None
                or any(t.system_prompt is not None for t in cfg.teachers)):
            raise ManifestError("data.chat_template: data.chat_template_kwargs, data.system_prompt and "
                                "teacher.system_prompt apply to chat prompts; set data.chat_template: true")
        return None
    if not getattr(tok, "chat_template", None):
        raise ManifestError(f"data.chat_template: the tokenizer of model.path {cfg.model.path!r} has no chat template; "
                            "set data.chat_template: false and write the format in data.prompt_template")
    return ChatSettings(kwargs=dict(dc.chat_template_kwargs), student_system=dc.system_prompt,
                        teacher_system=cfg.teacher.system_prompt, messages_field=dc.messages_field)


def _check_renders(key: str, fmt: PromptFormatter, row: dict, teacher: bool, teacher_key: str = "teacher") -> None:
    """Render one row's prompts now (a teacher's: the first row routed to it), so a template or
    chat-template problem stops the run here."""
    try:
        fmt.students([row])
        if teacher:
            fmt.teachers([row])
    except Exception as e:  # noqa: BLE001 - Jinja, KeyError, tokenizer errors: one line naming the keys
        raise ManifestError(f"{key}: its first row does not render as a prompt with data.prompt_template / "
                            f"{teacher_key}.prompt_template / data.chat_template_kwargs ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from None


def _check_embedding_rows(tokenizer_ids: int, student_rows: int, teacher_rows: int | None,
                          teacher_key: str = "teacher.path") -> None:
    """Every tokenizer id needs an embedding row on both sides. Rows past the tokenizer are padding (Qwen3 pads
    151,669 ids to 151,936 rows; a larger sibling may pad further): sizes may differ there, and full-vocabulary
    losses then compare the rows both sides have (losses/full_vocab.py)."""
    for key, rows in (("model.path", student_rows), (teacher_key, teacher_rows)):
        if rows is not None and rows < tokenizer_ids:
            other = "" if teacher_rows is None else f" (student {student_rows} rows, teacher {teacher_rows} rows)"
            raise ManifestError(f"{key}: the embedding has {rows} rows but the shared tokenizer has {tokenizer_ids} "
                                f"ids{other}; every id needs a row")


def _model_config(key: str, path: str, trust_remote_code: bool = False):
    from transformers import AutoConfig
    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # noqa: BLE001 - as for tokenizers
        hint = _remote_code_hint(key, e)
        if hint:
            raise ManifestError(f"{key}: {path!r} has a custom architecture{hint}") from None
        raise ManifestError(f"{key}: {path!r} has no readable config.json ({type(e).__name__}: "
                            f"{str(e).splitlines()[0][:200]})") from None
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def _check_k(params, key: str, vocab: int) -> None:
    """Every top-k size in the loss's parameters (weighted_sum nests them) fits in the vocabulary."""
    items = params.items() if isinstance(params, dict) else enumerate(params) if isinstance(params, list) else ()
    for name, value in items:
        sub = f"{key}.{name}" if isinstance(params, dict) else f"{key}[{name}]"
        if name == "k" and isinstance(value, int) and value > vocab:
            raise ManifestError(f"{sub}: {value} is larger than the vocabulary of model.path ({vocab} tokens); "
                                f"use k <= {vocab}")
        _check_k(value, sub, vocab)


def _context(cfg: ExperimentConfig, side: str, config, teacher: TeacherSpec | None = None) -> int:
    """Tokens a prompt plus its completion may take on one side (rollout, or `teacher`)."""
    limit = getattr(config, "max_position_embeddings", None) or 1 << 62
    if teacher is None:
        engine_is_vllm, vllm = engine_kind(cfg.rollout.engine).vllm, cfg.rollout.vllm
    else:
        engine_is_vllm, vllm = bool(kind_of(teacher.config) and kind_of(teacher.config).vllm), teacher.config.vllm
    if engine_is_vllm and vllm.max_model_len:
        limit = min(limit, vllm.max_model_len)
    return limit


def _train_limits(cfg: ExperimentConfig, fmt: PromptFormatter, student, teachers=(), router=None) -> list[tuple]:
    """(what, rows -> their token counts, most tokens) that every training row must meet, so no prompt
    is cut or overflows a model's context mid-run."""
    new_tokens, context = cfg.rollout.max_new_tokens, _context(cfg, "rollout", student)
    if context <= new_tokens:
        raise ManifestError(f"rollout.max_new_tokens: {new_tokens} leaves no room for a prompt in the student's "
                            f"context of {context} tokens")
    if cfg.algorithm == "sft":  # the completion is the answer itself
        def prompt_and_answer(rows: list[dict]) -> list[int]:  # the answer and its EOS
            answers = fmt.tok([r["target"] for r in rows], add_special_tokens=False).input_ids
            return [len(p) + len(a) + 1 for p, a in zip(fmt.students(rows), answers)]
        return [("prompt + answer", prompt_and_answer, context)]
    limits = [("prompt", _lengths(fmt.students), context - new_tokens)]
    for g, (spec, tfmt) in enumerate(teachers):  # (TeacherSpec, its PromptFormatter); each over its own rows
        tc = spec.config
        teacher = (student if kind_of(tc).student_weights
                   else _model_config(f"{spec.key}.path", tc.path, tc.trust_remote_code))
        what = "teacher prompt" if not spec.named else f"teacher {spec.name!r} prompt"
        mine = None if len(teachers) == 1 else (lambda rows, g=g: [i == g for i in router.indices(rows)])
        limits.append((what, _lengths(tfmt.teachers, mine), _context(cfg, "teacher", teacher, spec) - new_tokens))
    return limits


def _lengths(encode, mine=None):
    """rows -> their token counts under `encode`; with `mine` (rows -> which are this teacher's), 0 for the rest."""
    if mine is None:
        return lambda rows: [len(ids) for ids in encode(rows)]

    def lengths(rows: list[dict]) -> list[int]:
        keep = mine(rows)
        ids = iter(encode([r for r, k in zip(rows, keep) if k]))
        return [len(next(ids)) if k else 0 for k in keep]
    return lengths


def _drop_long(key: str, ds: Dataset, limits: list[tuple], chunk: int = 1024) -> None:
    """Skip (and count) rows longer than a limit; a source with no row left stops the run. One
    tokenizer call per `chunk` rows: a large dataset never holds all its token lists at once."""
    kept = []
    for start in range(0, len(ds.rows), chunk):
        rows = ds.rows[start:start + chunk]
        counts = [lengths(rows) for _, lengths, _ in limits]
        kept += _within(ds, rows, [(what, most) for what, _, most in limits], counts)
    if not kept:
        raise ManifestError(f"{key}: no row fits the models' context ({ds.skip_reasons}); lower "
                            "rollout.max_new_tokens or shorten the prompts")
    ds.rows = kept


def _within(ds: Dataset, rows: list[dict], limits: list[tuple[str, int]], counts: list[list[int]]) -> list[dict]:
    """The rows within every limit; the others are counted in ds by reason."""
    kept = []
    for i, row in enumerate(rows):
        reason = next((f"{what} over {most} tokens" for (what, most), n in zip(limits, counts) if n[i] > most), None)
        if reason:
            ds.skipped += 1
            ds.skip_reasons[reason] = ds.skip_reasons.get(reason, 0) + 1
        else:
            kept.append(row)
    return kept


def _load(key: str, source: str, required: list[str], column: dict, fields: dict[str, list[str]],
          messages_field: str = "messages", chat: bool = False) -> Dataset:
    """Rows of `source` with every required field, under canonical names: prompt (in chat format, the last
    user turn of the row's messages when it has them), answer, target. In chat format a row may hold
    messages instead of the prompt field."""
    if chat:
        required = [f for f in required if f != column["prompt"]]
    try:
        ds = load_dataset(source, required, messages_field)
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
    if chat:
        _drop_rows(ds, lambda r: not r.get(messages_field) and not r.get(column["prompt"]),
                   f"no {messages_field!r} and no {column['prompt']!r}")
        _drop_rows(ds, lambda r: bool(r.get(messages_field)) and not any(m["role"] == "user" for m in r[messages_field]),
                   f"{messages_field!r} has no user turn")
    for row in ds.rows:  # canonical names, so templates and verifiers say {prompt} / answer
        msgs = row.get(messages_field) if chat else None
        row["prompt"] = [m for m in msgs if m["role"] == "user"][-1]["content"] if msgs else row[column["prompt"]]
        row["answer"], row["target"] = row.get(column["answer"], ""), row.get(column["target"], "")
    return ds


def _drop_rows(ds: Dataset, bad, reason: str) -> None:
    kept = [r for r in ds.rows if not bad(r)]
    if len(kept) != len(ds.rows):
        ds.skipped += len(ds.rows) - len(kept)
        ds.skip_reasons[reason] = ds.skip_reasons.get(reason, 0) + len(ds.rows) - len(kept)
    if not kept:
        raise ManifestError(f"{ds.source!r}: no usable rows ({ds.skip_reasons})")
    ds.rows = kept


def _columns(source: str) -> set[str]:
    """Every field name any row of `source` has (for error messages)."""
    try:
        return set().union(*load_dataset(source, []).rows)
    except ValueError:
        return set()
