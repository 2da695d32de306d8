"""First thing to run on a one-GPU machine: throughput of every stage, and the vLLM paths CPU CI cannot reach.

    python benchmarks/gpu_smoke.py                # one GPU: Qwen3-0.6B-shaped random model, bf16
    python benchmarks/gpu_smoke.py --cpu-dry-run  # tiny model, CPU, float32 (tests/test_gpu_smoke.py)

Two kinds of rows, kept apart. The torch rows need torch and transformers only (no Ray, no DeepSpeed, no
vLLM), so a bare GPU machine runs them as they are; the vLLM rows run where `import vllm` works
(`pip install vllm==0.32.0` on CUDA; vLLM's CPU build in the dry run) and are skipped, saying so, where not.
A random-init Qwen3-0.6B-shaped model (GPU_SHAPE) is saved in HF format with the project's tokenizer
(tasks.tiny.build_tokenizer, 55 ids, fewer than the model's vocabulary: prompts are token ids). One table.
torch rows:
  1. HF rollout tokens/s (actors.hf_engine.HFEngine, temperature 1).
  2. HF teacher scoring tokens/s (teachers.hf_teacher.HFTeacher, ScoreRequest(topk=20)).
  3. Learner step time and MFU without DeepSpeed: opd.modeling.completion_logits, the project's
     topk_reverse_kl_sg loss on a LossBatch from learner.worker.loss_batch, backward, torch AdamW
     (bf16 parameters and optimizer state: no fp32 master copy, unlike DeepSpeed's bf16 mode).
     MFU = 6 * params * tokens per step / step time / bf16 dense peak of the GPU (n/a if unknown).
     "learner cache released": what emptying the allocator's cache after the step hands back
     (LearnerWorker.release_memory, before colocated engines wake).
vLLM rows:
  4. vLLM rollout tokens/s (actors.vllm_engine.VLLMEngine, built with sleep mode on a GPU).
  5. Student-support TopK from a vLLM teacher (teachers.vllm_teacher.VLLMTeacher, ScoreRequest(
     at_student_topk=True), SamplingParams.prompt_logprob_token_ids) against HFTeacher at the same ids,
     where the teacher's engine runs Model Runner V2; else "refused" with the engine's reason (the CPU build).
  6. One weight sync from the learner's model to the engine through opd.weight_sync.open_sender ("ipc" on
     one GPU, with vLLM's worker in its own process: LLMSpec(in_process=False); "gloo" in the dry run).
     GPU_SHAPE's embedding (151,936 x 1,024 bf16, 297 MiB) is larger than the old fixed 256 MiB IPC buffer,
     which vLLM's IPC packer refuses: the row passes only with the buffer sized to the largest tensor.
  7. "sync check": vLLM greedy == HFEngine greedy on the learner's weights. Where the two differ, the
     check still passes if every vLLM token is within a near-tie margin of the HF argmax given its prefix
     (bf16 kernels may flip near-ties in a random model's flat logits).
  8. Sleep/wake around a learner step (colocation; GPU only, the CPU build refuses sleep mode): memory freed
     while the engine sleeps, and its greedy output after waking equal to before.
Exit status 1 if a vLLM row failed ("refused" is not a failure: it is the capability the engine reports).
"""
from __future__ import annotations

import argparse
import atexit
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")

import torch  # noqa: E402

GPU_SHAPE = dict(hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8,
                 head_dim=128, intermediate_size=3072, vocab_size=151936, tie_word_embeddings=True)
# head_dim 32: vLLM's CPU attention minimum. vocab 64 > the tokenizer's 55, and tied, as on the GPU (the CPU
# build's packed lm_head is re-packed after a sync: opd/weight_sync/vllm_native.py:_repack_tied_heads).
CPU_SHAPE = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
                 head_dim=32, intermediate_size=128, vocab_size=64, tie_word_embeddings=True)
