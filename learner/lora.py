"""LoRA students (model.lora): the learner trains peft adapters on a frozen base; everything outside
the learner sees an ordinary model.

The adapters live inside the HF model itself (peft injects its layers in place), so DeepSpeed, the
loss and the fused head see the same HF module as without LoRA. Only the adapter matrices require
gradients, so the optimizer (and its state) holds them alone.

What leaves the learner is merged: a touched Linear's weight is W + (alpha / r) B A (peft's own
`scaling`), computed in float32 and sent under the base model's parameter name, which is what the
HF engine and vLLM load. A sync sends only what the adapters can change; the engines started from
model.path hold the rest already, and it never moves. vLLM fuses some sibling Linears into one layer
(q/k/v into qkv_proj, gate/up into gate_up_proj) and its layerwise reload rebuilds a layer from
whatever part of it arrives, leaving the rest uninitialised: so a sync sends every Linear of a
touched module's parent, merged where touched, as is where not.
"""
from __future__ import annotations

from typing import Optional

import torch

from opd.weight_sync.source import Part

ADAPTER = "default"  # peft's adapter name; one adapter per student
ADAPTER_DIR = "adapter"  # final/adapter: the trained adapter, beside the merged model


def peft_config(lora):
    """peft's LoraConfig from the manifest's model.lora section."""
    from peft import LoraConfig
    targets = lora.target_modules
    return LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                      target_modules=targets[0] if list(targets) == ["all-linear"] else list(targets))


class LoraStudent:
    """peft adapters injected into `model` (in place): the base frozen, the adapters trainable."""

    def __init__(self, model: torch.nn.Module, lora):
        from peft import get_peft_model
        from peft.tuners.lora import LoraLayer
        try:
            self.peft = get_peft_model(model, peft_config(lora))
        except ValueError as e:  # peft's "Target modules {...} not found in the base model"
            raise ValueError(f"model.lora.target_modules: {list(lora.target_modules)}: {str(e).splitlines()[0]} "
                             "(name Linear modules of the student, e.g. [q_proj, v_proj], or all-linear)") from None
        self.model = model  # the same object, now holding the LoRA layers
        self.layers = {name: m for name, m in model.named_modules() if isinstance(m, LoraLayer)}
        for name, m in self.layers.items():
            if not isinstance(m.get_base_layer(), torch.nn.Linear) or m.fan_in_fan_out:
                raise ValueError(f"model.lora.target_modules: {name} is a {type(m.get_base_layer()).__name__}; "
                                 "LoRA here trains torch.nn.Linear layers only (name Linear modules, or all-linear)")
        head = model.get_output_embeddings()
        if any(m is head for m in self.layers.values()):
            raise ValueError("model.lora.target_modules: the output layer is not a LoRA target here (the fused head, "
                             "hidden-state teachers and tied embeddings use it as one plain matrix); all-linear leaves "
                             "it out")

    def trainable(self) -> list[tuple[str, torch.nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def parts(self, module: torch.nn.Module, touched_only: bool) -> list[Part]:
        """The stream of the merged model under the base model's names: every parameter
        (touched_only False: the HF export), or the Linears of the touched modules' parents (a sync)."""
        layers = {name: m for name, m in module.named_modules() if name in self.layers}
        parents = {name.rpartition(".")[0] for name in layers}
        keep = {name for name, m in module.named_modules()
                if name.rpartition(".")[0] in parents and (name in layers or isinstance(m, torch.nn.Linear))}
        out = []
        for name, p in module.named_parameters():
            owner, _, leaf = name.rpartition(".")
            if ".lora_" in name:
                continue
            if owner.endswith(".base_layer"):  # a touched Linear: weight merged, bias as is
                layer_name = owner.removesuffix(".base_layer")
                layer = layers[layer_name]
                merged = Part(f"{layer_name}.weight", (p, layer.lora_A[ADAPTER].weight, layer.lora_B[ADAPTER].weight),
                              _merge(layer.scaling[ADAPTER]))
                out.append(merged if leaf == "weight" else Part(f"{layer_name}.{leaf}", (p,)))
            elif not touched_only or owner in keep:
                out.append(Part(name, (p,)))
        return out

    def adapter_parts(self, module: torch.nn.Module) -> list[Part]:
        """The adapter matrices under peft's names (what PeftModel.save_pretrained writes)."""
        return [Part(f"base_model.model.{n}", (p,)) for n, p in module.named_parameters() if p.requires_grad]

    def save_adapter(self, path: str, adapter: dict[str, torch.Tensor]) -> None:
        """Write the adapter (peft format: PeftModel.from_pretrained(base, path) loads it) from the
        gathered tensors of adapter_parts."""
        self.peft.save_pretrained(path, state_dict=adapter)


def _merge(scaling: float):
    def merged(w: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """W [out, in] + scaling x B [out, r] @ A [r, in], in float32, in W's dtype."""
        return (w.float() + scaling * (b.float() @ a.float())).to(w.dtype)
    return merged


def optimizer_state_bytes(optimizer: Optional[torch.optim.Optimizer]) -> int:
    """Bytes the optimizer's state tensors hold (AdamW: two moments per trainable parameter)."""
    if optimizer is None:
        return 0
    return sum(t.numel() * t.element_size() for state in optimizer.state.values()
               for t in state.values() if torch.is_tensor(t))
