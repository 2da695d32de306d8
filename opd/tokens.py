"""The special ids every process must agree on: what pads, what ends a reference answer, and every id
generation stops at. Read once on the driver from the student's tokenizer and generation_config.json,
then carried to the engines in SamplingSpec.stop_ids, so the HF and vLLM engines stop alike."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional


@dataclass(frozen=True)
class SpecialIds:
    pad: int                 # the tokenizer's pad, or its EOS where it has none (the mask says what is padding)
    eos: int                 # ends an SFT target: the tokenizer's EOS (a chat model's end of turn)
    stop: tuple[int, ...]    # every id generation stops at (eos included), sorted


def generation_config_eos(model_path: Optional[str]) -> list[int]:
    """eos_token_id of model_path/generation_config.json (an int or a list), or []."""
    if not model_path:
        return []
    f = Path(model_path) / "generation_config.json"
    if not f.exists():
        return []
    value = json.loads(f.read_text()).get("eos_token_id")
    return [] if value is None else [value] if isinstance(value, int) else list(value)


def stop_id(tokenizer, item, key: str = "rollout.stop") -> int:
    """One manifest stop entry (an id, or a string that is a single token) as an id."""
    if isinstance(item, bool) or not isinstance(item, (int, str)):
        raise ValueError(f"{key}: {item!r} is neither a token id nor a string")
    if isinstance(item, int):
        if not 0 <= item < len(tokenizer):
            raise ValueError(f"{key}: id {item} is outside the tokenizer's {len(tokenizer)} ids")
        return item
    ids = tokenizer(item, add_special_tokens=False).input_ids
    if len(ids) != 1:
        raise ValueError(f"{key}: {item!r} is {len(ids)} tokens for this tokenizer ({ids}); a stop string must be "
                         "one token (such as '<|im_end|>'), so that both engines stop at the same token")
    return ids[0]


def special_ids(tokenizer, model_path: Optional[str] = None, extra_stop: Iterable = ()) -> SpecialIds:
    gen_eos = generation_config_eos(model_path)
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else (gen_eos[0] if gen_eos else None)
    if eos is None:
        raise ValueError(f"model.path: the tokenizer names no eos_token and {model_path}/generation_config.json no "
                         "eos_token_id; generation could never stop")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    stop = {eos, *gen_eos, *(stop_id(tokenizer, s) for s in extra_stop)}
    return SpecialIds(pad=pad, eos=eos, stop=tuple(sorted(stop)))
