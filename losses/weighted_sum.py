"""A weighted sum of registered losses (distillation + SFT, distillation + task reward)."""
from __future__ import annotations

import math
from functools import reduce

import torch

from losses.base import REGISTRY, LossBatch, LossFn, LossOutput, Needs, register

# Components that train on reference rows; every other component trains on the on-policy rows.
REFERENCE_LOSSES = ("sft",)


def _parse(components) -> list[tuple[str, str, float, dict]]:
    """-> [(label, name, weight, params)]; errors name the offending components[i] field."""
    if not isinstance(components, (list, tuple)) or not components:
        raise ValueError(f"components={components!r}; must be a non-empty list of "
                         "{name: ..., weight: ..., params: {...}}")
    out, labels = [], set()
    for i, c in enumerate(components):
        where = f"components[{i}]"
        if not isinstance(c, dict) or set(c) - {"name", "weight", "params", "label"} or "name" not in c:
            raise ValueError(f"{where}={c!r}; must be a mapping with keys name, weight, params (and optional label)")
        name, weight, params = c["name"], c.get("weight", 1.0), c.get("params") or {}
        if name not in REGISTRY or name == "weighted_sum":
            raise ValueError(f"{where}.name: {name!r} is not a component loss; choose one of "
                             f"{sorted(n for n in REGISTRY if n != 'weighted_sum')}")
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise ValueError(f"{where}.weight={weight!r}; must be a finite number")
        if not isinstance(params, dict):
            raise ValueError(f"{where}.params={params!r}; must be a mapping")
        label = c.get("label", name)
        if label in labels:
            raise ValueError(f"{where}.label: {label!r} used twice; give each repeated loss a distinct label")
        labels.add(label)
        out.append((label, name, float(weight), params))
    return out


def _call(where: str, f, params: dict):
    try:
        return f(**params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"{where}.params: {e}") from e


def _needs(components=None, **_) -> Needs:
    parsed = _parse(components)
    needs = [_call(f"components[{i}]", REGISTRY[n].needs, p) for i, (_, n, _, p) in enumerate(parsed)]
    return reduce(Needs.union, needs)


def _on_rows(fn: LossFn, logits: torch.Tensor, b: LossBatch, rows: torch.Tensor):
    """Run fn on the rows where `rows` [M] bool is True only (so other rows' inputs, which may be
    unfilled, never reach it); scatter per-token loss and diagnostics back to [M] with 0 elsewhere."""
    if bool(rows.all()):
        return fn(logits, b)
    idx = rows.nonzero().squeeze(-1)
    out = fn(logits.index_select(0, idx), b.select(idx))
    def back(v):
        return torch.zeros(rows.shape[0], dtype=v.dtype).index_put((idx,), v)
    return LossOutput(back(out.per_token), {k: back(v) for k, v in out.diagnostics.items()})


@register("weighted_sum", needs=_needs)
def weighted_sum(components=None):
    """loss_t = sum_c weight_c * loss_c,t, components = [{name, weight, params, label?}].

    When LossBatch.is_reference is given, `sft` components see only reference rows and every other
    component only on-policy rows (0 elsewhere). Diagnostics are prefixed `label/` (label defaults to
    the name); `label/loss` is the unweighted component loss and `label/rows` is 1 on its rows, so
    a component diagnostic's mean over its own rows is `label/x` / `label/rows`."""
    parsed = _parse(components)
    fns = [(label, name, w, _call(f"components[{i}]", REGISTRY[name].build, p))
           for i, (label, name, w, p) in enumerate(parsed)]

    def fn(logits: torch.Tensor, b: LossBatch) -> LossOutput:
        total = torch.zeros(logits.shape[0], dtype=logits.dtype)
        diags = {}
        for label, name, w, f in fns:
            rows = torch.ones(logits.shape[0], dtype=torch.bool)
            if b.is_reference is not None:
                rows = b.is_reference if name in REFERENCE_LOSSES else ~b.is_reference
            if not bool(rows.any()):
                continue
            out = _on_rows(f, logits, b, rows)
            total = total + w * out.per_token
            diags.update({f"{label}/{k}": v for k, v in out.diagnostics.items()})
            diags[f"{label}/loss"] = out.per_token.detach()
            diags[f"{label}/rows"] = rows.to(logits.dtype)
        return LossOutput(total, diags)

    prepares = [f.prepare for *_, f in fns if hasattr(f, "prepare")]
    if prepares:
        fn.prepare = lambda b: reduce(lambda acc, p: p(acc), prepares, b)
    return fn
