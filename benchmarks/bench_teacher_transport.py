"""A full-vocabulary loss with the teacher's log-probs shipped, against the teacher's hidden states shipped
(teacher.full_vocab_transport), and the learner's loss from logits against from hidden states
(learner.fused_head): bytes per step, loss time, peak memory, and agreement.

    python benchmarks/bench_teacher_transport.py                    # the realistic shape of bench_vs_trl.py
    python benchmarks/bench_teacher_transport.py --vocab 151936 --rows 1024

Shape (defaults): 32 sequences x 32 completion tokens = 1024 positions, vocabulary 32,000, student
hidden 256, teacher hidden 512, float32, one torch thread; loss full_reverse_kl.

What is measured, per variant, each in a fresh subprocess (so no allocation of one hides another's peak):
  transport   the pickled size of the TeacherScores the teacher actor returns (what crosses the object
              store), from a real HFTeacher on a random-init teacher of the given shape.
  loss s      median of 3 of: unpickle the teacher's payload, the student's head + loss forward and
              backward (the learner's micro-batch work after the model body; the body is the same in all).
  peak MB     the resident-set high-water mark of that work above the state before it: the student's
              hidden states and weights and the teacher's head (a hidden-state run loads it once, like the
              model, and holds it; reported in its own column), measured as bench_losses.py does
              (/proc/self/clear_refs, then VmHWM), after a warm-up run whose freed memory is handed back to
              the system first (malloc_trim), so the measured run cannot hide in it. It includes the received
              payload, the logits or the chunk working set, and every gradient the loss produces (d/dhidden,
              d/dhead).
  x logits    peak MB / the student's [M, V] float32 logits (the yardstick; the target is <= 1.5).
  agreement   the loss and the gradients at the student's hidden states and head against the variant
              logits + log-probs (today's default before this change), max absolute difference.
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from benchmarks.bench_losses import _status_kb  # noqa: E402  (the same high-water-mark reading)
from opd.env import QUIET_ENV  # noqa: E402

VARIANTS = {  # name -> (teacher.full_vocab_transport, learner.fused_head)
    "logits + log-probs": ("logprobs", False),
    "fused + log-probs": ("logprobs", True),
    "logits + hidden states": ("hidden_states", False),
    "fused + hidden states": ("hidden_states", True),
}


def child(a) -> dict:
    """One variant: build the inputs, reset the high-water mark, do the work, report."""
    import torch

    from losses import LossBatch, build_loss
    from losses.reduce import Head
    from opd.modeling import load_output_head
    torch.set_num_threads(1)
    transport, fused = VARIANTS[a.variant]
    payload = Path(a.work, f"{transport}.pkl").read_bytes()
    g = torch.Generator().manual_seed(0)
    hidden = torch.randn(a.rows, a.student_hidden, generator=g)
    head_w = torch.nn.Parameter(torch.randn(a.vocab, a.student_hidden, generator=g) * 0.05)
    tokens = torch.load(Path(a.work, "tokens.pt"))
    teacher_head = load_output_head(str(Path(a.work, "teacher"))) if transport == "hidden_states" else None
    loss = build_loss("full_reverse_kl")
    weights = torch.full((a.rows,), 1.0 / a.rows)

    def work():
        scores = pickle.loads(payload)
        h = hidden.clone().requires_grad_()
        head_w.grad = None
        if transport == "logprobs":
            batch = LossBatch(tokens=tokens, weights=weights, teacher_full_logprobs=scores.full_logprobs.reshape(a.rows, -1))
        else:
            batch = LossBatch(tokens=tokens, weights=weights, teacher_hidden=scores.hidden_states.reshape(a.rows, -1))
        value, _ = (loss.from_hidden(h, Head(head_w), batch, teacher_head) if fused
                    else loss(h @ head_w.T, batch, teacher_head))
        value.backward()
        return float(value), h.grad, head_w.grad

    work()  # warm-up: code pages, thread pools
    _trim()  # what the warm-up freed goes back to the system, so that the run below cannot reuse it unseen
    method = "VmHWM"
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        method = "ru_maxrss"
    base_kb = _status_kb("VmRSS")
    t = time.perf_counter()
    value, g_h, g_w = work()
    first = time.perf_counter() - t
    peak_kb = _status_kb("VmHWM") if method == "VmHWM" else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    times = [first] + [_timed(work) for _ in range(2)]
    torch.save({"value": value, "g_h": g_h, "g_w": g_w}, Path(a.work, f"{a.variant}.pt"))
    head_mb = 0.0 if teacher_head is None else teacher_head.weight.nbytes / 2**20
    return {"variant": a.variant, "peak_mb": (peak_kb - base_kb) / 1024, "method": method,
            "loss_s": sorted(times)[1], "teacher_head_mb": head_mb}


def _trim() -> None:
    """glibc's malloc_trim(0): return freed heap pages to the system (elsewhere nothing)."""
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _timed(f) -> float:
    t = time.perf_counter()
    f()
    return time.perf_counter() - t


