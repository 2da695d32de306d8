"""The tiny Qwen3 family and its chat-math task, loaded the way a user's Qwen3 is: AutoTokenizer,
AutoConfig, AutoModelForCausalLM, GenerationConfig and vLLM's CPU build, all through `from_pretrained`."""
import json
import random
import re

import pytest
import torch
from jinja2.exceptions import TemplateError
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig, Qwen3ForCausalLM

from tasks.chat_math import MAX_ANSWER
from tasks.tiny_qwen3 import QWEN3_LARGE_ROWS, QWEN3_ROWS, SMOKE_SIZES, build_tokenizer, write_model
from tasks.verifiers import boxed_match

MODELS = ["student", "teacher", f"student-{QWEN3_ROWS}", f"teacher-{QWEN3_ROWS}"]
QUESTION = "Ann has 3 apples and buys 4 more. How many apples does she have now?"
SYSTEM = "You are a careful tutor."


def ids_of(encoded) -> list[int]:
    """apply_chat_template(tokenize=True) returns a BatchEncoding in transformers 5, a list before."""
    return list(encoded["input_ids"] if hasattr(encoded, "keys") else encoded)


@pytest.fixture(scope="module")
def tok(qwen3_assets):
    return AutoTokenizer.from_pretrained(qwen3_assets["student"])


@pytest.mark.parametrize("name", MODELS)
def test_each_model_loads_through_the_auto_classes_as_qwen3(qwen3_assets, tok, name):
    path = qwen3_assets[name]
    cfg = AutoConfig.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    assert type(model) is Qwen3ForCausalLM and cfg.model_type == "qwen3"
    assert cfg.architectures == ["Qwen3ForCausalLM"]
    assert cfg.head_dim >= 32 and cfg.num_key_value_heads < cfg.num_attention_heads  # vLLM CPU; GQA
    assert cfg.tie_word_embeddings == name.startswith("student")  # Qwen3-1.7B ties, Qwen3-8B does not
    assert (model.lm_head.weight is model.model.embed_tokens.weight) == cfg.tie_word_embeddings
    assert AutoTokenizer.from_pretrained(path).get_vocab() == tok.get_vocab()  # one tokenizer for the family
    assert cfg.eos_token_id == tok.convert_tokens_to_ids("<|im_end|>")
    ids = torch.tensor([ids_of(tok.apply_chat_template([{"role": "user", "content": QUESTION}],
                                                       add_generation_prompt=True))])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], cfg.vocab_size) and torch.isfinite(logits).all()


def test_embedding_rows_are_set_apart_from_the_tokenizer_size(qwen3_assets, tok, tmp_path):
    rows = {name: AutoConfig.from_pretrained(qwen3_assets[name]).vocab_size for name in MODELS}
    small = -(-len(tok) // 64) * 64
    assert len(tok) < small and rows["student"] == rows["teacher"] == small
    assert rows[f"student-{QWEN3_ROWS}"] == rows[f"teacher-{QWEN3_ROWS}"] == QWEN3_ROWS
    # A second size over the same tokenizer (Qwen3's 151,936 against 152,064).
    large = write_model(tmp_path / "large", tok, SMOKE_SIZES["student"], QWEN3_LARGE_ROWS, seed=3)
    model = AutoModelForCausalLM.from_pretrained(large, dtype=torch.float32)
    assert model.get_input_embeddings().weight.shape == (QWEN3_LARGE_ROWS, SMOKE_SIZES["student"].hidden)
    assert AutoTokenizer.from_pretrained(large).get_vocab() == tok.get_vocab()
    with pytest.raises(ValueError, match="vocab-rows 600 is smaller than the tokenizer"):
        write_model(tmp_path / "short", tok, SMOKE_SIZES["student"], 600, seed=3)
    # Text never encodes into the padding rows.
    text = open(qwen3_assets["train"]).read()[:20000]
    assert max(tok(text)["input_ids"]) < len(tok)


def render(tok, messages, **kwargs) -> str:
    return tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)


@pytest.mark.parametrize("system", [False, True])
def test_chat_template_renders_chatml_with_the_thinking_switch(tok, system):
    user = [{"role": "user", "content": QUESTION}]
    messages = ([{"role": "system", "content": SYSTEM}] if system else []) + user
    head = f"<|im_start|>system\n{SYSTEM}<|im_end|>\n" if system else ""
    prompt = f"{head}<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n"
    assert render(tok, messages) == prompt  # thinking on unless switched off, as Qwen3
    assert render(tok, messages, enable_thinking=True) == prompt
    assert render(tok, messages, enable_thinking=False) == prompt + "<think>\n\n</think>\n\n"
    assert tok.apply_chat_template(messages, tokenize=False) == prompt[:-len("<|im_start|>assistant\n")]


