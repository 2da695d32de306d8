"""LoRA against full fine-tuning: bytes each weight sync sends and the learner's optimizer memory.

    python benchmarks/bench_lora.py                      # the demo's student, r = 8, and a Qwen3-0.6B shape
    python benchmarks/bench_lora.py --model PATH --r 16 --targets q_proj,v_proj

Two tables, LoRA and full fine-tuning side by side with their ratio:

* measured, on the demo's student (runs/demo-student/final when `make demo` has run, else a fresh tiny
  student): a real learner rank (learner.worker.LearnerWorker: DeepSpeed, ZeRO 0, AdamW) takes one step
  on a synthetic batch; then the bytes its sync stream sends into an HF engine over gloo (each sync
  sends the same) and the optimizer's state tensors after the step. Each arm runs in a subprocess of its
  own (DeepSpeed's process groups are per process).
* counted, on a Qwen3-0.6B-shaped model built on the meta device (nothing allocated): bytes per sync in
  bf16 and AdamW's two float32 moments per trained parameter. (Under bf16 DeepSpeed also keeps a float32
  master copy of each trained parameter: 4 more bytes per trained parameter, in both arms.)

JSON lands in runs/bench/lora.json.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
QWEN3_06B = dict(hidden_size=1024, intermediate_size=3072, num_hidden_layers=28, num_attention_heads=16,
                 num_key_value_heads=8, head_dim=128, vocab_size=151936, tie_word_embeddings=True)


def lora_section(r: int, targets: list[str]):
    from omegaconf import OmegaConf
    from launch.config import LoraConfig
    return OmegaConf.to_object(OmegaConf.structured(LoraConfig(r=r, target_modules=targets)))


def measure_arm(model: str, r: int, targets: list[str]) -> dict:
    """One learner rank (r = 0: full fine-tuning) on `model`: one step, then its sync and optimizer state."""
    import torch
    import yaml
    from actors.hf_engine import HFEngine
    from launch.manifest import load_manifest
    from learner.lora import optimizer_state_bytes
    from learner.worker import LearnerWorker
    from opd.contracts import TeacherScores, TrainBatch
    from opd.weight_sync import gloo, open_sender
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        manifest = Path(tmp, "m.yaml")
        manifest.write_text(yaml.safe_dump({
            "run": {"name": "bench", "output_dir": tmp, "steps": 1},
            "model": {"path": model, "lora": {"r": r, "target_modules": targets}},
            "teacher": {"kind": "hf", "path": model}, "loss": {"name": "full_reverse_kl"},
            "rollout": {"prompts_per_step": 8, "samples_per_prompt": 1}, "learner": {"micro_batch_size": 8},
            "data": {"train": manifest.name, "eval": manifest.name}}))  # never read: check_paths=False
        cfg = load_manifest(manifest, check_paths=False)
        worker = LearnerWorker(cfg, 0, 1, rows_per_step=8)
        vocab = worker.engine.module.config.vocab_size
        n, t = 8, 8
        batch = TrainBatch(prompt_ids=[[1, 5, 6, 7]] * n, completion_ids=torch.randint(4, vocab, (n, t)),
                           completion_mask=torch.ones(n, t, dtype=torch.bool),
                           teacher=TeacherScores(sampled_logprobs=torch.zeros(n, t),
                                                 full_logprobs=torch.log_softmax(torch.randn(n, t, vocab), -1)))
        worker.train_step(batch, batch.denominators("token_mean", slice(0, n)))
        stream = worker.weights(torch.float32)
        engine = HFEngine(model)
        sender = open_sender("gloo", stream, [engine], [1], rank=0, address="127.0.0.1")
        sent = []  # what crosses the wire: every buffer the learner (group rank 0) broadcasts in one sync
        broadcast = gloo._broadcast
        gloo._broadcast = lambda group, buffer: (group.rank() == 0 and sent.append(buffer.numel()),
                                                 broadcast(group, buffer))
        try:
            sender.send(1)
        finally:
            gloo._broadcast = broadcast
        sender.shutdown()
        module = worker.engine.module
        return {"arm": f"lora r={r}" if r else "full", "model": model,
                "parameters": sum(p.numel() for name, p in module.named_parameters() if ".lora_" not in name),
                "trained_parameters": sum(p.numel() for p in module.parameters() if p.requires_grad),
                "sync_tensors": len(stream.metadata()), "sync_bytes": sum(sent),
                "optimizer_state_bytes": optimizer_state_bytes(worker.engine.optimizer)}


def count_qwen3(r: int, targets: list[str]) -> list[dict]:
    """Bytes per bf16 sync and AdamW moments for a Qwen3-0.6B shape, full and LoRA (meta device)."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen3Config
    from learner.lora import LoraStudent
    from opd.weight_sync.source import ParamStream
    rows = []
    for rank in (0, r):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(Qwen3Config(**QWEN3_06B), dtype=torch.bfloat16)
        total = model.num_parameters()
        stream = ParamStream(model, torch.bfloat16)
        if rank:
            lora = LoraStudent(model, lora_section(rank, targets))
            stream = ParamStream(model, torch.bfloat16, parts=lora.parts(model, touched_only=True), complete=False)
        trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
        rows.append({"arm": f"lora r={rank}" if rank else "full", "model": "Qwen3-0.6B shape (meta device)",
                     "parameters": total, "trained_parameters": trained, "sync_tensors": len(stream.metadata()),
                     "sync_bytes": sum(m.nbytes for m in stream.metadata()), "optimizer_state_bytes": 2 * 4 * trained})
    return rows


