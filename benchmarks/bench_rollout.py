"""The rollout on a CPU: our HF engine against vLLM's CPU build on the same work, against the arithmetic.

    python benchmarks/bench_rollout.py                       # the realistic shape, 3 interleaved rounds
    python benchmarks/bench_rollout.py --rounds 5 --threads 2 --engines hf,vllm

The work is bench_vs_trl.py's realistic rollout: a random-init Llama student (hidden 256, 3 layers, 18.4M
parameters) over a 32,000-token vocabulary, 32 prompts of 7 tokens, 32 new tokens each, temperature 1,
no stop token the random model hits (so every row decodes 32 tokens). Each engine is built in its own
fresh subprocess, warmed up twice, then timed `--calls` times; the engines alternate round by round so
load from other jobs hits both alike. Printed: each engine's median and spread (s per rollout), the ratio
of each to the HF engine, and what the arithmetic allows: the decode's matmul FLOPs (2 per non-embedding
parameter per token, the output layer included; attention scores left out) at this machine's measured
fp32 matmul rate.

Also printed, in the HF engine's process: the decode with our sampler (opd.sampling.draw, inverse CDF in
blocks) against torch.multinomial (what it replaced), interleaved in one process, and the share of the
HF decode spent in matmuls (torch.profiler).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench_vs_trl import matmul_rates  # noqa: E402  (this folder is on the path: the script's own)
from opd.env import CHILD_ENV  # noqa: E402  (after the path above)

ROWS, PROMPT, NEW = 32, 7, 32


def prompts() -> list[list[int]]:
    return [[1] + [10 + (i * 7 + j) % 20 for j in range(PROMPT - 1)] for i in range(ROWS)]


def child(engine: str, path: str, threads: int, calls: int) -> dict:
    """One engine in this process: warm-up, then `calls` timed rollouts (+ the sampler A/B for hf)."""
    import torch
    torch.set_num_threads(threads)
    from opd.contracts import SamplingSpec
    vocab = json.loads((Path(path) / "config.json").read_text())["vocab_size"]
    spec = SamplingSpec(max_new_tokens=NEW, temperature=1.0, top_p=1.0, stop_ids=[vocab - 1], seed=0)
    if engine == "vllm":
        from actors.vllm_engine import VLLMEngine
        from opd.vllm_llm import LLMSpec
        eng = VLLMEngine(LLMSpec(model=path, dtype="float32", max_model_len=128, kv_cache_memory_gb=1), spec, 0)
    else:
        from actors.hf_engine import HFEngine
        eng = HFEngine(path, threads=threads)
    for _ in range(2):
        eng.generate(prompts(), spec)
    times = []
    for _ in range(calls):
        t = time.perf_counter()
        r = eng.generate(prompts(), spec)
        times.append(time.perf_counter() - t)
    out = {"times": times, "tokens": int(r.completion_mask.sum())}
    if engine == "hf":
        out.update(sampler_ab(eng, spec, calls))
    return out


def sampler_ab(eng, spec, calls: int) -> dict:
    import torch

    import opd.sampling as sampling
    ours = sampling.draw
    variants = {"ours": ours, "multinomial": lambda p, g: torch.multinomial(p, 1, generator=g).squeeze(-1)}
    times = {k: [] for k in variants}
    try:
        for _ in range(calls):
            for name, fn in variants.items():
                sampling.draw = fn
                t = time.perf_counter()
                eng.generate(prompts(), spec)
                times[name].append(time.perf_counter() - t)
    finally:
        sampling.draw = ours
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        eng.generate(prompts(), spec)
    events = prof.key_averages()
    total = sum(e.self_cpu_time_total for e in events)
    mm = sum(e.self_cpu_time_total for e in events if e.key in ("aten::mm", "aten::addmm", "aten::bmm"))
    return {"sampler": times, "matmul_share": mm / total}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--engines", default="hf,vllm")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--calls", type=int, default=5, help="timed rollouts per engine per round")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--child", nargs=2, metavar=("ENGINE", "PATH"), help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print("RESULT " + json.dumps(child(a.child[0], a.child[1], a.threads, a.calls)))
        return 0
    from tasks.tiny import write_tiny_models
    work = Path(tempfile.mkdtemp(prefix="bench-rollout-"))
    path = write_tiny_models(work, sizes={"student": (256, 3, 4)}, vocab_size=32000)["student"]
    env = {**os.environ, **CHILD_ENV, "VLLM_CPU_OMP_THREADS_BIND": "nobind"}
    engines = a.engines.split(",")
    results: dict[str, list] = {e: [] for e in engines}
    extra = {}
    for r in range(a.rounds):
        for e in engines:
            proc = subprocess.run([sys.executable, __file__, "--child", e, str(path), "--threads", str(a.threads),
                                   "--calls", str(a.calls)], env=env, capture_output=True, text=True, cwd=ROOT)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(f"{e}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", file=sys.stderr)
                return 1
            out = json.loads(line[len("RESULT "):])
            results[e] += out["times"]
            if e == "hf":
                for k, v in out["sampler"].items():
                    extra.setdefault(k, []).extend(v)
                extra.setdefault("matmul_share", []).append(out["matmul_share"])
            print(f"round {r + 1}: {e} median {statistics.median(out['times']):.3f} s ({out['tokens']} tokens)", flush=True)
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(path)
    params = sum(x.numel() for x in model.parameters()) - model.get_input_embeddings().weight.numel()
    gflop = 2 * params * ROWS * NEW / 1e9
    rate = matmul_rates([a.threads])[a.threads]
    base = statistics.median(results["hf"]) if "hf" in results else None
    print(f"\n{ROWS} prompts x {NEW} new tokens, V = 32000, student 18.4M, {a.threads} thread(s), torch {torch.__version__}; "
          f"load average at the end {os.getloadavg()[0]:.1f}")
    print(f"{'engine':12s} {'median s':>9s} {'min s':>7s} {'max s':>7s} {'vs hf':>6s}")
    for e, ts in results.items():
        m = statistics.median(ts)
        print(f"{e:12s} {m:9.3f} {min(ts):7.3f} {max(ts):7.3f} {m / base if base else float('nan'):6.2f}")
    print(f"arithmetic: {gflop:.1f} GFLOP of matmuls at {rate:.0f} GFLOP/s (fp32 matmul, {a.threads} thread(s)) = "
          f"{gflop / rate:.3f} s")
    if "ours" in extra:
        o, m = statistics.median(extra["ours"]), statistics.median(extra["multinomial"])
        print(f"hf sampler, same process interleaved: ours {o:.3f} s, torch.multinomial {m:.3f} s ({m / o:.2f}x); "
              f"matmuls {statistics.median(extra['matmul_share']):.0%} of the hf decode's CPU time")
    return 0


if __name__ == "__main__":
    sys.exit(main())
