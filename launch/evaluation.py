"""Evaluation sets: which prompts, sampled how many times and how, scored by which verifier, logged
under which names.

A run evaluates the sets in `eval.sets` or, without them, `data.eval` alone (named by its file stem).
A set's field left unset takes the `eval:` section's value. Each prompt is sampled n =
samples_per_prompt times, and a set reports

    accuracy   the mean reward over all n samples of every prompt (avg@n; n = 1: one answer per prompt)
    pass@k     for k in 1, 2, 4, ... <= n and n itself: the chance that at least one of k samples drawn
               from the n is right (reward 1), by the unbiased estimator 1 - C(n-c, k) / C(n, k) of a
               prompt with c right samples, averaged over prompts (Chen et al. 2021, "Evaluating Large
               Language Models Trained on Code")

as eval/accuracy and eval/pass@k for the first set: the run's headline, which eval.stop_at_accuracy,
summary.json, experiments and the demo read. With eval.sets, every set is also logged as
eval/<name>/accuracy and eval/<name>/pass@k.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from launch.config import ExperimentConfig, ManifestError
from opd.contracts import SamplingSpec

if TYPE_CHECKING:
    from launch.batches import PromptFormatter
    from launch.config import ExperimentConfig

_NAME = re.compile(r"[A-Za-z0-9_.@+-]+")


@dataclass(frozen=True)
class EvalSetSpec:
    """One set's settings, every fallback resolved. `key` names its rows in errors and skipped-row counts."""
    key: str                # its data's manifest key: "data.eval" or "eval.sets[i].data"
    name: str
    data: str
    size: int
    samples_per_prompt: int
    max_new_tokens: int
    temperature: float
    top_p: float
    verifier: str
    chat_template_kwargs: Optional[dict] = None  # merged over data.chat_template_kwargs for this set

def eval_set_specs(cfg: "ExperimentConfig") -> list[EvalSetSpec]:
    """The run's evaluation sets (none without data.eval or eval.sets), checked: a bad value raises a
    ManifestError naming its key (`eval.sets[1].samples_per_prompt: must be > 0, got 0`)."""
    ec = cfg.eval
    if ec.sets and cfg.data.eval:
        raise ManifestError(f"data.eval: {cfg.data.eval!r} is set together with eval.sets; list it as a set in "
                            "eval.sets (the first set is the headline eval/accuracy) and set data.eval: null")
    base = dict(size=ec.size, samples_per_prompt=ec.samples_per_prompt,
                max_new_tokens=ec.max_new_tokens or cfg.rollout.max_new_tokens, temperature=ec.temperature,
                top_p=ec.top_p, verifier=ec.verifier)
    _checked(EvalSetSpec("eval", "", "", **base), "eval")  # the fallbacks, checked with or without a set
    if not ec.sets:
        return [EvalSetSpec("data.eval", Path(cfg.data.eval).stem, cfg.data.eval, **base)] if cfg.data.eval else []
    specs = []
    for i, s in enumerate(ec.sets):
        key = f"eval.sets[{i}]"
        given = {f: getattr(s, f) for f in base if getattr(s, f) is not None}
        if s.chat_template_kwargs is not None and not cfg.data.chat_template:
            raise ManifestError(f"{key}.chat_template_kwargs: applies to chat prompts; set data.chat_template: true")
        spec = _checked(EvalSetSpec(f"{key}.data", s.name or Path(s.data).stem, s.data, **{**base, **given},
                                    chat_template_kwargs=s.chat_template_kwargs), key)
        if not _NAME.fullmatch(spec.name):
            raise ManifestError(f"{key}.name: {spec.name!r} names metrics eval/<name>/...; use letters, digits "
                                "and _ . @ + - only")
        clash = next((o for o in specs if o.name == spec.name), None)
        if clash:
            raise ManifestError(f"{key}.name: {spec.name!r} is also {clash.key[:-5]}'s name (a set's name defaults to "
                                "its data file's stem); give each set its own name")
        specs.append(spec)
    return specs


def _checked(spec: EvalSetSpec, key: str) -> EvalSetSpec:
    """Checks one set's values; `key` is where they were written ("eval" or "eval.sets[i]")."""
    from tasks.verifiers import VERIFIERS  # light: math_verify is imported by the worker, on first use
    for name in ("size", "samples_per_prompt", "max_new_tokens"):
        if getattr(spec, name) <= 0:
            raise ManifestError(f"{key}.{name}: must be > 0, got {getattr(spec, name)}")
    if spec.temperature < 0:
        raise ManifestError(f"{key}.temperature: must be >= 0 (0: greedy), got {spec.temperature}")
    if not 0 < spec.top_p <= 1:
        raise ManifestError(f"{key}.top_p: must be in (0, 1], got {spec.top_p}")
    if spec.verifier not in VERIFIERS:
        raise ManifestError(f"{key}.verifier: {spec.verifier!r} is not one of {sorted(VERIFIERS)}")
    return spec