def table(title: str, full: dict, lora: dict, keys: list[tuple[str, str]]) -> str:
    lines = [title, f"{'':28s} {'full':>14s} {lora['arm']:>14s} {'lora/full':>10s}"]
    for key, label in keys:
        a, b = full[key], lora[key]
        fmt = (lambda v: f"{v / 2**20:.2f} MiB") if key.endswith("bytes") else (lambda v: f"{v:,}")
        lines.append(f"{label:28s} {fmt(a):>14s} {fmt(b):>14s} {b / a:>10.4f}")
    return "\n".join(lines)


def default_model() -> str:
    for p in (REPO / "runs/demo-student/final", REPO / "runs/tiny/models/student"):
        if p.exists():
            return str(p)
    from tasks.tiny import write_tiny_models
    return str(write_tiny_models(Path(tempfile.mkdtemp()) / "models", sizes={"student": (128, 4, 4)})["student"])


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default=None, help="HF model folder (default: the demo's student)")
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--targets", default="all-linear", help="comma-separated Linear names, or all-linear")
    p.add_argument("--arm", type=int, default=None, help=argparse.SUPPRESS)  # a subprocess: measure rank r only
    args = p.parse_args()
    targets = args.targets.split(",")
    if args.arm is not None:
        print(json.dumps(measure_arm(args.model, args.arm, targets)))
        return 0
    model = args.model or default_model()
    from opd.env import QUIET_ENV
    env = {**os.environ, **QUIET_ENV, "DS_ACCELERATOR": "cpu"}
    measured = []
    for rank in (0, args.r):
        out = subprocess.run([sys.executable, __file__, "--arm", str(rank), "--model", model, "--targets", args.targets],
                             capture_output=True, text=True, env=env, cwd=REPO)
        if out.returncode:
            print(out.stderr[-3000:], file=sys.stderr)
            return out.returncode
        measured.append(json.loads(out.stdout.strip().splitlines()[-1]))
    counted = count_qwen3(args.r, targets)
    keys = [("trained_parameters", "trained parameters"), ("sync_tensors", "tensors per sync"),
            ("sync_bytes", "bytes per sync"), ("optimizer_state_bytes", "optimizer state")]
    print(table(f"measured: {model} (float32, ZeRO 0, AdamW; targets {args.targets})", *measured,
                keys))
    print()
    print(table(f"counted: Qwen3-0.6B shape, bf16 sync (targets {args.targets})", *counted, keys))
    out_dir = REPO / "runs/bench"
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "lora.json").write_text(json.dumps({"measured": measured, "counted": counted}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
