"""Step time and memory of our local mode against TRL's DistillationTrainer, same models, same settings,
at two shapes.

    python benchmarks/bench_vs_trl.py                          # both shapes, every variant, 2 interleaved rounds
    python benchmarks/bench_vs_trl.py --shapes realistic --repeats 1 --steps 5 --variants defaults,on-policy
    python benchmarks/bench_vs_trl.py --ours teacher.full_vocab_transport=logprobs   # one setting changed in all

In one run: our defaults (what a user gets without asking), our best on-policy settings and our best
one-step-off settings (VARIANTS), and TRL at its best thread setting, each ours/TRL ratio side by side;
then the learner's step FLOP rate against this machine's measured fp32 matmul rate.

Shapes (SHAPES below):
  tiny       the demo's models: student and teacher (hidden 128, 4 layers), a 55-token vocabulary;
             64 sequences x 8 new tokens per step, 20 steps.
  realistic  a 32,000-token vocabulary (the character tokenizer padded with <extra_i> tokens the models
             may sample), random-init Llama student 18.4M parameters (hidden 256, 3 layers), teacher
             43.3M (hidden 512, 4 layers); 32 sequences x 32 new tokens per step, 8 steps.

What runs. The shape's random-init Llama models ("student" and "teacher", tasks.tiny) and the arithmetic
task's prompts are written to a temp dir once. Then, `--repeats` times and for every `--threads`
setting, ours and TRL each run in a fresh subprocess, interleaved (ours, TRL, ours, TRL, ...), so load
from other jobs on the machine hits both alike. Each system is reported at every thread setting and
at its own best one (lowest median step time); the ratio compares the two bests. Peak memory is the
high-water mark of the summed resident memory of the run's whole process tree (ours: driver, Ray's
own processes and every actor; TRL: its one process), sampled every 0.2 s:

  ours  `python -m launch.cli train <manifest>`: local Ray mode, one HF rollout actor, one HF
        teacher actor, one DeepSpeed (ZeRO-0) learner rank; loss.name=full_reverse_kl; no eval
        (data.eval: null, eval.interval: 0); each of VARIANTS in turn (defaults; on-policy; one-step-off
        rollouts overlapping the learner, the teacher ships hidden states, the learner's loss takes the
        output layer chunk by chunk), changed with --ours. Step times come from runs/<name>/metrics.jsonl
        (perf/step_s, which already excludes eval and the final save), stages from time/*_s.
  TRL   `trl.DistillationTrainer` (tested with trl 1.16.0, where it is the stable, always on-policy
        distillation trainer; earlier releases had GKDTrainer / trl.experimental.distillation),
        one process, generation with `model.generate`, teacher forward and the chunked divergence
        in `compute_loss`. Step time is on_step_begin -> on_step_end of a TrainerCallback (the
        generation happens inside training_step, so it is included). Its "rollout" and "teacher"
        columns come from timing `_generate_and_score_completions` and the teacher's
        `_get_last_hidden_state`; "learner" is the rest of the step.

The first `--warmup` (2) steps of every run are dropped; the table pools the remaining steps of
all repeats. tokens/s = completion tokens that carry loss (EOS included, padding excluded), summed
over the measured steps, divided by the summed step time.

Settings matched (both sides get the same numbers):
  * objective: exact full-vocabulary reverse KL(student || teacher) per completion token, averaged
    over the step's completion tokens. TRL: beta=1.0, which in DistillationTrainer (and its
    ChunkedDivergenceFunction) is DEFINED as reverse KL; beta=0 is forward KL, in between the
    generalized JSD with mixture (1-beta) p_student + beta p_teacher. Ours: full_reverse_kl. A
    numerical check of the two on the same logits is printed first (`--skip-loss-check` skips it).
  * on-policy: every completion is sampled by the current student (TRL's DistillationTrainer has
    no lmbda: it is always on-policy, i.e. GKD's lmbda=1.0), one completion per prompt (ours:
    samples_per_prompt=1), temperature 1.0, top_p 1.0, no top-k, stop at EOS or max_new_tokens.
  * batch: `--batch` sequences per optimizer step; ours prompts_per_step=batch, micro_batch=batch
    unless `--micro-batch`; TRL per_device_train_batch_size=micro, gradient_accumulation=batch/micro.
  * prompt: identical token ids, <bos> + "ab+cd=" (7 tokens); TRL gets the text "<bos>ab+cd=",
    which the tokenizer maps to the same ids our PromptFormatter produces (checked in the child).
  * optimiser: AdamW lr 1e-3, betas (0.9, 0.999), eps 1e-8, weight decay 0, constant schedule,
    no warm-up, grad clip 1.0; float32; no gradient checkpointing (TRL's default is on: turned
    off); no bf16 (TRL's default: turned off).
  * threads: `--threads` torch intra-op threads per process (a list; each system's best is compared).
    TRL is one process; ours gives each actor that many threads (cluster.threads_per_actor). Both get
    the same 2 cores (ours cluster.num_cpus=2). With 2 threads on a 2-core box that another job is also
    using, OpenMP oversubscription once made TRL ~40x slower (11 s/step vs 0.27): run it on a quiet box.
    Our actors' OpenMP threads spin briefly before they sleep (opd/env.py: openmp_env), which spares
    ours most of that; TRL runs with libgomp's default unless GOMP_SPINCOUNT is set for both.

Differences that remain (by design of the two systems, not settings):
  * TRL runs everything in one process on one copy of the weights: no weight sync, no IPC. Ours
    pays Ray IPC (prompts, rollouts and the teacher's output through the object store: hidden states
    [B, T, H] with our defaults, the full-vocab log-prob tensor [B, T, V] with
    teacher.full_vocab_transport=logprobs) and a weight sync to the rollout actor every step (with
    rollout.max_lag=1 the learner sends it right behind its step, as soon as the next rollout is done).
  * Rollout: our own KV-cached sampling loop vs HF `generate` (also KV-cached).
  * Learner: ours a DeepSpeed engine (ZeRO-0, torch AdamW) that materialises the student logits;
    TRL accelerate + fused torch AdamW and a chunked divergence kernel (torch fallback on CPU)
    that re-projects hidden states through both LM heads.
  * Ours computes rewards/rollout stats per step (small); TRL logs its completion stats.
  * Different RNG streams, so the sampled completions (and their lengths) differ; lengths are
    reported per system so a length difference is visible.

Results: printed table, plus JSON (and each run's log) under runs/bench/.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from opd.env import CHILD_ENV  # noqa: E402  (after the path above)

ENV = {**CHILD_ENV, "HF_DATASETS_OFFLINE": "1"}  # and TRL's datasets offline
STAGES = ("rollout", "teacher", "learner", "sync")

SHAPES = {
    "tiny": {"sizes": None, "vocab": 0, "batch": 64, "max_new_tokens": 8, "steps": 20},
    "realistic": {"sizes": {"student": (256, 3, 4), "teacher": (512, 4, 8)}, "vocab": 32000, "batch": 32,
                  "max_new_tokens": 32, "steps": 8},
}
# Our variants (manifest overrides on the bench's manifest; --ours adds to each). defaults: nothing set;
# on-policy: the exact settings that overlap work inside a step (pipeline chunks of whole micro-batches,
# the teacher's hidden states); one-step-off: rollout.max_lag 1 (changes the algorithm: docs/benchmarks.md).
VARIANTS = {
    "defaults": [],
    "on-policy": ["teacher.full_vocab_transport=hidden_states", "learner.fused_head=auto", "rollout.pipeline_chunks=4",
                  "learner.micro_batch_size=8"],
    "one-step-off": ["rollout.max_lag=1", "teacher.full_vocab_transport=hidden_states", "learner.fused_head=auto"],
}
OURS_DEFAULTS = VARIANTS["one-step-off"]  # the settings earlier versions of this script ran as "ours"


# ----------------------------------------------------------------------------- helpers

def median(xs):
    xs = sorted(xs)
    n = len(xs)
    return float("nan") if n == 0 else (xs[n // 2] if n % 2 else 0.5 * (xs[n // 2 - 1] + xs[n // 2]))


def percentile(xs, q):
    """Linear interpolation between closest ranks (numpy's default)."""
    xs = sorted(xs)
    if not xs:
        return float("nan")
    pos = (len(xs) - 1) * q / 100
    lo, hi = int(pos), min(int(pos) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def tree_rss(pid: int) -> int:
    """Bytes resident in the process `pid` and all its descendants (0 once it is gone)."""
    import psutil
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return 0
    total = 0
    for p in procs:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total


def run_logged(cmd, log_path: Path, timeout: float, cwd=ROOT) -> tuple[float, int]:
    """Run cmd in its own session with output to log_path; kill its process group on timeout.
    Returns (wall seconds, peak summed RSS of its process tree in bytes)."""
    env = dict(os.environ, **ENV, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    t = time.time()
    peak = 0
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            while proc.poll() is None:
                if time.time() - t > timeout:
                    raise subprocess.TimeoutExpired(cmd, timeout)
                peak = max(peak, tree_rss(proc.pid))
                time.sleep(0.2)
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise RuntimeError(f"{cmd[:4]}... timed out after {timeout:.0f}s; log: {log_path}")
    if rc != 0:
        tail = "".join(open(log_path).readlines()[-30:])
        raise RuntimeError(f"{' '.join(map(str, cmd[:5]))}... exited {rc}; log {log_path}:\n{tail}")
    return time.time() - t, peak


# ----------------------------------------------------------------------------- ours

def write_manifest(path: Path, a, paths: dict, out_dir: Path, name: str) -> None:
    import yaml
    micro = a.micro_batch or a.batch
    manifest = {
        "algorithm": "opd",
        "run": {"name": name, "steps": a.steps, "output_dir": str(out_dir), "seed": a.seed},
        "cluster": {"mode": "local", "num_cpus": a.num_cpus, "threads_per_actor": a.threads},
        "model": {"path": str(paths["student"]), "dtype": "float32"},
        "teacher": {"kind": "hf", "path": str(paths["teacher"])},
        "loss": {"name": "full_reverse_kl"},
        "data": {"train": str(paths["train"]), "eval": None},
        "rollout": {"engine": "hf", "prompts_per_step": a.batch, "samples_per_prompt": 1,
                    "max_new_tokens": a.max_new_tokens, "temperature": 1.0, "top_p": 1.0},
        "learner": {"micro_batch_size": micro, "optimizer": "adamw", "lr": a.lr, "schedule": "constant",
                    "warmup_ratio": 0.0, "weight_decay": 0.0, "betas": [0.9, 0.999], "grad_clip": 1.0,
                    "zero_stage": 0},
        "eval": {"interval": 0},
        "checkpoint": {"interval": 0},
        "logging": {"tensorboard": False, "console": True, "jsonl": True, "wandb": False},
    }
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))


def run_ours(a, paths, work: Path, logs: Path, rep: int) -> dict:
    name = f"bench-ours-{a.variant}-{a.shape}-t{a.threads}-r{rep}"
    manifest = work / f"{name}.yaml"
    write_manifest(manifest, a, paths, work / "runs", name)
    cmd = [sys.executable, "-m", "launch.cli", "train", str(manifest),
           f"run.steps={a.steps}", "eval.interval=0", "logging.tensorboard=false", *a.ours]
    wall, peak = run_logged(cmd, logs / f"{name}.log", a.timeout)
    rows = [json.loads(line) for line in open(work / "runs" / name / "metrics.jsonl")]
    steps = [r for r in rows if "perf/step_s" in r]
    if len(steps) != a.steps:
        raise RuntimeError(f"ours: {len(steps)} step rows in metrics.jsonl, expected {a.steps}")
    kept = [r for r in steps if r["step"] > a.warmup]
    import yaml
    manifest = yaml.safe_load((work / "runs" / name / "manifest.yaml").read_text())
    return {
        "system": "ours", "repeat": rep, "threads_resolved": manifest["cluster"]["threads_per_actor"],
        "transport": manifest["teacher"]["full_vocab_transport"],
        "teacher_head_thread": str(manifest["learner"].get("teacher_head_thread")) == "true",
        "learner_compute_s": [r.get("time/learner_compute_s", float("nan")) for r in kept], "wall_s": wall, "peak_rss_mb": peak / 2**20,
        "step_s": [r["perf/step_s"] for r in kept],
        # perf/tokens_per_s = batch.loss_tokens / step time, so the product is the step's loss tokens
        "tokens": [r["perf/tokens_per_s"] * r["perf/step_s"] for r in kept],
        "stages": {s: [r.get(f"time/{s}_s", 0.0) for r in kept] for s in STAGES},
        "completion_len": [r["rollout/response_length"] for r in kept],
        "warmup_step_s": [r["perf/step_s"] for r in steps if r["step"] <= a.warmup],
    }


# ----------------------------------------------------------------------------- TRL (child process)

def trl_child(a) -> None:
    import torch
    torch.set_num_threads(a.threads)
    import trl
    from datasets import Dataset
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    from launch.batches import PromptFormatter
    paths = json.loads(a.child_paths)
    rows = [json.loads(line) for line in open(paths["train"])]
    tok = AutoTokenizer.from_pretrained(paths["student"], padding_side="left")
    # Same ids as our PromptFormatter (<bos> + prompt): the tokenizer maps the "<bos>" text to the bos id.
    ours_ids = PromptFormatter(tok, "{prompt}", "{prompt}").student(rows[0])
    trl_ids = tok(text=[tok.bos_token + rows[0]["prompt"]])["input_ids"][0]
    assert trl_ids == ours_ids, f"prompt ids differ: TRL {trl_ids} vs ours {ours_ids}"
    dataset = Dataset.from_list([{"prompt": tok.bos_token + r["prompt"]} for r in rows])

    micro = a.micro_batch or a.batch
    record = {"step_s": [], "end_to_end_s": [], "gen_s": [], "teacher_s": [], "tokens": [], "completion_len": []}

    class Timed(DistillationTrainer):
        """Adds timers only; the computation is DistillationTrainer's."""
        def _generate_and_score_completions(self, inputs):
            t = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            self._bench_gen += time.perf_counter() - t
            self._bench_tokens += int(out["num_items_in_batch"].item())
            self._bench_len.append(float(out["completion_mask"].sum(1).float().mean()))
            return out

        def _get_last_hidden_state(self, unwrapped_model, *args, **kwargs):
            t = time.perf_counter()
            out = super()._get_last_hidden_state(unwrapped_model, *args, **kwargs)
            if unwrapped_model is self._bench_teacher:
                self._bench_teacher_s += time.perf_counter() - t
            return out

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t_begin = self.t_end = None

        def on_step_begin(self, args, state, control, **kw):
            tr.__dict__.update(_bench_gen=0.0, _bench_teacher_s=0.0, _bench_tokens=0, _bench_len=[])
            self.t_begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            now = time.perf_counter()
            record["step_s"].append(now - self.t_begin)
            record["end_to_end_s"].append(now - self.t_end if self.t_end is not None else float("nan"))
            self.t_end = now
            record["gen_s"].append(tr._bench_gen)
            record["teacher_s"].append(tr._bench_teacher_s)
            record["tokens"].append(tr._bench_tokens)
            record["completion_len"].append(sum(tr._bench_len) / max(1, len(tr._bench_len)))

    cfg = DistillationConfig(
        output_dir=str(Path(a.child_out).parent / "trl_out"), use_cpu=True, report_to=[], seed=a.seed,
        max_steps=a.steps, per_device_train_batch_size=micro, gradient_accumulation_steps=a.batch // micro,
        max_completion_length=a.max_new_tokens, temperature=1.0, top_p=1.0, top_k=0, beta=1.0,
        learning_rate=a.lr, lr_scheduler_type="constant", warmup_steps=0, weight_decay=0.0,
        adam_beta1=0.9, adam_beta2=0.999, adam_epsilon=1e-8, max_grad_norm=1.0,
        gradient_checkpointing=False, bf16=False, fp16=False,
        logging_strategy="no", save_strategy="no", eval_strategy="no", disable_tqdm=True,
        dataloader_num_workers=0)
    tr = Timed(model=paths["student"], teacher_model=paths["teacher"], args=cfg, train_dataset=dataset,
               processing_class=tok, callbacks=[StepTimer()])
    tr._bench_teacher = tr.accelerator.unwrap_model(tr.teacher_model)
    assert tr.beta == 1.0 and tr.args.gradient_accumulation_steps * micro == a.batch
    t = time.time()
    tr.train()
    record.update(train_s=time.time() - t, trl_version=trl.__version__, trl_class=f"trl.{DistillationTrainer.__name__}",
                  optimizer=type(tr.optimizer.optimizer).__name__, torch_threads=torch.get_num_threads(),
                  student_dtype=str(tr.model.dtype), gradient_checkpointing=tr.args.gradient_checkpointing)
    Path(a.child_out).write_text(json.dumps(record))


def run_trl(a, paths, work: Path, logs: Path, rep: int) -> dict:
    out = work / f"trl-{a.shape}-t{a.threads}-r{rep}.json"
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child-trl", "--child-out", str(out),
           "--child-paths", json.dumps({k: str(v) for k, v in paths.items()}),
           "--steps", str(a.steps), "--batch", str(a.batch), "--max-new-tokens", str(a.max_new_tokens),
           "--threads", str(a.threads), "--lr", str(a.lr), "--seed", str(a.seed),
           "--micro-batch", str(a.micro_batch or a.batch)]
    wall, peak = run_logged(cmd, logs / f"bench-trl-{a.shape}-t{a.threads}-r{rep}.log", a.timeout)
    rec = json.loads(out.read_text())
    if len(rec["step_s"]) != a.steps:
        raise RuntimeError(f"TRL: {len(rec['step_s'])} steps timed, expected {a.steps}")
    keep = slice(a.warmup, None)
    step = rec["step_s"][keep]
    gen, teach = rec["gen_s"][keep], rec["teacher_s"][keep]
    return {
        "system": "trl", "repeat": rep, "wall_s": wall, "peak_rss_mb": peak / 2**20, "step_s": step, "tokens": rec["tokens"][keep],
        "end_to_end_s": rec["end_to_end_s"][keep],
        "stages": {"rollout": gen, "teacher": teach,
                   "learner": [s - g - t for s, g, t in zip(step, gen, teach)], "sync": [0.0] * len(step)},
        "completion_len": rec["completion_len"][keep], "warmup_step_s": rec["step_s"][:a.warmup],
        **{k: rec[k] for k in ("trl_version", "trl_class", "optimizer", "torch_threads", "student_dtype",
                               "gradient_checkpointing")},
    }


