"""Budgets in tokens, not rows: how a batch of rows of unequal length is cut into groups (a teacher's
forward passes, a learner's micro-batches) and spread over learner ranks.

A group is padded to its own longest prompt (left) and longest completion (right), so its cost is
rows x (longest prompt + longest completion). Rows of like length go together: sorted by completion
length, longest first, and cut greedily. The result says which rows go where; nothing here touches a
tensor, so the loss reduction (global denominators, losses/reduce.py) is untouched by the grouping.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from opd.contracts import TrainBatch


def token_batches(prompt_lens: list[int], completion_lens: list[int], max_tokens: int) -> list[list[int]]:
    """Row indices in groups whose padded size rows x (max prompt + max completion) <= max_tokens (a
    row over the budget forms a group alone). Longest completions first; within a group, that order."""
    order = sorted(range(len(completion_lens)), key=lambda i: (-completion_lens[i], i))
    groups: list[list[int]] = []
    width_p = width_c = 0
    for i in order:
        p, c = max(width_p, prompt_lens[i]), max(width_c, completion_lens[i])
        if groups and (len(groups[-1]) + 1) * (p + c) <= max_tokens:
            groups[-1].append(i)
            width_p, width_c = p, c
        else:
            groups.append([i])
            width_p, width_c = prompt_lens[i], completion_lens[i]
    return groups


def spread_by_tokens(tokens: list[int], parts: int) -> list[list[int]]:
    """Row indices for each of `parts` ranks with near-equal token sums: longest row first to the rank
    holding fewest tokens (ties: fewest rows, then lowest rank). Each rank's rows in ascending order."""
    loads = [(0, 0, r) for r in range(parts)]
    out: list[list[int]] = [[] for _ in range(parts)]
    for i in sorted(range(len(tokens)), key=lambda i: (-tokens[i], i)):
        load, rows, r = min(loads)
        out[r].append(i)
        loads[r] = (load + tokens[i], rows + 1, r)
    return [sorted(rows) for rows in out]


def split_to(plan: list[list[int]], count: int) -> list[list[int]]:
    """`plan` grown to `count` groups by halving its largest (by rows), so every learner rank runs as
    many micro-batches as the others (DeepSpeed's gradient reductions are collectives); an empty group
    where no group has two rows left."""
    plan = [list(g) for g in plan]
    while len(plan) < count:
        big = max(range(len(plan)), key=lambda i: len(plan[i]))
        if len(plan[big]) < 2:
            return plan + [[] for _ in range(count - len(plan))]
        g = plan.pop(big)
        plan[big:big] = [g[:len(g) // 2], g[len(g) // 2:]]
    return plan


def weightless(b: TrainBatch) -> TrainBatch:
    """`b` with no completion token counted: a forward and backward that add nothing to the gradient."""
    return replace(b, completion_mask=torch.zeros_like(b.completion_mask))
