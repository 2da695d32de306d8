"""Time and peak extra memory of forward+backward for every registered loss.

    python benchmarks/bench_losses.py                      # V=151936, 4096 positions, bf16 logits
    python benchmarks/bench_losses.py --vocab 4096 --positions 512   # small and quick

Method (CPU). Each loss runs in a fresh subprocess, so nothing one loss allocates or caches can
hide another's peak. The child builds its inputs chunk by chunk (bf16 logits [M, V] requiring
grad, teacher top-k K=64 and student top-k, and a float32 full teacher log-prob tensor [M, V] only
for losses that declare teacher_full), runs one tiny warm-up call of the same loss (so code pages
and thread pools are resident), then resets the kernel's resident-set high-water mark by writing
"5" to /proc/self/clear_refs and reads the current RSS as the baseline. It then runs
`loss(logits, batch)` and `.backward()` once and reads VmHWM from /proc/self/status:
peak extra = VmHWM - baseline, i.e. everything forward+backward made resident, including the
logits' gradient (bf16, 1x the logits) that backward must produce. torch's CPU allocator returns
large blocks to the OS on free, so RSS tracks live tensors. Where clear_refs is not writable the
child falls back to ru_maxrss - baseline and says so (then input building can mask the peak).
PASS means peak extra <= 1.5x the logits tensor. The full teacher tensor is an input, reported
in its own column, not counted as extra.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# name, params: every registered loss, top-k losses on both supports where they have two.
CASES = [
    ("sampled_token_rkl", {}),
    ("sampled_token_rkl", {"clip_eps": 0.2, "gamma": 0.95}),
    ("sampled_log_ratio_direct_zero_grad", {}),
    ("full_reverse_kl", {}),
    ("full_forward_kl", {}),
    ("generalized_jsd", {"beta": 0.5}),
    ("topk_reverse_kl_biased", {"support": "teacher"}),
    ("topk_reverse_kl_sg", {"support": "teacher"}),
    ("topk_reverse_kl_sg", {"support": "student"}),
    ("topk_reverse_kl_renorm", {"support": "intersection"}),
    ("topk_reverse_kl_tail", {"support": "teacher"}),
    ("topk_forward_kl", {"tail": True}),
    ("sft", {}),
    ("grpo", {}),
    ("weighted_sum", {"components": [{"name": "topk_reverse_kl_sg", "weight": 1.0},
                                     {"name": "sft", "weight": 0.1}]}),
]


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def build_inputs(m: int, vocab: int, k: int, teacher_full: bool, seq_len: int, seed: int = 0):
    """Chunked, so no [M, V] float32 temporary raises the high-water mark before the baseline."""
    import torch
    from losses import LossBatch
    g = torch.Generator().manual_seed(seed)
    logits = torch.empty(m, vocab, dtype=torch.bfloat16)
    full = torch.empty(m, vocab, dtype=torch.float32) if teacher_full else None
    cols = {n: [] for n in ("tok", "beh", "tsam", "tids", "tlp", "sids", "tas")}
    step = 64
    for s in range(0, m, step):
        z = torch.randn(min(step, m - s), vocab, generator=g) * 3
        logits[s:s + len(z)] = z.to(torch.bfloat16)
        logp = torch.log_softmax(logits[s:s + len(z)].float(), -1)
        logq = torch.log_softmax(torch.randn(len(z), vocab, generator=g) * 3, -1)
        if full is not None:
            full[s:s + len(z)] = logq
        tok = torch.multinomial(logp.exp(), 1, generator=g)
        tids, sids = logq.topk(k, -1).indices, logp.topk(k, -1).indices
        for n, v in (("tok", tok[:, 0]), ("beh", logp.gather(-1, tok)[:, 0]), ("tsam", logq.gather(-1, tok)[:, 0]),
                     ("tids", tids), ("tlp", logq.gather(-1, tids)), ("sids", sids), ("tas", logq.gather(-1, sids))):
            cols[n].append(v)
    c = {n: torch.cat(v) for n, v in cols.items()}
    is_ref = (torch.arange(m) // seq_len) % 8 == 7  # one sequence in eight is a reference row
    batch = LossBatch(tokens=c["tok"], weights=torch.full((m,), 1.0 / m), behaviour_logprobs=c["beh"],
                      teacher_sampled_logprobs=c["tsam"], teacher_topk_ids=c["tids"], teacher_topk_logprobs=c["tlp"],
                      student_topk_ids=c["sids"], teacher_at_student_topk=c["tas"], teacher_full_logprobs=full,
                      advantages=torch.randn(m, generator=g), is_reference=is_ref,
                      seq_ids=torch.arange(m) // seq_len)
    return logits.requires_grad_(), batch


def run_one(name: str, params: dict, vocab: int, m: int, k: int, chunk_size) -> dict:
    import torch
    from losses import build_loss
    loss = build_loss(name, params, temperature=1.0, chunk_size=chunk_size)
    logits, batch = build_inputs(m, vocab, k, loss.needs.teacher_full, seq_len=min(256, m))
    warm = min(8, m)
    w_logits = logits.detach()[:warm].clone().requires_grad_()
    loss(w_logits, batch.rows(slice(0, warm)))[0].backward()
    del w_logits
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        method = "VmHWM"
    except OSError:
        method = "ru_maxrss"
    base_kb = _status_kb("VmRSS")
    t0 = time.perf_counter()
    value, diags = loss(logits, batch)
    value.backward()
    secs = time.perf_counter() - t0
    peak_kb = _status_kb("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert logits.grad is not None and logits.grad.dtype == torch.bfloat16 and torch.isfinite(value)
    return {"seconds": secs, "peak_extra_mb": (peak_kb - base_kb) / 1024, "method": method,
            "logits_mb": logits.numel() * logits.element_size() / 2**20,
            "teacher_full_mb": 0 if batch.teacher_full_logprobs is None else
            batch.teacher_full_logprobs.numel() * 4 / 2**20, "value": float(value)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--positions", type=int, default=4096)
    ap.add_argument("--k", type=int, default=64, help="teacher / student top-k")
    ap.add_argument("--chunk-size", type=int, default=None, help="rows per chunk (default: auto)")
    ap.add_argument("--only", default=None, help="comma-separated loss names")
    ap.add_argument("--one", default=None, help=argparse.SUPPRESS)  # child mode: JSON [name, params]
    a = ap.parse_args()
    if a.one:
        name, params = json.loads(a.one)
        params = {"k": a.k, **params} if name.startswith("topk") else params
        print(json.dumps(run_one(name, params, a.vocab, a.positions, a.k, a.chunk_size)))
        return
    print(f"V={a.vocab} positions={a.positions} K={a.k} bf16 logits, torch threads={os.cpu_count()}")
    print(f"{'loss':58s} {'time s':>7s} {'peak extra MB':>13s} {'logits MB':>9s} {'ratio':>6s} "
          f"{'teacher_full MB':>15s}  result")
    only = set(a.only.split(",")) if a.only else None
    for name, params in CASES:
        if only and name not in only:
            continue
        cmd = [sys.executable, os.path.abspath(__file__), "--one", json.dumps([name, params]),
               "--vocab", str(a.vocab), "--positions", str(a.positions), "--k", str(a.k)]
        if a.chunk_size:
            cmd += ["--chunk-size", str(a.chunk_size)]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        label = name + (" " + json.dumps(params, separators=(",", ":")) if params and name != "weighted_sum"
                        else " (topk_sg + 0.1 sft)" if name == "weighted_sum" else "")
        if proc.returncode != 0:
            print(f"{label:58s} ERROR: {proc.stderr.strip().splitlines()[-1] if proc.stderr else proc.returncode}")
            continue
        r = json.loads(proc.stdout.strip().splitlines()[-1])
        ratio = r["peak_extra_mb"] / r["logits_mb"]
        print(f"{label[:58]:58s} {r['seconds']:7.2f} {r['peak_extra_mb']:13.0f} {r['logits_mb']:9.0f} "
              f"{ratio:6.2f} {r['teacher_full_mb']:15.0f}  {'PASS' if ratio <= 1.5 else 'FAIL'}"
              f"{'' if r['method'] == 'VmHWM' else ' (ru_maxrss)'}", flush=True)


if __name__ == "__main__":
    main()