# ----------------------------------------------------------------------------- loss check

def loss_check() -> dict:
    """TRL's beta=1.0 divergence vs our full_reverse_kl on the same logits: value and gradient."""
    import torch
    from trl.kernels.chunked_divergence import ChunkedDivergenceFunction

    from losses import LossBatch, build_loss
    torch.manual_seed(0)
    M, H, V = 48, 16, 55
    hs, ht = torch.randn(M, H, dtype=torch.float64), torch.randn(M, H, dtype=torch.float64)
    ws, wt = torch.randn(V, H, dtype=torch.float64), torch.randn(V, H, dtype=torch.float64)
    h1 = hs.clone().requires_grad_()
    per_tok, _ = ChunkedDivergenceFunction.apply(h1, ws, None, ht, wt, None, 1.0, 1.0, 1.0, None, 1.0, None)
    trl_loss = per_tok.sum() / M
    trl_loss.backward()
    h2 = hs.clone().requires_grad_()
    logits = h2 @ ws.T
    batch = LossBatch(tokens=torch.zeros(M, dtype=torch.long), weights=torch.full((M,), 1.0 / M, dtype=torch.float64),
                      teacher_full_logprobs=torch.log_softmax(ht @ wt.T, -1))
    ours_loss, _ = build_loss("full_reverse_kl")(logits, batch)
    ours_loss.backward()
    trl_loss, ours_loss = trl_loss.item(), ours_loss.item()
    return {"trl_loss": trl_loss, "ours_loss": ours_loss, "loss_abs_diff": abs(trl_loss - ours_loss),
            "grad_max_abs_diff": float((h1.grad - h2.grad).abs().max()),
            "grad_max_abs": float(h2.grad.abs().max())}