@dataclass
class EvalSet:
    spec: EvalSetSpec
    rows: list[dict]        # the set's first `size` usable rows, each with "prompt" and "answer"

    def prompts(self, fmt: "PromptFormatter") -> list[list[int]]:
        """The set's prompt token ids, one per row, rendered by one formatter call: the place for
        settings a set renders its own way (its chat_template_kwargs)."""
        return fmt.with_chat_kwargs(self.spec.chat_template_kwargs).students(self.rows)

    def sampling(self, seed: int, stop_ids: tuple[int, ...] = ()) -> SamplingSpec:
        s = self.spec
        return SamplingSpec(max_new_tokens=s.max_new_tokens, temperature=s.temperature, top_p=s.top_p, seed=seed,
                            behaviour_logprobs=False, stop_ids=stop_ids)


def pass_ks(n: int) -> list[int]:
    """The k of pass@k reported for n samples per prompt: 1, 2, 4, ... up to n, and n itself."""
    return sorted({1 << i for i in range(n.bit_length()) if 1 << i <= n} | {n})


def pass_at_k(n: int, c: int, k: int) -> float:
    """The unbiased pass@k of a prompt with c right answers among n samples: 1 - C(n-c, k) / C(n, k),
    the chance that k of the n samples drawn without replacement hold at least one right answer."""
    if not 0 <= c <= n or not 0 < k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 0 < k <= n, got n={n}, c={c}, k={k}")
    return 1.0 - math.comb(n - c, k) / math.comb(n, k)  # exact integers; one rounding, in the division


def set_metrics(rewards: list[list[float]]) -> dict[str, float]:
    """rewards[p][j]: the reward of prompt p's sample j (n samples each) -> {"accuracy", "pass@k"...}.
    A sample is right for pass@k when its reward is 1."""
    n = len(rewards[0])
    out = {"accuracy": sum(map(sum, rewards)) / (n * len(rewards))}
    right = [sum(r >= 1.0 for r in row) for row in rewards]
    for k in pass_ks(n):
        out[f"pass@{k}"] = sum(pass_at_k(n, c, k) for c in right) / len(rewards)
    return out


class Evaluator:
    """Samples and scores every set. `engine`: anything with generate(prompts, SamplingSpec) -> Rollout
    (the run's RolloutGroup; an HFEngine in tests)."""

    def __init__(self, sets: list[EvalSet], seed: int, verify_timeout_s: float, named: bool,
                 stop_ids: tuple[int, ...] = ()):
        from tasks.verifiers import get_verifier
        self.sets, self.seed, self.named, self.stop_ids = sets, seed, named, stop_ids
        self.verifiers = {s.spec.name: get_verifier(s.spec.verifier, verify_timeout_s) for s in sets}

    def __call__(self, engine, fmt: "PromptFormatter") -> tuple[dict[str, float], Optional[float]]:
        """(metrics to log, the headline accuracy: the first set's; None without sets)."""
        metrics: dict[str, float] = {}
        for i, s in enumerate(self.sets):
            scores = self.score(s, engine, fmt)
            if i == 0:
                metrics.update({f"eval/{k}": v for k, v in scores.items()})
            if self.named:
                metrics.update({f"eval/{s.spec.name}/{k}": v for k, v in scores.items()})
        return metrics, metrics.get("eval/accuracy")

    def score(self, s: EvalSet, engine, fmt: "PromptFormatter") -> dict[str, float]:
        """One engine call for all n x P samples, sample-major (row j*P + p is prompt p's sample j), so
        the engines batch them. Its seed is run.seed, and every row's randomness follows from it and the
        row's index (vLLM seeds each row; the HF engine draws the batch from one generator): the same
        weights evaluate alike whenever they are evaluated, a resumed run included. With n = 1 this is
        the call, and the number, of a run before samples_per_prompt existed."""
        n, p = s.spec.samples_per_prompt, len(s.rows)
        rollout = engine.generate(s.prompts(fmt) * n, s.sampling(self.seed, self.stop_ids))
        verify = self.verifiers[s.spec.name]
        flat = [verify(fmt.text(c), s.rows[i % p]["answer"]) for i, c in enumerate(rollout.completions())]
        return set_metrics([[flat[j * p + i] for j in range(n)] for i in range(p)])
