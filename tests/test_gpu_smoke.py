"""benchmarks/gpu_smoke.py --cpu-dry-run: the GPU smoke script's code paths (HF rollout, HF teacher,
learner step, vLLM rollout and weight sync through vLLM's CPU build) on a tiny model, so the script
does not rot between the rare sessions that have a GPU."""
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ROWS = ["model", "HF rollout", "HF teacher scoring (top-20)", "learner step", "learner MFU", "learner cache released",
        "vLLM rollout", "vLLM teacher student-support TopK vs HF", "weight sync (gloo)", "sync check",
        "sleep/wake around a learner step"]


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
    # The CPU build has no Model Runner V2: the vLLM teacher built there says so, and the row reports it.
    assert any(line.startswith("vLLM teacher student-support TopK vs HF  refused") and "Model Runner V1" in line
               for line in lines), table