def test_a_rendered_answer_extends_the_non_thinking_prompt_token_for_token(tok, qwen3_assets):
    """SFT renders [user, assistant]; a non-thinking rollout is prompt + completion: the same tokens."""
    rows = [json.loads(line) for line in open(qwen3_assets["train"]).read().splitlines()[:20]]
    for row in rows:
        prompt = ids_of(tok.apply_chat_template(row["messages"], add_generation_prompt=True, enable_thinking=False))
        full = ids_of(tok.apply_chat_template(row["messages"] + [{"role": "assistant", "content": row["solution"]}]))
        assert full[:len(prompt)] == prompt
        assert tok.decode(full[len(prompt):]) == row["solution"] + "<|im_end|>\n"
    # A reasoning trace in the last turn keeps its thinking block; an earlier turn loses it, as Qwen3's.
    turns = [{"role": "user", "content": "a"}, {"role": "assistant", "content": "<think>\nhm\n</think>\n\nb"},
             {"role": "user", "content": "c"}, {"role": "assistant", "content": "<think>\nok\n</think>\n\nd"}]
    assert tok.apply_chat_template(turns, tokenize=False) == (
        "<|im_start|>user\na<|im_end|>\n<|im_start|>assistant\nb<|im_end|>\n"
        "<|im_start|>user\nc<|im_end|>\n<|im_start|>assistant\n<think>\nok\n</think>\n\nd<|im_end|>\n")


def test_chat_template_refuses_a_late_system_message_and_unknown_roles(tok):
    with pytest.raises(TemplateError, match="only the first message may be a system message"):
        render(tok, [{"role": "user", "content": "a"}, {"role": "system", "content": "b"}])
    with pytest.raises(TemplateError, match="role must be system, user or assistant, got tool"):
        render(tok, [{"role": "tool", "content": "a"}])


def test_specials_are_single_ids_after_the_learned_tokens_and_round_trip(tok):
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]
    ids = [tok.convert_tokens_to_ids(s) for s in specials]
    assert ids == list(range(len(tok) - 5, len(tok)))  # Qwen's order, after the BPE's tokens
    for s, i in zip(specials, ids):
        assert tok(s)["input_ids"] == [i] and tok.decode([i]) == s
    assert tok.bos_token is None and tok.pad_token == "<|endoftext|>" and tok.eos_token == "<|im_end|>"
    text = f"<|im_start|>user\n{QUESTION}<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n7<|im_end|>"
    enc = tok(text)["input_ids"]
    assert enc[0] == ids[1] and tok.decode(enc) == text  # no BOS prepended; lossless
    # <think> and </think> are added tokens, not special (as Qwen3 marks them): they survive skipping.
    assert tok.decode(enc, skip_special_tokens=True) == f"user\n{QUESTION}\nassistant\n<think>\n\n</think>\n\n7"
    assert tok.tokenize(" 123") == ["Ġ", "1", "2", "3"]


def test_generation_config_stops_at_im_end_and_endoftext(qwen3_assets, tok):
    for name in MODELS:
        gen = GenerationConfig.from_pretrained(qwen3_assets[name])
        assert gen.eos_token_id == [tok.convert_tokens_to_ids("<|im_end|>"), tok.convert_tokens_to_ids("<|endoftext|>")]
        assert gen.pad_token_id == tok.pad_token_id


def test_the_tokenizer_is_the_same_for_the_same_seed():
    assert build_tokenizer(0).backend_tokenizer.to_str() == build_tokenizer(0).backend_tokenizer.to_str()


def test_chat_math_rows_are_messages_with_boxed_answers_and_held_out_sums(qwen3_assets):
    splits = {k: [json.loads(line) for line in open(qwen3_assets[k]).read().splitlines()] for k in ("train", "eval")}
    for split, rows in splits.items():
        assert len(rows) == {"train": 512, "eval": 32}[split]
        for row in rows:
            assert [m["role"] for m in row["messages"]] == ["user"] and row["messages"][0]["content"].endswith("?")
            a, op, b, c = re.fullmatch(r"(\d+) ([+-]) (\d+) = (\d+)\. The answer is \\boxed\{\d+\}\.",
                                       row["solution"]).groups()
            assert int(c) == (int(a) + int(b) if op == "+" else int(a) - int(b)) == int(row["answer"])
            assert 0 <= int(row["answer"]) <= MAX_ANSWER and re.findall(r"\d+", row["messages"][0]["content"]) == [a, b]
            assert row["hint"] == f"{a} {op} {b} = {c}."
            assert boxed_match(row["solution"], row["answer"]) == 1.0
            assert boxed_match(row["solution"], str(int(row["answer"]) + 1)) == 0.0
    questions = {k: [r["messages"][0]["content"] for r in rows] for k, rows in splits.items()}
    assert len(set(questions["eval"])) == 32 and not set(questions["eval"]) & set(questions["train"])
    # held out by sum, not only by wording: no eval sum appears in train in any words
    sums = {k: {r["hint"] for r in rows} for k, rows in splits.items()}
    assert len(sums["eval"]) == 32 and not sums["eval"] & sums["train"]
    assert {r["solution"].split()[1] for r in splits["train"]} == {"+", "-"}


