"""Tiny models and a character-level tokenizer, written in Hugging Face format.

Demos and tests load them through the real `from_pretrained` path, so nothing here is a stand-in:
only the sizes are small. No hub is needed (the project never downloads weights).
"""
from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<pad>", "<bos>", "<eos>", "<unk>"]
CHARS = string.digits + string.ascii_lowercase + " +-*=:;,.?!()'\n"

# name -> (hidden, layers, heads). Student and teacher share the tokenizer (and family).
SIZES = {"student": (128, 4, 4), "teacher": (128, 4, 4), "tiny": (64, 1, 2)}  # head_dim 32: vLLM's CPU attention needs >= 32


def build_tokenizer(vocab_size: int = 0) -> PreTrainedTokenizerFast:
    """The character-level tokenizer; vocab_size > 55 pads it with `<extra_i>` tokens that text never
    encodes to but a model may sample (a realistic vocabulary size for benchmarks)."""
    base = SPECIALS + list(CHARS)
    vocab = {tok: i for i, tok in enumerate(base + [f"<extra_{i}>" for i in range(max(0, vocab_size - len(base)))])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")  # one token per char
    core.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", bos_token="<bos>",
                                   eos_token="<eos>", unk_token="<unk>")


def build_model(tokenizer, hidden: int, layers: int, heads: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden,
                      num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      max_position_embeddings=256, tie_word_embeddings=False,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                      pad_token_id=tokenizer.pad_token_id)
    return LlamaForCausalLM(cfg)


def write_tiny_models(out_dir: str | Path, seed: int = 0, sizes: dict | None = None,
                      vocab_size: int = 0) -> dict[str, Path]:
    """Write one randomly initialised model per `sizes` entry (default SIZES), with the tokenizer
    (build_tokenizer(vocab_size)), under out_dir."""
    out_dir = Path(out_dir)
    tok = build_tokenizer(vocab_size)
    paths = {}
    for i, (name, (hidden, layers, heads)) in enumerate((sizes or SIZES).items()):
        path = out_dir / name
        build_model(tok, hidden, layers, heads, seed + i).save_pretrained(path)
        tok.save_pretrained(path)
        paths[name] = path
    return paths
