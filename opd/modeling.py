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


def load_model(path: str, dtype: str = "float32", device: torch.device | str = "cpu", threads: int = 0,
               trust_remote_code: bool = False):
    """Load an HF causal LM (eval mode, on `device`) and its tokenizer."""
    from transformers import AutoModelForCausalLM, AutoTokenizer
    if threads:
        torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype], trust_remote_code=trust_remote_code)
    model.to(device).eval()
    return model, AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)


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


def _layout(model, prompts: list[list[int]], completion_ids: torch.Tensor, completion_mask: torch.Tensor,
            pad_id: int) -> tuple[dict, torch.Tensor]:
    """Model inputs for prompt + completion rows, and the T positions that predict the completion.

    Prompts are left-padded and completions right-padded, so position P-1+t predicts completion
    token t in every row."""
    device = next(model.parameters()).device
    p_ids, p_mask = left_pad(prompts, pad_id)
    ids = torch.cat([p_ids, completion_ids.masked_fill(~completion_mask, pad_id)], 1).to(device)
    mask = torch.cat([p_mask, completion_mask.long()], 1).to(device)
    P, T = p_ids.shape[1], completion_ids.shape[1]
    # use_cache False: a scoring or training forward reads no KV cache, and building one keeps every
    # layer's keys and values for the whole batch (an 8B model: ~150 KB a token)
    return ({"input_ids": ids, "attention_mask": mask, "position_ids": positions(mask), "use_cache": False},
            torch.arange(P - 1, P + T - 1, device=device))


def completion_logits(model, prompts: list[list[int]], completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor, pad_id: int) -> torch.Tensor:
    """Logits that predict each completion token: [N, T, V] on the model's device; only those T
    positions go through the output layer (`logits_to_keep`)."""
    inputs, keep = _layout(model, prompts, completion_ids, completion_mask, pad_id)
    return model(**inputs, logits_to_keep=keep).logits


def completion_hidden(model, prompts: list[list[int]], completion_ids: torch.Tensor,
                      completion_mask: torch.Tensor, pad_id: int) -> torch.Tensor:
    """The final hidden states that predict each completion token, [N, T, H]: what the output layer
    (`output_head(model)`) turns into completion_logits. `model` is an HF causal LM (or a wrapper
    whose .module is one, as DeepSpeed's engine); its base model applies the final norm."""
    hf = getattr(model, "module", model)
    inputs, keep = _layout(hf, prompts, completion_ids, completion_mask, pad_id)
    return hf.base_model(**inputs).last_hidden_state[:, keep]


# Config keys of architectures whose logits are not a plain linear map of the base model's output
# (soft-capping, scaling): for them the learner keeps the logits path and a teacher ships log-probs.
_HEAD_EXTRAS = ("final_logit_softcapping", "logit_scale", "logits_scaling", "output_multiplier_scale")


def model_skeleton(path: str):
    """The HF causal LM at `path` built on the meta device: its architecture, parameter names and
    shapes, no weights read or allocated."""
    from transformers import AutoConfig, AutoModelForCausalLM
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))


def plain_head_problem(model) -> str | None:
    """Why logits != output_head(model)(completion_hidden(...)) for this model, or None when they are equal."""
    head = model.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        return f"its output layer is a {type(head).__name__}, not a Linear"
    extras = [k for k in _HEAD_EXTRAS if getattr(model.config, k, None) not in (None, 1, 1.0)]
    return f"its config sets {extras[0]} (its logits are not a plain linear map)" if extras else None


def output_head(model):
    """The model's output layer as a losses.reduce.Head (sharing its parameters: tied embeddings included)."""
    from losses.reduce import Head
    head = model.get_output_embeddings()
    return Head(head.weight, head.bias)


def load_output_head(path: str, dtype: str = "float32"):
    """Only the output layer of the HF model at `path` (a frozen teacher's head for the learner), as a
    detached Head. Reads that one tensor from the safetensors files when it can find it by name; falls
    back to loading the whole model on CPU."""
    import json
    from pathlib import Path

    from transformers import AutoModelForCausalLM

    from losses.reduce import Head
    skeleton = model_skeleton(path)
    problem = plain_head_problem(skeleton)
    if problem:
        raise ValueError(f"{path}: the teacher's head cannot be applied outside the model: {problem}")
    head = skeleton.get_output_embeddings()
    names = {id(p): n for n, p in skeleton.named_parameters()}  # a tied head is named after the embeddings
    wanted = {"weight": names[id(head.weight)]} | ({"bias": names[id(head.bias)]} if head.bias is not None else {})
    files = {}
    index = Path(path, "model.safetensors.index.json")
    if index.exists():
        files = json.loads(index.read_text())["weight_map"]
    elif Path(path, "model.safetensors").exists():
        files = dict.fromkeys(wanted.values(), "model.safetensors")
    if all(n in files for n in wanted.values()):
        from safetensors import safe_open
        tensors = {}
        for part, name in wanted.items():
            with safe_open(str(Path(path, files[name])), framework="pt") as f:
                if name in f.keys():
                    tensors[part] = f.get_tensor(name).to(DTYPES[dtype])
        if len(tensors) == len(wanted):
            return Head(tensors["weight"], tensors.get("bias"))
    model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[dtype])
    return output_head(model).detach()


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