def test_column_rows_work_two_digit_sums_one_digit_fact_at_a_time(tmp_path):
    """style=column (`opd experiment chat-math`): two two-digit addends; the solution adds the ones, then the
    tens with the carry always written, then boxes the sum; eval sums are held out of train."""
    from tasks.chat_math import make_example, write_task
    paths = write_task(tmp_path, n_train=300, n_eval=40, opd_sums=30, n_opd=60, style="column")
    rows = {k: [json.loads(line) for line in paths[k].read_text().splitlines()] for k in ("train", "eval", "opd")}
    carries = set()
    for row in rows["train"] + rows["eval"]:
        a, b = map(int, re.findall(r"\d+", row["messages"][0]["content"]))
        assert 10 <= a <= 99 and 10 <= b <= 99 and row["answer"] == str(a + b)
        ones, tens = a % 10 + b % 10, a // 10 + b // 10 + (a % 10 + b % 10) // 10
        assert row["solution"] == (f"Ones: {a % 10} + {b % 10} = {ones}. Tens: {a // 10} + {b // 10} + {ones // 10} = "
                                   f"{tens}. The answer is \\boxed{{{a + b}}}.")
        assert boxed_match(row["solution"], row["answer"]) == 1.0
        carries.add(ones // 10)
    assert carries == {0, 1}
    sums = {k: {tuple(re.findall(r"\d+", r["messages"][0]["content"])) for r in v} for k, v in rows.items()}
    assert len(sums["eval"]) == 40 and not sums["eval"] & (sums["train"] | sums["opd"]) and not sums["opd"] & sums["train"]
    with pytest.raises(ValueError, match="style must be one of"):
        make_example(random.Random(0), style="columns")


def test_make_tiny_writes_the_qwen3_family(tmp_path, capsys):
    from launch.cli import main
    assert main(["make-tiny", "--family", "qwen3", "--out", str(tmp_path / "f"), "--vocab-rows"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert sorted(printed) == ["eval", "safety_eval", "safety_train", "student", "teacher", "train"]
    assert sorted(p.name for p in (tmp_path / "f").iterdir()) == ["data", "family.json", "student", "teacher"]
    assert main(["make-tiny", "--family", "qwen3", "--out", str(tmp_path / "g"), "--vocab-rows", "100"]) == 2
    assert "vocab-rows 100 is smaller than the tokenizer" in capsys.readouterr().err
    assert not (tmp_path / "g").exists()
    assert main(["make-tiny", "--out", str(tmp_path / "h"), "--vocab-rows", "1000"]) == 2  # llama: no rows


def test_vllm_cpu_generates_from_a_chat_prompt_at_qwen3_rows(qwen3_assets, tok):
    """vLLM's own Qwen3 implementation loads the 151,936-row student and reads the chat template's ids."""
    from vllm import SamplingParams

    from opd.vllm_llm import LLMSpec, build_llm
    llm = build_llm(LLMSpec(model=str(qwen3_assets[f"student-{QWEN3_ROWS}"]), dtype="float32",
                            kv_cache_memory_gb=0.0625, enforce_eager=True), "raw_logprobs")
    messages = [{"role": "system", "content": SYSTEM}, {"role": "user", "content": QUESTION}]
    prompt = ids_of(tok.apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False))
    assert llm.get_tokenizer().apply_chat_template(messages, add_generation_prompt=True, enable_thinking=False,
                                                   tokenize=False) == tok.decode(prompt)
    out = llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=4, ignore_eos=True, seed=0))[0]
    assert list(out.prompt_token_ids) == prompt
    assert len(out.outputs[0].token_ids) == 4 and all(0 <= i < QWEN3_ROWS for i in out.outputs[0].token_ids)
    assert llm.llm_engine.model_config.hf_config.vocab_size == QWEN3_ROWS
