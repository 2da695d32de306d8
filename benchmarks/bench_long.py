"""Long responses at Qwen3's 151,936-row vocabulary: teacher scoring and one learner step at completion
lengths 1k, 2k, 4k and 8k for a fixed token budget, and one learner step over a long-tailed length mix,
before (today's layout) and after (token budgets).

    python benchmarks/bench_long.py                       # the four lengths and the mix (~10 min, 2 cores)
    python benchmarks/bench_long.py --lengths 1024 8192   # fewer points

Models: the tiny Qwen3 family's student-151936 and teacher-151936 (tasks/tiny_qwen3.py: hidden 64, 2 and
4 layers, 151,936 rows), written to a temporary folder, float32. Each row: a 64-token prompt and a
completion of random ids. At a length L the step holds budget / L rows (budget 8,192 completion tokens).

  teacher   HFTeacher.score with the sampled-token request (log q(y), rank, entropy: what
            sampled_token_rkl reads). before: today's layout, reproduced here: 64 rows a forward, the
            model's [rows, T, V] logits and their float32 / temperature copy. after: rows grouped to
            teacher.max_tokens_per_batch (budget + prompts), the head over position chunks.
  learner   one LearnerWorker.train_step (DeepSpeed, in-process, SGD lr 1, no clipping: the weight change
            is the gradient), loss sampled_token_rkl from the fused head. before: learner.micro_batch_size
            rows, padded to the step's longest row. after: learner.max_tokens_per_micro_batch = the
            teacher's budget and learner.gradient_checkpointing.
  mix       16 rows of long-tailed lengths (many short, a few near the 2,048 cap), before with micro-batches
            of 4 rows (so 4 x 2,048-position micro-batches), after grouped to the same token budget. Same
            loss and gradient (max abs difference of the weight change) checked.

Each measurement runs in a fresh subprocess; peak is that process's resident-set high-water mark (VmHWM;
torch.cuda.max_memory_allocated where CUDA runs it) after the step, time is the step alone, padding is
the fraction of completion positions computed that are padding. A "before" teacher whose [rows, T, V]
logits would not fit the memory this machine has free (or with --no-before-teacher) is not run; the size
of those logits is printed instead.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

PROMPT = 64
V = 151936


def _peak_mb() -> float:
    import torch
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024


def _rows(lengths: list[int], seed: int = 0):
    """(prompts, completion ids [N, T], mask [N, T]) of random tokens, right-padded."""
    import torch
    g = torch.Generator().manual_seed(seed)
    T = max(lengths)
    prompts = [torch.randint(10, 1000, (PROMPT,), generator=g).tolist() for _ in lengths]
    ids = torch.randint(10, 151_000, (len(lengths), T), generator=g)
    mask = torch.arange(T)[None, :] < torch.tensor(lengths)[:, None]
    return prompts, ids.masked_fill(~mask, 0), mask


def teacher_child(a) -> dict:
    import torch

    from opd.contracts import ScoreRequest
    from opd.modeling import completion_logits
    from teachers.hf_teacher import HFTeacher, token_stats
    torch.set_num_threads(a.threads)
    t = HFTeacher(a.teacher, max_tokens_per_batch=a.teacher_budget)
    prompts, ids, mask = _rows(json.loads(a.lengths))
    request = ScoreRequest()
    t0 = time.perf_counter()
    with torch.no_grad():
        if a.mode == "after":
            s = t.score(prompts, ids, mask, request)
            sampled = s.sampled_logprobs
        else:  # today's HFTeacher._score on the logits path, 64 rows a forward
            parts = []
            for r in range(0, len(prompts), 64):
                logits = completion_logits(t.model, prompts[r:r + 64], ids[r:r + 64], mask[r:r + 64], t.pad_id)
                z = logits.float() / request.temperature
                del logits
                parts.append(token_stats(z, ids[r:r + 64])[0].masked_fill(~mask[r:r + 64], 0))
                del z
            sampled = torch.cat(parts)
    secs = time.perf_counter() - t0
    return {"peak_mb": _peak_mb(), "seconds": secs, "padding": 1 - float(mask.float().mean()),
            "check": float(sampled.sum())}


def learner_child(a) -> dict:
    import torch

    from launch.manifest import load_manifest
    from learner.worker import LearnerWorker
    from opd.contracts import TeacherScores, TrainBatch
    lengths = json.loads(a.lengths)
    over = [f"model.path={a.student}", f"teacher.path={a.teacher}", "loss.name=sampled_token_rkl",
            f"rollout.prompts_per_step={len(lengths)}", "rollout.samples_per_prompt=1",
            f"rollout.max_new_tokens={max(lengths)}", "learner.optimizer=sgd", "learner.lr=1.0",
            "learner.grad_clip=0", "learner.warmup_ratio=0", "learner.schedule=constant",
            f"cluster.threads_per_actor={a.threads}"]
    if a.mode == "after":
        over += [f"learner.max_tokens_per_micro_batch={a.learner_budget}", "learner.gradient_checkpointing=true"]
    else:
        over += [f"learner.micro_batch_size={a.micro}"]
    cfg = load_manifest(Path(a.work, "manifest.yaml"), over, check_paths=False)
    w = LearnerWorker(cfg, 0, 1, rows_per_step=len(lengths))
    prompts, ids, mask = _rows(lengths)
    g = torch.Generator().manual_seed(1)
    noise = lambda: (-3 * torch.rand(ids.shape, generator=g)).masked_fill(~mask, 0)  # noqa: E731
    batch = TrainBatch(prompt_ids=prompts, completion_ids=ids, completion_mask=mask, behaviour_logprobs=noise(),
                       teacher=TeacherScores(sampled_logprobs=noise()))
    before = [p.detach().clone() for p in w.engine.module.parameters()]
    metrics = w.train_step(batch, batch.token_counts)
    out = {"peak_mb": _peak_mb(), "seconds": metrics["compute_s"], "padding": metrics["padding_fraction"],
           "loss": metrics["loss"]}
    if a.save_grad:
        grad = torch.cat([(b - p.detach()).flatten() for b, p in zip(before, w.engine.module.parameters())])
        torch.save(grad, a.save_grad)
    return out


def run_child(args: list[str], env_threads: int) -> dict:
    from opd.env import CHILD_ENV
    env = dict(os.environ, **CHILD_ENV, OMP_NUM_THREADS=str(env_threads),
               DS_ACCELERATOR=os.environ.get("DS_ACCELERATOR", "cpu"))
    p = subprocess.run([sys.executable, __file__, *args], capture_output=True, text=True, env=env)
    if p.returncode:
        raise RuntimeError(f"child {args[:4]} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def mem_available_mb() -> float:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:")) / 1024


def long_tail(n: int, cap: int, seed: int = 0) -> list[int]:
    """Thinking-trace-like lengths: log-normal, many short, a few at the cap."""
    rng = random.Random(seed)
    out = [min(cap, max(32, int(rng.lognormvariate(5.6, 0.9)))) for _ in range(n - 2)] + [cap, cap - 100]
    rng.shuffle(out)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[1024, 2048, 4096, 8192])
    p.add_argument("--budget", type=int, default=8192, help="completion tokens per step")
    p.add_argument("--threads", type=int, default=1, help="torch threads a child (2 on a shared 2-core machine oversubscribes it)")
    p.add_argument("--mix-rows", type=int, default=16)
    p.add_argument("--mix-cap", type=int, default=2048)
    p.add_argument("--mix-micro", type=int, default=4, help="rows per micro-batch before")
    p.add_argument("--no-before-teacher", dest="before_teacher", action="store_false",
                   help="print today's teacher logits size instead of running it (it is the slowest and largest)")
    p.add_argument("--no-before-learner", dest="before_learner", action="store_false",
                   help="skip today's learner at equal lengths (the mix still runs both)")
    p.add_argument("--child", choices=["teacher", "learner"])
    for k in ("mode", "lengths-json", "work", "student", "teacher", "save-grad"):
        p.add_argument(f"--{k}")
    for k in ("teacher-budget", "learner-budget", "micro"):
        p.add_argument(f"--{k}", type=int, default=0)
    a = p.parse_args()
    if a.child:
        a.lengths = a.lengths_json
        print(json.dumps(teacher_child(a) if a.child == "teacher" else learner_child(a)))
        return

    from tasks.tiny_qwen3 import QWEN3_ROWS, SMOKE_SIZES, build_tokenizer, write_model
    work = Path(tempfile.mkdtemp(prefix="bench-long-"))
    tok = build_tokenizer(0)
    student = write_model(work / "student", tok, SMOKE_SIZES["student"], QWEN3_ROWS, 0)
    teacher = write_model(work / "teacher", tok, SMOKE_SIZES["teacher"], QWEN3_ROWS, 1)
    (work / "manifest.yaml").write_text("algorithm: opd\nteacher: {kind: hf}\nrun: {name: bench-long, steps: 1}\n"
                                        "data: {train: none.jsonl}\neval: {interval: 0}\n")
    budget = a.budget + PROMPT * (a.budget // min(a.lengths))  # padded tokens a forward: completions + prompts
    common = ["--work", str(work), "--student", str(student), "--teacher", str(teacher),
              "--teacher-budget", str(budget), "--learner-budget", str(budget)]
    print(f"tiny Qwen3 at V = {QWEN3_ROWS}, float32, {a.threads} threads; {a.budget} completion tokens a step "
          f"(+ {PROMPT}-token prompts); token budgets {budget}; load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'':8} {'length':>6} {'rows':>4} | {'before peak MB':>14} {'s':>6} {'pad':>5} | "
          f"{'after peak MB':>13} {'s':>6} {'pad':>5}")
    res: dict = {}
    for who in ("teacher", "learner"):
        for L in a.lengths:
            rows = max(1, a.budget // L)
            lengths = json.dumps([L] * rows)
            row = {}
            for mode in ("before", "after"):
                est = rows * L * V * 4 * 2 / 2**20  # today's logits and their float32 copy
                if who == "teacher" and mode == "before" and (not a.before_teacher or est + 1500 > 0.8 * mem_available_mb()):
                    row[mode] = {"skipped": f"needs ~{est / 1024:.1f} GB of logits"}
                    continue
                if who == "learner" and mode == "before" and not a.before_learner:
                    row[mode] = {"skipped": "not run"}
                    continue
                row[mode] = run_child(["--child", who, "--mode", mode, "--lengths-json", lengths, "--micro", str(rows),
                                       *common], a.threads)
            res[(who, L)] = row
            cells = []
            for mode in ("before", "after"):
                r = row[mode]
                cells.append(f"{r['skipped']:>27}" if "skipped" in r else
                             f"{r['peak_mb']:>14.0f} {r['seconds']:>6.1f} {r['padding']:>5.2f}")
            print(f"{who:8} {L:>6} {rows:>4} | {cells[0]} | {cells[1]}", flush=True)

    mix = long_tail(a.mix_rows, a.mix_cap)
    print(f"mix: {len(mix)} rows, lengths {sorted(mix)} ({sum(mix)} tokens)")
    out = {}
    for mode in ("before", "after"):
        out[mode] = run_child(["--child", "learner", "--mode", mode, "--lengths-json", json.dumps(mix),
                               "--micro", str(a.mix_micro), "--save-grad", str(work / f"grad-{mode}.pt"), *common],
                              a.threads)
        r = out[mode]
        print(f"mix      {mode:>6}: peak {r['peak_mb']:.0f} MB, step {r['seconds']:.1f} s, padding {r['padding']:.2f}, "
              f"loss {r['loss']:.6f}", flush=True)
    import torch
    g0, g1 = torch.load(work / "grad-before.pt"), torch.load(work / "grad-after.pt")
    diff = float((g0 - g1).abs().max())
    print(f"mix: same loss to {abs(out['before']['loss'] - out['after']['loss']):.1e}, gradient max |diff| {diff:.1e} "
          f"(max |gradient| {float(g0.abs().max()):.1e})")

    lo, hi = min(a.lengths), max(a.lengths)
    ratio = lambda who: res[(who, hi)]["after"]["peak_mb"] / res[(who, lo)]["after"]["peak_mb"]  # noqa: E731
    speed = out["before"]["seconds"] / out["after"]["seconds"]
    k = lambda n: f"{n // 1024}k" if n % 1024 == 0 else str(n)  # noqa: E731
    print(f"long responses: teacher peak {k(hi)}/{k(lo)} {ratio('teacher'):.2f}, learner peak "
          f"{k(hi)}/{k(lo)} {ratio('learner'):.2f}, mixed-length step padded/grouped {speed:.2f}")


if __name__ == "__main__":
    main()