# bf16 dense peak FLOP/s; the first entry whose substrings all occur in the device name wins.
PEAKS = [(("H100", "PCIe"), 756e12), (("H100", "HBM3"), 989e12), (("H100", "SXM"), 989e12), (("H200",), 989e12),
         (("A100",), 312e12), (("L40S",), 362e12)]
TOPK = 20


def peak_flops(name: str):
    return next((p for keys, p in PEAKS if all(k in name for k in keys)), None)


def error_line(e: BaseException) -> str:
    return f"{type(e).__name__}: {(str(e).strip().splitlines() or [''])[0]}"[:300]


def timed(fn, repeats: int, warmup: int = 1):
    """(median seconds, last result) of fn() after `warmup` untimed calls; CUDA synchronised around each."""
    sync = torch.cuda.synchronize if torch.cuda.is_available() else (lambda: None)
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        out = fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def write_model(path: str, shape: dict, dtype: torch.dtype) -> tuple[int, int]:
    """A random-init Qwen3 model and the project's tokenizer in HF format: (parameters, tokenizer ids)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM
    from tasks.tiny import build_tokenizer
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = Qwen3Config(**shape, max_position_embeddings=4096, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    model = Qwen3ForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return model.num_parameters(), len(tok)


def greedy_check(model, prompts, got, want, pad_id: int, tie_tol: float) -> str:
    """ok if vLLM's greedy completions equal HF's; else ok only if each vLLM token is within tie_tol of
    the learner's max logit given vLLM's own prefix (a near-tie flipped by kernel rounding)."""
    if got.completions() == want.completions():
        return "ok (greedy equal)"
    from opd.modeling import completion_logits
    with torch.no_grad():
        logits = completion_logits(model, prompts, got.completion_ids, got.completion_mask, pad_id).float().cpu()
    gap = logits.max(-1).values - logits.gather(-1, got.completion_ids[..., None]).squeeze(-1)
    worst = float(gap[got.completion_mask].max())
    return f"{'ok' if worst <= tie_tol else 'FAILED'} (greedy differs; worst logit gap to HF argmax {worst:.3g}, " \
           f"near-tie margin {tie_tol})"


def student_support_row(args, spec, engine, teacher, check, rows, keep: list) -> bool:
    """Row 5: a VLLMTeacher's log-probs at the student's top-k ids (ScoreRequest(at_student_topk=True))
    against HFTeacher's, where the teacher's engine says it can (Model Runner V2); else the refusal and its
    reason (the CPU build). False only if the teacher claimed the capability and its numbers disagree. The
    teacher goes into `keep`: an in-process vLLM engine that is dropped tears down the parallel state the
    other in-process engine of this process still uses."""
    from dataclasses import replace
    from opd.contracts import SamplingSpec, ScoreRequest
    from teachers.vllm_teacher import VLLMTeacher
    name = "vLLM teacher student-support TopK vs HF"
    try:
        vteacher = VLLMTeacher(replace(spec, sync_backend=None, gpu_memory_utilization=0.15))
        keep.append(vteacher)
        r = engine.generate(check, SamplingSpec(max_new_tokens=8, return_topk=8, seed=1))
        if not vteacher.capabilities.logprobs_at_any_ids:
            rows.append((name, "refused", vteacher.capabilities.limits))
            return True
        m = r.completion_mask
        got = vteacher.score(check, r.completion_ids, m, ScoreRequest(at_student_topk=True), r.student_topk_ids)
        ref = teacher.score(check, r.completion_ids, m, ScoreRequest(at_student_topk=True), r.student_topk_ids)
        worst = float((got.at_student_topk - ref.at_student_topk)[m].abs().max())
        baseline = float((got.sampled_logprobs - ref.sampled_logprobs)[m].abs().max())
        tol = max(args.tol, 2 * baseline)
        rows.append((name, f"{'ok' if worst <= tol else 'FAILED'} max|diff| {worst:.3g}",
                     f"sampled-token log-probs vLLM vs HF teacher differ by {baseline:.3g}"))
        return worst <= tol
    except Exception as e:  # noqa: BLE001 - the table still prints
        rows.append((name, "FAILED", error_line(e)))
        return False


def sleep_wake_row(engine, learner_step, check, rows) -> bool:
    """Row 8 (colocation, GPU only): the engine sleeps, the learner steps and hands back its cached blocks
    (LearnerWorker.release_memory), the engine wakes; device memory freed while asleep, and greedy output
    after waking equal to before sleeping (no sync in between: level 1 offloads the weights and restores them)."""
    from opd.contracts import SamplingSpec
    greedy = SamplingSpec(max_new_tokens=8, temperature=0.0, behaviour_logprobs=False)
    try:
        before = engine.generate(check, greedy).completions()
        awake = torch.cuda.mem_get_info()[0]
        engine.sleep()
        asleep = torch.cuda.mem_get_info()[0]
        learner_step()
        torch.cuda.empty_cache()
        engine.wake_up()
        same = engine.generate(check, greedy).completions() == before
        rows.append(("sleep/wake around a learner step", "ok" if same and asleep > awake else "FAILED",
                     f"{(asleep - awake) / 2**30:.2f} GiB freed asleep; greedy after waking equal: {same}"))
        return same and asleep > awake
    except Exception as e:  # noqa: BLE001
        rows.append(("sleep/wake around a learner step", "FAILED", error_line(e)))
        return False


def vllm_rows(args, path, dtype_name, prompts, sampling, model, hf, teacher, learner_step, rows) -> bool:
    """Rows 4-8 (see the docstring). Returns False if a row failed."""
    from actors.vllm_engine import VLLMEngine
    from opd.contracts import SamplingSpec
    from opd.modeling import DTYPES, load_named_tensors
    from opd.vllm_llm import LLMSpec
    from opd.weight_sync import open_sender
    from opd.weight_sync.source import ParamStream
    from opd.weight_sync.vllm_native import WIRE_BUFFER_BYTES
    dry = args.cpu_dry_run
    backend = "gloo" if dry else "ipc"
    spec = LLMSpec(model=path, dtype=dtype_name, max_model_len=args.prompt_len + args.new_tokens + 64,
                   gpu_memory_utilization=0.35, kv_cache_memory_gb=0.0625 if dry else None, enforce_eager=dry,
                   sync_backend=backend, in_process=dry,  # ipc: vLLM's worker must not be the sender's process
                   sleep_mode=not dry)  # the CPU build refuses sleep mode
    try:
        engine = VLLMEngine(spec, sampling, hf.pad_id)
        secs, r = timed(lambda: engine.generate(prompts, sampling), args.repeats)
        rows.append(("vLLM rollout", f"{int(r.completion_mask.sum()) / secs:,.0f} tok/s", f"{len(prompts)} prompts"))
    except Exception as e:  # noqa: BLE001 - the table still prints
        rows.append(("vLLM rollout", "FAILED", error_line(e)))
        return False

    check = prompts[:4]
    keep: list = []
    ok = student_support_row(args, spec, engine, teacher, check, rows, keep)  # before the sync: both hold the saved weights

    greedy = SamplingSpec(max_new_tokens=8, temperature=0.0, behaviour_logprobs=False)
    try:
        before = engine.generate(check, greedy).completions()  # fills the prefix cache: a stale one would show
        with torch.no_grad():  # move the learner far from the saved weights, so a sync that moved nothing shows
            gen = torch.Generator(model.device).manual_seed(1)
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen, device=p.device, dtype=p.dtype) * 0.05)
        stream = ParamStream(model, DTYPES[dtype_name])
        largest = max(m.nbytes for m in stream.metadata())
        sender = open_sender(backend, stream, [engine], [engine.weight_sync_workers()],
                             rank=0, address="127.0.0.1")
        secs, _ = timed(lambda: sender.send(1), repeats=1, warmup=0)
        gb = sum(p.numel() for p in model.parameters()) * DTYPES[dtype_name].itemsize / 1e9
        rows.append((f"weight sync ({backend})", f"{secs:.3f} s", f"{gb:.3g} GB, {gb / secs:.3g} GB/s, first send; "
                     f"largest tensor {largest / 2**20:.0f} MiB (floor of the packed buffer {WIRE_BUFFER_BYTES >> 20} MiB)"))
        got = engine.generate(check, greedy)
        load_named_tensors(hf.model, model.named_parameters())  # the HF engine now holds the learner's weights
        verdict = greedy_check(model, check, got, hf.generate(check, greedy), hf.pad_id, args.tie_tol)
        verdict += f"; engine version {got.weight_version}; greedy changed by the sync: {got.completions() != before}"
        sender.shutdown()
    except Exception as e:  # noqa: BLE001
        verdict = f"FAILED ({error_line(e)})"
    print(f"sync check: {verdict}")
    rows.append(("sync check", verdict.split(" ")[0], verdict.partition(" ")[2]))
    ok = verdict.startswith("ok") and ok
    if dry:
        rows.append(("sleep/wake around a learner step", "n/a", "vLLM's CPU build refuses sleep mode"))
    else:
        ok = sleep_wake_row(engine, learner_step, check, rows) and ok
    return ok


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cpu-dry-run", action="store_true", help="tiny model on CPU in float32 (keeps the script alive)")
    ap.add_argument("--prompts", type=int)
    ap.add_argument("--prompt-len", type=int)
    ap.add_argument("--new-tokens", type=int)
    ap.add_argument("--learner-rows", type=int, help="rollout rows per learner step")
    ap.add_argument("--steps", type=int, help="timed learner steps (after 2 warm-up steps)")
    ap.add_argument("--repeats", type=int, default=2, help="timed rollout / scoring runs (after one warm-up)")
    args = ap.parse_args()
    dry = args.cpu_dry_run
    for name, gpu, cpu in [("prompts", 64, 4), ("prompt_len", 64, 6), ("new_tokens", 128, 8),
                           ("learner_rows", 32, 4), ("steps", 5, 2)]:
        if getattr(args, name) is None:
            setattr(args, name, cpu if dry else gpu)
    args.tol, args.tie_tol = (1e-3, 1e-3) if dry else (0.1, 0.1)
    if not dry and not torch.cuda.is_available():
        print("gpu_smoke: no CUDA device visible; on a CPU machine run with --cpu-dry-run")
        return 2
    import transformers
    try:
        import vllm
        vllm_version, vllm_error = vllm.__version__, None
    except Exception as e:  # noqa: BLE001 - a broken install skips the vLLM rows, like a missing one
        vllm_version, vllm_error = "not importable", error_line(e)
    device = torch.device("cpu") if dry else torch.device("cuda", 0)
    gpu_name = "CPU" if dry else torch.cuda.get_device_name(0)
    print(f"gpu_smoke: torch {torch.__version__}, transformers {transformers.__version__}, vllm {vllm_version}, "
          f"device {gpu_name}{' (CPU dry run)' if dry else ''}", flush=True)

    from actors.hf_engine import HFEngine
    from learner.worker import loss_batch
    from losses import build_loss
    from opd.contracts import SamplingSpec, ScoreRequest, TrainBatch
    from opd.modeling import completion_logits, load_model
    from teachers.hf_teacher import HFTeacher

    dtype_name = "float32" if dry else "bfloat16"
    path = tempfile.mkdtemp(prefix="gpu_smoke_")
    atexit.register(shutil.rmtree, path, True)
    n_params, n_ids = write_model(path, CPU_SHAPE if dry else GPU_SHAPE, getattr(torch, dtype_name))
    gen = torch.Generator().manual_seed(0)
    prompts = torch.randint(4, n_ids, (args.prompts, args.prompt_len), generator=gen).tolist()  # no specials
    sampling = SamplingSpec(max_new_tokens=args.new_tokens, temperature=1.0, seed=0)
    rows = [("model", f"{n_params / 1e6:,.1f} M params", f"{dtype_name}, {args.prompts} prompts x "
             f"{args.prompt_len} tokens, {args.new_tokens} new")]

    hf = HFEngine(path, dtype=dtype_name, use_gpu=not dry)
    secs, rollout = timed(lambda: hf.generate(prompts, sampling), args.repeats)
    rows.append(("HF rollout", f"{int(rollout.completion_mask.sum()) / secs:,.0f} tok/s", f"median of {args.repeats}"))

    teacher = HFTeacher(path, dtype=dtype_name, use_gpu=not dry)
    request = ScoreRequest(topk=TOPK)
    secs, scores = timed(lambda: teacher.score(prompts, rollout.completion_ids, rollout.completion_mask, request),
                         args.repeats)
    rows.append((f"HF teacher scoring (top-{TOPK})", f"{int(rollout.completion_mask.sum()) / secs:,.0f} tok/s",
                 "completion tokens scored"))

    model, _ = load_model(path, dtype_name, device)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)  # large enough that the sync visibly moves the engine
    loss_fn = build_loss("topk_reverse_kl_sg", {"k": TOPK, "support": "teacher"})
    batch = TrainBatch(prompt_ids=rollout.prompt_ids, completion_ids=rollout.completion_ids,
                       completion_mask=rollout.completion_mask, behaviour_logprobs=rollout.behaviour_logprobs,
                       teacher=scores).select(list(range(min(args.learner_rows, args.prompts))))
    lb = loss_batch(batch, batch.token_counts, device)
    tokens = sum(map(len, batch.prompt_ids)) + batch.loss_tokens

    def step():
        logits = completion_logits(model, batch.prompt_ids, batch.completion_ids, batch.completion_mask, hf.pad_id)
        loss, _ = loss_fn(logits.reshape(-1, logits.shape[-1]), lb)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        return float(loss.detach())

    if not dry:
        torch.cuda.reset_peak_memory_stats()
    secs, loss = timed(step, args.steps, warmup=2)
    peak = peak_flops(gpu_name)
    mem = "" if dry else f", peak {torch.cuda.max_memory_allocated() / 2**30:.1f} GiB"
    rows.append(("learner step", f"{secs:.3f} s", f"{len(batch)} rows, {tokens} tokens, loss {loss:.3g}{mem}"))
    rows.append(("learner MFU", "n/a" if peak is None else f"{6 * n_params * tokens / secs / peak:.1%}",
                 f"6 * params * tokens / step / {'unknown peak' if peak is None else f'{peak / 1e12:.0f} TFLOP/s'}"))
    if dry:
        rows.append(("learner cache released", "n/a", "CPU: no caching allocator"))
    else:  # what LearnerWorker.release_memory hands colocated engines before they wake
        reserved = torch.cuda.memory_reserved()
        torch.cuda.empty_cache()
        rows.append(("learner cache released", f"{(reserved - torch.cuda.memory_reserved()) / 2**30:.2f} GiB",
                     f"reserved {reserved / 2**30:.2f} -> {torch.cuda.memory_reserved() / 2**30:.2f} GiB after the step"))

    ok = True
    if vllm_error is not None:
        print(f"vLLM rows skipped: vllm is not importable ({vllm_error})")
        rows.append(("vLLM rows", "skipped", f"vllm not importable: {vllm_error}"))
    else:
        if not dry:
            torch.cuda.empty_cache()  # vLLM sizes its KV cache from the GPU memory left free
        ok = vllm_rows(args, path, dtype_name, prompts, sampling, model, hf, teacher, step, rows)

    width = max(len(r[0]) for r in rows)
    vwidth = max(len(r[1]) for r in rows)
    print(f"\n{'row':<{width}}  {'value':<{vwidth}}  note")
    for name, value, note in rows:
        print(f"{name:<{width}}  {value:<{vwidth}}  {note}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
