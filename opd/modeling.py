"""Model helpers every process shares: load an HF model onto the actor's device, lay out
prompt + completion batches, and compute completion-position logits.

The rollout engine, the teachers and the learner all import this module; none of them imports another.
"""
from __future__ import annotations

from typing import Iterable, Mapping

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def actor_device(use_gpu: bool) -> torch.device:
    """The device of the current process: the GPU Ray assigned (CUDA_VISIBLE_DEVICES holds exactly
    the actor's GPUs, so it is cuda:0) when the run asked for GPUs, else the CPU."""
    if not use_gpu:
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise RuntimeError("cluster.num_gpus > 0 but this process sees no CUDA device "
                           "(was the actor started without a GPU?)")
    return torch.device("cuda", 0)


def load_model(path: str, dtype: str = "float32", device: torch.device | str = "cpu", threads: int = 0):
    """Load an HF causal LM (eval mode, on `device`) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype]).to(device)
    model.eval()
    return model, AutoTokenizer.from_pretrained(path)


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts so every completion starts at the same column: ids and mask, [N, P]."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.as_tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def positions(mask: torch.Tensor) -> torch.Tensor:
    """Position ids that skip left padding: [N, L]."""
    return (mask.cumsum(-1) - 1).clamp(min=0)


def completion_logits(model, prompts: list[list[int]], completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Logits that predict each completion token: [N, T, V] on the model's device.

    Prompts are left-padded and completions right-padded, so position P-1+t predicts completion
    token t in every row; only those T positions are computed (`logits_to_keep`)."""
    device = next(model.parameters()).device
    p_ids, p_mask = left_pad(prompts, pad_id)
    ids = torch.cat([p_ids, completion_ids.masked_fill(~completion_mask, pad_id)], 1).to(device)
    mask = torch.cat([p_mask, completion_mask.long()], 1).to(device)
    P, T = p_ids.shape[1], completion_ids.shape[1]
    return model(input_ids=ids, attention_mask=mask, position_ids=positions(mask),
                 logits_to_keep=torch.arange(P - 1, P + T - 1, device=device)).logits


@torch.no_grad()
def load_named_tensors(model: torch.nn.Module, named_tensors: Mapping | Iterable, *,
                       complete: bool = True) -> set[str]:
    """Copy (name, tensor) pairs into the model's parameters (any dtype or device: cast on copy).
    complete=True: every parameter must be covered exactly once. Returns the names loaded."""
    items = named_tensors.items() if isinstance(named_tensors, Mapping) else named_tensors
    params = dict(model.named_parameters())
    seen = set()
    for name, tensor in items:
        if name not in params:
            raise KeyError(f"weight sync: unknown parameter {name!r}")
        if params[name].shape != tensor.shape:
            raise ValueError(f"weight sync: {name!r} has shape {tuple(tensor.shape)}, "
                             f"the model expects {tuple(params[name].shape)}")
        params[name].data.copy_(tensor)
        seen.add(name)
    if complete and seen != set(params):
        raise KeyError(f"weight sync: parameters not sent: {sorted(set(params) - seen)[:5]}")
    return seen