def prepare(a, work: Path) -> dict:
    """A random-init teacher of the shape, one real HFTeacher scoring of random completions per
    transport, pickled as the actor's reply would be."""
    import torch

    from opd.contracts import ScoreRequest
    from tasks.tiny import build_model, build_tokenizer
    from teachers.hf_teacher import HFTeacher
    tok = build_tokenizer(a.vocab)
    build_model(tok, a.teacher_hidden, 2, 8, seed=1).save_pretrained(work / "teacher")
    tok.save_pretrained(work / "teacher")
    n, t = a.rows // 32, 32
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(5, a.vocab, (n, t), generator=g)
    mask = torch.ones(n, t, dtype=torch.bool)
    torch.save(ids.reshape(-1), work / "tokens.pt")
    teacher = HFTeacher(str(work / "teacher"))
    sizes = {}
    for transport, request in (("logprobs", ScoreRequest(full_vocab=True)),
                               ("hidden_states", ScoreRequest(hidden_states=True, sampled=False))):
        blob = pickle.dumps(teacher.score([[1, 14, 15, 41, 16, 17, 44]] * n, ids, mask, request))
        (work / f"{transport}.pkl").write_bytes(blob)
        sizes[transport] = len(blob)
    return sizes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rows", type=int, default=1024, help="completion positions per micro-batch (multiple of 32)")
    p.add_argument("--vocab", type=int, default=32000)
    p.add_argument("--student-hidden", type=int, default=256)
    p.add_argument("--teacher-hidden", type=int, default=512)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--work", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    if a.child:
        a.variant = a.child
        print(json.dumps(child(a)))
        return 0
    import torch
    with tempfile.TemporaryDirectory(prefix="bench_transport_") as tmp:
        work = Path(tmp)
        sizes = prepare(a, work)
        rows = []
        for name in VARIANTS:
            out = subprocess.run([sys.executable, __file__, "--child", name, "--work", str(work), "--rows", str(a.rows),
                                  "--vocab", str(a.vocab), "--student-hidden", str(a.student_hidden),
                                  "--teacher-hidden", str(a.teacher_hidden)],
                                 capture_output=True, text=True, env=dict(os.environ, **QUIET_ENV))
            if out.returncode:
                raise SystemExit(f"{name}: exited {out.returncode}\n{out.stderr[-3000:]}")
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
        ref = torch.load(work / f"{next(iter(VARIANTS))}.pt")
        for r in rows:
            got = torch.load(work / f"{r['variant']}.pt")
            r["loss_diff"] = abs(got["value"] - ref["value"])
            r["grad_diff"] = max(float((got[k] - ref[k]).abs().max()) for k in ("g_h", "g_w"))
    logits_mb = a.rows * a.vocab * 4 / 2**20
    print(f"rows {a.rows} (32 x {a.rows // 32}), vocab {a.vocab}, student hidden {a.student_hidden}, teacher hidden "
          f"{a.teacher_hidden}, float32, 1 thread; student logits [{a.rows}, {a.vocab}] = {logits_mb:.0f} MB")
    print(f"transport per step: log-probs {sizes['logprobs'] / 2**20:.1f} MB, hidden states "
          f"{sizes['hidden_states'] / 2**20:.2f} MB (ratio {sizes['hidden_states'] / sizes['logprobs']:.4f})\n")
    print(f"{'variant':<24} {'loss s':>7} {'peak MB':>8} {'x logits':>9} {'teacher head MB':>16} "
          f"{'|d loss|':>9} {'max|d grad|':>12}")
    for r in rows:
        print(f"{r['variant']:<24} {r['loss_s']:>7.3f} {r['peak_mb']:>8.0f} {r['peak_mb'] / logits_mb:>9.2f} "
              f"{r['teacher_head_mb']:>16.0f} {r['loss_diff']:>9.1e} {r['grad_diff']:>12.1e}"
              + ("" if r["method"] == "VmHWM" else " (ru_maxrss)"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
