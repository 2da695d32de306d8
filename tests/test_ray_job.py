"""`ray job submit` of a paper arm, shrunk to the tiny Qwen3 family, to a token-authenticated Ray head
(docs/cluster.md, for real).

What it proves, with Ray's own CLI on one machine:
- a head started by `ray start --head ... --block` with RAY_AUTH_MODE=token and the token made by
  `ray get-auth-token --generate` (read through RAY_AUTH_TOKEN_PATH) accepts a submitter that has
  RAY_AUTH_MODE=token and the same token, and refuses one without the token (HTTP 401) or with a
  wrong one (HTTP 403);
- `ray job submit --working-dir <repo> -- python -m launch.cli train <manifest> cluster.mode=ray`
  runs the project from the uploaded working dir, joins the cluster (ray.init(address="auto")
  inside the job, authenticated by the env the job inherits from the head), trains 2 steps of
  configs/paper/topk_t2_k1.yaml under configs/paper/cpu.yaml (vLLM's CPU build for the rollouts and the
  teacher; tests/test_paper_cpu.py runs every other arm locally) and writes its run folder.
One head serves both tests (module scope).
Ray 2.60: the head and the job inherit the environment of `ray start` (PATH included, so `python`
in the entrypoint is the one of the env where `ray start` ran); the submitter sends the token
only when its own RAY_AUTH_MODE is `token` (ray/_private/authentication/http_token_authentication.py).
"""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from launch.manifest import load_manifest, to_yaml
from opd.weight_sync import free_port
from test_paper_cpu import JOB_ARM, check_run, layers, workdir  # noqa: F401  (workdir: the arms' fixture)

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent          # the venv's bin: ray, python
RAY = str(BIN / "ray")


def _clean_env(**extra) -> dict[str, str]:
    """This process's env without any Ray auth/address settings, plus `extra`."""
    drop = ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_ADDRESS", "RAY_API_SERVER_ADDRESS")
    env = {k: v for k, v in os.environ.items() if k not in drop}
    env["PATH"] = f"{BIN}{os.pathsep}{env.get('PATH', '')}"   # as if the venv were activated
    return {**env, **extra}


@pytest.fixture(scope="module")
def head(tmp_path_factory):
    """A token-authenticated Ray head with 4 CPUs; yields (dashboard URL, env of an authorised client)."""
    tmp = tmp_path_factory.mktemp("rayjob")
    # `ray get-auth-token --generate` writes $HOME/.ray/auth_token; a scratch HOME keeps the real ~/.ray untouched.
    gen = subprocess.run([RAY, "get-auth-token", "--generate"], env=_clean_env(HOME=str(tmp / "home")),
                         capture_output=True, text=True, timeout=120)
    token_file = tmp / "home" / ".ray" / "auth_token"
    assert gen.returncode == 0 and token_file.read_text() == gen.stdout, gen.stderr
    auth = _clean_env(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN_PATH=str(token_file))
    # Ray's session sockets live under --temp-dir, and an AF_UNIX path may not exceed 107 bytes: pytest's
    # tmp path grows with its run counter (pytest-of-root/pytest-122/...) and once pushed the dashboard's
    # socket path past that, so Ray gets a short directory of its own.
    ray_tmp = tempfile.mkdtemp(prefix="opd-ray-", dir="/tmp")
    log, proc = open(tmp / "head.log", "w"), None
    try:
        for _ in range(3):  # `ray start` takes the ports it is given: one taken since free_port() chose it (by
            port, dash = free_port(), free_port()  # another test worker's processes) ends the head: start again
            cmd = [RAY, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={port}", "--dashboard-host=127.0.0.1",
                   f"--dashboard-port={dash}", "--include-dashboard=true", f"--ray-client-server-port={free_port()}",
                   f"--dashboard-agent-listen-port={free_port()}", "--num-cpus=4", "--num-gpus=0",
                   f"--temp-dir={ray_tmp}", "--disable-usage-stats", "--block"]
            proc = subprocess.Popen(cmd, env=auth, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
            url = f"http://127.0.0.1:{dash}"
            if _answers(url, proc, deadline=time.time() + 180):
                break
        assert proc.poll() is None, (tmp / "head.log").read_text()
        yield url, auth
    finally:
        if proc is not None and proc.poll() is None:
            proc.send_signal(signal.SIGTERM)   # `ray start --block` drains the node and stops what it started
            try:
                proc.wait(timeout=90)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        log.close()
        shutil.rmtree(ray_tmp, ignore_errors=True)


def _answers(url: str, proc, deadline: float) -> bool:
    """True once the job server answers at all (401 without a token); False if the head exits first."""
    while proc.poll() is None:
        try:
            urllib.request.urlopen(f"{url}/api/version", timeout=5)
            return True
        except urllib.error.HTTPError:
            return True
        except OSError:
            assert time.time() < deadline, "the Ray head did not answer within 180 s"
            time.sleep(1)
    return False


def _submit(url: str, env: dict, *entrypoint: str, working_dir: bool = False, timeout: int = 60):
    cmd = [RAY, "job", "submit", "--address", url, *(["--working-dir", str(REPO)] if working_dir else []),
           "--", *entrypoint]
    return subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)


def test_submitter_without_the_token_is_refused(head, tmp_path):
    url, _ = head
    # no RAY_AUTH_* at all, and a HOME with no ~/.ray/auth_token
    res = _submit(url, _clean_env(HOME=str(tmp_path)), "python", "-c", "pass")
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "succeeded" not in out
    assert "AuthenticationError" in out and "Missing authentication token" in out, out[-3000:]
    res = _submit(url, _clean_env(HOME=str(tmp_path), RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64),
                  "python", "-c", "pass")
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Invalid authentication token" in out, out[-3000:]


def test_a_paper_arm_trains_as_a_ray_job(head, workdir, monkeypatch, tmp_path):  # noqa: F811
    """The merged manifest, its paths made absolute by the loader, is what the job trains (the job's working
    directory is the uploaded repository)."""
    url, auth = head
    monkeypatch.chdir(workdir)
    cfg = load_manifest(layers(JOB_ARM), ["run.name=paper-ray-job", f"run.output_dir={tmp_path}"])
    job = tmp_path / "job.yaml"
    job.write_text(to_yaml(cfg))
    res = _submit(url, auth, "python", "-m", "launch.cli", "train", str(job), "cluster.mode=ray",
                  working_dir=True, timeout=780)
    out = res.stdout + res.stderr
    assert res.returncode == 0 and "succeeded" in out, out[-6000:]
    check_run(tmp_path / "paper-ray-job", cfg)
