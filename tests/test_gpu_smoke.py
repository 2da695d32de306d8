"""benchmarks/gpu_smoke.py --cpu-dry-run: the GPU smoke script's code paths (HF rollout, HF teacher,
learner step, vLLM rollout and weight sync through vLLM's CPU build) on a tiny model, so the script
does not rot between the rare sessions that have a GPU."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = ["model", "HF rollout", "HF teacher scoring (top-20)", "learner step", "learner MFU", "vLLM rollout",
        "prompt_logprob_token_ids vs HF", "weight sync (gloo)", "sync check"]


def test_cpu_dry_run_prints_every_row_and_the_sync_check_passes():
    proc = subprocess.run([sys.executable, "benchmarks/gpu_smoke.py", "--cpu-dry-run"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
    header = next(line for line in out.splitlines() if line.startswith("gpu_smoke: torch"))
    assert "vllm 0.32.0" in header and "device CPU" in header, header
    table = out[out.index("\nrow "):]
    lines = table.splitlines()
    for row in ROWS:
        assert any(line.startswith(row + "  ") for line in lines), f"row {row!r} missing:\n{table}"
    assert "sync check: ok" in out, out[-3000:]
    # The CPU build has no Model Runner V2: that row reports its error (or passes), never crashes the run.
    assert any(line.startswith("prompt_logprob_token_ids vs HF") and ("ok" in line or "FAILED" in line)
               for line in lines)