# ----------------------------------------------------------------------------- main

def summarise(runs: list[dict]) -> dict:
    step = [x for r in runs for x in r["step_s"]]
    tokens = [x for r in runs for x in r["tokens"]]
    return {"median_step_s": median(step), "p90_step_s": percentile(step, 90), "n_steps": len(step),
            "tokens_per_s": sum(tokens) / sum(step), "mean_loss_tokens_per_step": sum(tokens) / len(tokens),
            "mean_completion_len": sum(x for r in runs for x in r["completion_len"]) / len(step),
            "stages_median_s": {s: median([x for r in runs for x in r["stages"][s]]) for s in STAGES},
            "per_repeat_median_step_s": [median(r["step_s"]) for r in runs],
            "peak_rss_mb": max(r["peak_rss_mb"] for r in runs), "wall_s": [r["wall_s"] for r in runs]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--shapes", default="tiny,realistic", help="comma list of SHAPES (default tiny,realistic)")
    p.add_argument("--threads", default="1,2", help="TRL: comma list of torch threads to try (default 1,2)")
    p.add_argument("--ours-threads", default="auto,1",
                   help="ours: comma list of cluster.threads_per_actor values to try (default auto,1: the manifest "
                        "default and one thread an actor)")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of our VARIANTS (default all: {list(VARIANTS)})")
    p.add_argument("--steps", type=int, default=None, help="optimizer steps per run (default: the shape's)")
    p.add_argument("--batch", type=int, default=None, help="sequences per optimizer step (default: the shape's)")
    p.add_argument("--micro-batch", type=int, default=None, help="sequences per forward/backward (default: --batch)")
    p.add_argument("--max-new-tokens", type=int, default=None, help="completion length cap (default: the shape's)")
    p.add_argument("--repeats", type=int, default=2, help="interleaved (ours, TRL) pairs per setting (default 2)")
    p.add_argument("--warmup", type=int, default=2, help="leading steps of each run not timed (default 2)")
    p.add_argument("--ours", action="append", default=[], metavar="KEY=VALUE",
                   help="a manifest override for every one of our runs, after the variant's (repeatable)")
    p.add_argument("--num-cpus", type=int, default=2, help="our cluster.num_cpus (default 2)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=900, help="seconds per run before it is killed")
    p.add_argument("--out-dir", default=str(ROOT / "runs" / "bench"))
    p.add_argument("--skip-loss-check", action="store_true")
    p.add_argument("--child-trl", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    p.add_argument("--child-paths", help=argparse.SUPPRESS)
    a = p.parse_args(argv)
    os.environ.update(ENV)
    if a.child_trl:
        a.threads = int(a.threads)
        trl_child(a)
        return 0
    shapes = a.shapes.split(",")
    for name in shapes:
        if name not in SHAPES:
            p.error(f"--shapes: {name!r} is not one of {sorted(SHAPES)}")
    threads = [int(t) for t in a.threads.split(",")]
    ours_threads = [t if t == "auto" else int(t) for t in a.ours_threads.split(",")]
    variants = a.variants.split(",")
    for v in variants:
        if v not in VARIANTS:
            p.error(f"--variants: {v!r} is not one of {list(VARIANTS)}")

    from trl import DistillationTrainer  # noqa: F401  (fail early if this trl lacks it)

    out_dir = Path(a.out_dir)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    logs = out_dir / "logs" / stamp
    logs.mkdir(parents=True, exist_ok=True)
    check = None if a.skip_loss_check else loss_check()
    if check:
        print(f"loss check (TRL beta=1.0 vs ours full_reverse_kl, same logits): loss {check['trl_loss']:.6f} vs "
              f"{check['ours_loss']:.6f}, max |grad diff| {check['grad_max_abs_diff']:.1e} "
              f"(max |grad| {check['grad_max_abs']:.1e})")
    results, ratios = {"loss_check": check, "variants": {v: VARIANTS[v] + a.ours for v in variants},
                       "matmul_gflops": matmul_rates(sorted({*threads, 1, 2}))}, {}
    for name in shapes:
        work = Path(tempfile.mkdtemp(prefix=f"bench_vs_trl_{name}_"))
        try:
            results[name] = _bench_shape(a, name, threads, ours_threads, variants, logs, work, results["matmul_gflops"])
        finally:
            shutil.rmtree(work, ignore_errors=True)
        ratios[name] = results[name]["ratio_ours_over_trl"]
    for k, v in ratios.items():
        print(f"\n{k}: ours/TRL " + " | ".join(f"{var} {r:.2f}" for var, r in v.items())
              + " (each at its best thread setting; issue 21's targets: on-policy <= 0.6, one step off <= 0.4)")
    path = out_dir / f"bench_vs_trl-{stamp}.json"
    path.write_text(json.dumps(results, indent=2))
    print(f"results: {path}")
    return 0


def _bench_shape(a, shape: str, threads: list[int], ours_threads: list, variants: list[str], logs: Path, work: Path,
                 matmul: dict) -> dict:
    import trl

    from tasks.arithmetic import write_task
    from tasks.tiny import SIZES, write_tiny_models
    from transformers import AutoTokenizer

    from launch.batches import PromptFormatter
    spec = SHAPES[shape]
    base = argparse.Namespace(**{**vars(a), "shape": shape,
                                 **{k: getattr(a, k) if getattr(a, k) is not None else spec[k]
                                    for k in ("steps", "batch", "max_new_tokens")}})
    micro = base.micro_batch or base.batch
    if base.batch % micro or base.steps <= base.warmup:
        raise SystemExit(f"{shape}: --batch {base.batch} must be a multiple of --micro-batch {micro} and --steps "
                         f"{base.steps} must exceed --warmup {base.warmup}")
    sizes = spec["sizes"] or {k: SIZES[k] for k in ("student", "teacher")}
    paths = {**write_tiny_models(work / "models", seed=a.seed, sizes=sizes, vocab_size=spec["vocab"]),
             **write_task(work / "data", seed=a.seed)}
    paths = {k: paths[k] for k in ("student", "teacher", "train")}
    tok = AutoTokenizer.from_pretrained(paths["student"])
    first = json.loads(open(paths["train"]).readline())
    prompt_len = len(PromptFormatter(tok, "{prompt}", "{prompt}").student(first))
    params = {k: _param_count(paths[k]) for k in ("student", "teacher")}
    print(f"\n=== shape {shape}: vocab {len(tok)} | student {params['student'] / 1e6:.1f}M {sizes['student']} "
          f"teacher {params['teacher'] / 1e6:.1f}M {sizes['teacher']} (hidden, layers, heads) | batch {base.batch} "
          f"(micro {micro}) | prompt {prompt_len} tok | max_new_tokens {base.max_new_tokens} | steps {base.steps} "
          f"(first {base.warmup} dropped) x {a.repeats} rounds | TRL threads {threads}, ours {ours_threads} | "
          f"trl {trl.__version__}", flush=True)
    for v in variants:
        print(f"  ours {v}: {' '.join(VARIANTS[v] + a.ours) or '(nothing set)'}", flush=True)

    keys = [("ours", v, t) for v in variants for t in ours_threads] + [("trl", "trl", t) for t in threads]
    runs: dict = {k: [] for k in keys}
    for rep in range(a.repeats):  # interleaved: every configuration once per round
        for system, variant, t in keys:
            fn = run_ours if system == "ours" else run_trl
            ours = VARIANTS.get(variant, []) + a.ours
            r = fn(argparse.Namespace(**{**vars(base), "threads": t, "variant": variant, "ours": ours}), paths, work,
                   logs, rep)
            runs[system, variant, t].append(r)
            print(f"  round {rep + 1}/{a.repeats} {variant:<13} threads {t}"
                  f"{' (' + str(r['threads_resolved']) + ')' if t == 'auto' else ''}: median step "
                  f"{median(r['step_s']):.3f}s (run wall {r['wall_s']:.0f}s, peak RSS {r['peak_rss_mb']:.0f} MB)",
                  flush=True)

    name = lambda v, t: f"{'ours-' + v if v != 'trl' else 'trl'}-t{t}"  # noqa: E731
    s = {name(v, t): summarise(runs[sy, v, t]) for sy, v, t in keys}
    best_key = {v: min((k for k in keys if k[1] == v), key=lambda k: s[name(k[1], k[2])]["median_step_s"])
                for v in [*variants, "trl"]}
    best = {v: name(k[1], k[2]) for v, k in best_key.items()}
    trl_best = s[best["trl"]]["median_step_s"]
    ratios = {v: s[best[v]]["median_step_s"] / trl_best for v in variants}
    flops = learner_flops(paths, base.batch, prompt_len, spec["vocab"] or len(tok))
    lines = [
        f"{'system (threads)':<30} {'median step s':>13} {'p90 s':>8} {'tokens/s':>9} {'tok/step':>9} {'peak RSS MB':>12}",
        *(f"{k + (' *' if k in best.values() else ''):<30} {v['median_step_s']:>13.3f} {v['p90_step_s']:>8.3f} "
          f"{v['tokens_per_s']:>9.0f} {v['mean_loss_tokens_per_step']:>9.1f} {v['peak_rss_mb']:>12.0f}"
          for k, v in s.items()),
        "",
        f"{'median s per stage':<30}" + " ".join(f"{st:>8}" for st in STAGES) + f" {'other':>8}",
        *(f"{k:<30}" + " ".join(f"{v['stages_median_s'][st]:>8.3f}" for st in STAGES)
          + f" {v['median_step_s'] - sum(v['stages_median_s'].values()):>8.3f}" for k, v in s.items()),
        "(TRL's stages: generate / teacher forward / the rest of the step. Ours may overlap stages, so"
        " their sum can exceed the step and 'other' go negative.)",
        "",
        f"{shape}: ours/TRL, each at its best thread setting (* above), against {best['trl']} at {trl_best:.3f} s: "
        + " | ".join(f"{v} {r:.2f}" for v, r in ratios.items()),
    ]
    for v in variants:  # the learner's own step against the machine's matmul rate at the threads it ran with
        rs = runs[best_key[v]]
        compute = median([x for r in rs for x in r["learner_compute_s"]])
        length = sum(x for r in rs for x in r["completion_len"]) / sum(len(r["completion_len"]) for r in rs)
        gflop = flops(length, rs[0]["transport"] == "hidden_states") / 1e9
        t = rs[0]["threads_resolved"]
        peak = matmul.get(t) or matmul.get(str(t)) or float("nan")
        lines.append(f"{shape}: learner step ({v}, {t} thread(s)): {gflop:.1f} GFLOP in {compute:.3f} s = "
                     f"{gflop / compute:.1f} GFLOP/s; this machine's fp32 matmul at {t} thread(s): {peak:.1f} GFLOP/s "
                     f"({100 * gflop / compute / peak:.0f}%; issue 21's target >= 50%)")
        if rs[0].get("teacher_head_thread") and rs[0]["transport"] == "hidden_states":  # its second thread
            both = matmul.get(2 * t) or matmul.get(str(2 * t)) or float("nan")
            lines.append(f"{shape}:   ({v} also ran the teacher's head on a second thread, learner.teacher_head_thread: "
                         f"against the matmul at {2 * t} thread(s), {both:.1f} GFLOP/s: {100 * gflop / compute / both:.0f}%)")
    print("\n".join(lines), flush=True)
    return {"args": {k: v for k, v in vars(base).items() if not k.startswith("child")}, "vocab": len(tok),
            "models": sizes, "params": params, "prompt_tokens": prompt_len, "summary": s, "best": best,
            "ratio_ours_over_trl": ratios, "runs": {name(v, t): runs[sy, v, t] for sy, v, t in keys},
            "logs": str(logs), "table": "\n".join(lines), "trl_version": trl.__version__}


def matmul_rates(threads: list[int], n: int = 2048, repeats: int = 5) -> dict:
    """This machine's fp32 matmul rate (GFLOP/s) at each torch thread count: best of `repeats` [n, n] @ [n, n]."""
    import torch
    before = torch.get_num_threads()
    x, y = torch.randn(n, n), torch.randn(n, n)
    out = {}
    for t in threads:
        torch.set_num_threads(t)
        x @ y  # warm-up
        best = min(_timed(lambda: x @ y) for _ in range(repeats))
        out[t] = 2 * n ** 3 / best / 1e9
    torch.set_num_threads(before)
    print("fp32 matmul " + ", ".join(f"{t} thread(s) {g:.1f} GFLOP/s" for t, g in out.items())
          + f" ([{n}, {n}] @ [{n}, {n}], best of {repeats})", flush=True)
    return out


def _timed(fn) -> float:
    t = time.perf_counter()
    fn()
    return time.perf_counter() - t


def learner_flops(paths: dict, rows: int, prompt_len: int, vocab: int):
    """The learner step's matmul FLOPs as a function of the mean completion length (and whether it applies the
    teacher's output layer to hidden states): forward + backward (6 per parameter per position) of the student's
    body over prompt and completion positions and of its output layer over completion positions, and the
    teacher's head forward (2 per weight) on completion positions. Attention's score matmuls and the loss's
    elementwise work are left out (small at these lengths)."""
    from opd.modeling import model_skeleton
    student, teacher = model_skeleton(str(paths["student"])), model_skeleton(str(paths["teacher"]))
    head = student.get_output_embeddings().weight.numel()
    embed = student.get_input_embeddings().weight.numel()
    body = sum(p.numel() for p in student.parameters()) - embed - (0 if student.config.tie_word_embeddings else head)
    teacher_head = teacher.get_output_embeddings().weight.numel()

    def f(completion_len: float, teacher_head_here: bool) -> float:
        return (6 * body * rows * (prompt_len + completion_len) + 6 * head * rows * completion_len
                + (2 * teacher_head * rows * completion_len if teacher_head_here else 0))
    return f


def _param_count(path) -> int:
    from opd.modeling import model_skeleton
    return sum(p.numel() for p in model_skeleton(path).parameters())


if __name__ == "__main__":
    sys.exit(main())
