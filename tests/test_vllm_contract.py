"""Contract tests for the vLLM adapter (actors/vllm_engine.py, teachers/vllm_teacher.py).

vLLM cannot run here (CUDA build, no GPU), so two kinds of test, kept apart by name:
* against the REAL vLLM 0.33.0 source, read with `ast` out of its wheel (pip-downloaded once into
  .cache/vllm-wheel/): every vLLM name the adapter uses exists with that signature, the behaviour our
  decisions rely on is still in the source, and the fakes use real names;
* with a FAKE `vllm` (tests/fake_vllm.py, a mock: a tiny deterministic "model" behind vLLM-shaped
  outputs) to test our parsing: position alignment, top-k, behaviour log-probs, finish reasons,
  padding, weight sync. Plus one real DeepSpeed ZeRO-3 gather on CPU.
A GPU run is still needed to check vLLM itself (docs/vllm.md lists what).
"""
from __future__ import annotations

import ast
import dataclasses
import inspect
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch

from actors.vllm_engine import VLLM_VERSION, VLLMEngine, WeightSender, WeightSyncClient, logprobs_mode_for
from opd.contracts import SamplingSpec, ScoreRequest
from teachers.vllm_teacher import VLLMTeacher
import fake_vllm  # tests/ is on sys.path (pytest's rootdir-relative import of a package-less tests dir)
from fake_vllm import EOS, FAKE_LLM_RECORDED, FAKE_MODULES, FAKES, logits_at
from vllm_api import VllmSource, adapter_uses, check_uses, func_sig

REPO = Path(__file__).resolve().parents[1]
WHEEL_DIR = REPO / ".cache" / "vllm-wheel"
ADAPTER = [REPO / "actors" / "vllm_engine.py", REPO / "teachers" / "vllm_teacher.py"]


def ensure_wheel(version: str) -> Path:
    """The vllm==version wheel: $OPD_VLLM_WHEEL, else .cache/vllm-wheel/, else `pip download` into
    it. Raises RuntimeError with pip's last line when it cannot be had (no network)."""
    if os.environ.get("OPD_VLLM_WHEEL"):
        return Path(os.environ["OPD_VLLM_WHEEL"])
    found = sorted(WHEEL_DIR.glob(f"vllm-{version}-*.whl"))
    if not found:
        WHEEL_DIR.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "pip", "download", f"vllm=={version}", "--no-deps",
                               "--only-binary=:all:", "-d", str(WHEEL_DIR)],
                              capture_output=True, text=True, timeout=900)
        found = sorted(WHEEL_DIR.glob(f"vllm-{version}-*.whl"))
        if proc.returncode != 0 or not found:
            raise RuntimeError(((proc.stderr or proc.stdout).strip().splitlines() or ["pip failed"])[-1])
    if not zipfile.is_zipfile(found[0]):
        found[0].unlink()  # a truncated download: fetch it again next time
        raise RuntimeError(f"{found[0].name} is not a complete wheel")
    return found[0]


@pytest.fixture(scope="module")
def vllm_src() -> VllmSource:
    try:  # runs only when a test that needs the real source is selected
        return VllmSource(ensure_wheel(VLLM_VERSION))
    except (RuntimeError, OSError, subprocess.SubprocessError) as e:
        pytest.skip(f"vLLM {VLLM_VERSION} wheel unavailable (pip download failed: {e}); "
                    "the adapter was NOT checked against the real vLLM API")


def test_contract_adapter_uses_only_real_vllm_api(vllm_src):
    uses = adapter_uses(ADAPTER)
    seen = {(u.kind, u.name, u.member) for u in uses}
    # The extractor must actually see the adapter's vLLM surface, or an empty list would pass.
    for expected in [("call", "LLM", ""), ("call", "SamplingParams", ""), ("method", "LLM", "generate"),
                     ("attr", "CompletionOutput", "logprobs"), ("attr", "RequestOutput", "prompt_logprobs"),
                     ("method", "LLM", "finish_weight_update"), ("rpc", "Worker", "reload_weights"),
                     ("override", "WeightSource", ""), ("call", "NCCLTrainerInitInfo", "")]:
        assert expected in seen, f"adapter_uses no longer sees {expected}"
    errors = check_uses(vllm_src, uses)
    assert not errors, "adapter uses vLLM names that 0.33.0 lacks:\n" + "\n".join(errors)


@pytest.mark.parametrize("old,new", [
    ("detokenize=False", "detokenise=False"), ("completion.finish_reason not", "completion.finish_reasons not"),
    ("self.llm.reset_prefix_cache()", "self.llm.reset_prefix_caches()"), ("lp.rank", "lp.ranks"),
    ('"is_checkpoint_format"', '"checkpoint_format"'), ("packed_num_buffers=2", "num_buffers=2"),
    ("def iter_full", "def iter_ful"), ("import NCCLTrainerInitInfo", "import NCCLInitInfo"),
    ("update_weight_version(str(version))", "update_weight_version(str(version), 1)")])
def test_contract_checker_catches_a_wrong_name(vllm_src, tmp_path, old, new):
    src = ADAPTER[0].read_text()
    assert old in src
    (tmp_path / "vllm_engine.py").write_text(src.replace(old, new, 1))
    assert check_uses(vllm_src, adapter_uses([tmp_path / "vllm_engine.py"]))


def test_contract_weight_sync_client_matches_vllm_protocol(vllm_src):
    """vLLM's trainer engines call the client structurally: every protocol method, same parameters,
    and every client method the NCCL / IPC engines call."""
    proto = vllm_src.class_info("vllm.distributed.weight_transfer.base", "VLLMWeightSyncClient")
    for st in (s for s in proto.node.body if isinstance(s, ast.FunctionDef)):
        ours = inspect.signature(getattr(WeightSyncClient, st.name))
        assert list(ours.parameters)[1:] == func_sig(st).positional, st.name
    for mod in ("nccl_engine", "ipc_engine", "nccl_common"):
        tree = vllm_src.module(f"vllm.distributed.weight_transfer.{mod}")
        called = {n.attr for n in ast.walk(tree) if isinstance(n, ast.Attribute)
                  and isinstance(n.value, ast.Attribute) and n.value.attr == "client"}
        assert called <= set(dir(WeightSyncClient)), (mod, called)


def test_contract_vllm_behaviour_our_decisions_rely_on(vllm_src):
    """Pins the source facts behind docs/vllm.md's decisions, so an upgrade that changes them fails here."""
    def text(mod):
        return vllm_src.zip.read(vllm_src._path(mod)).decode()
    model_cfg = text("vllm.config.model")
    assert 'logprobs_mode: LogprobsMode = "raw_logprobs"' in model_cfg
    # Processed log-probs are renormalised over top-p: exact only at top_p == 1.
    assert "after applying all processors, including\n    temperature and top_k/top_p." in model_cfg
    assert "for prompt_logprobs, processed_* and raw_* yield identical results" in model_cfg  # teacher at T=1
    sampler = text("vllm.v1.sample.sampler")  # V1 runner: raw log-probs are taken before temperature
    assert sampler.index("raw_logprobs = self.compute_logprobs(logits)") < sampler.index("self.sample(logits")
    # V2 runner (0.33.0's default): top-p / temperature work on a copy, so raw logits stay unmasked.
    assert "or top_p != 1.0" in text("vllm.v1.worker.gpu.sample.states")
    assert "logits = torch.empty_like(logits, dtype=torch.float32).copy_(logits)" \
        in text("vllm.v1.worker.gpu.sample.sampler")
    logprobs = text("vllm.logprobs")  # sampled token first at its true rank, then ranks 1..k
    assert "ranks = itertools.chain((rank,), topk_ranks)" in logprobs
    assert "# NOTE: logprob of first prompt token is None." in logprobs  # prompt entry j scores token j
    assert "if last_token_id == sampling_params.eos_token_id:" in text("vllm.v1.core.sched.utils")  # EOS kept
    assert "get_vocab" in vllm_src.class_info("vllm.tokenizers", "TokenizerLike").members()


def test_contract_fakes_use_real_vllm_names(vllm_src):
    for fake, (mod, name) in FAKES.items():
        real = vllm_src.class_info(mod, name).members()
        assert {f.name for f in dataclasses.fields(fake)} <= real, (fake.__name__, name)
    for mod, names in FAKE_MODULES.items():
        for name, fake in names.items():
            if dataclasses.is_dataclass(fake):
                assert {f.name for f in dataclasses.fields(fake)} <= vllm_src.init_sig(
                    vllm_src.class_info(mod, name)).keywords, name
    llm = vllm_src.class_info("vllm.entrypoints.llm", "LLM")
    fake_methods = {**FAKE_LLM_RECORDED, "generate": ["prompts", "sampling_params", "use_tqdm"],
                    "get_world_size": ["include_dp"],
                    "update_weight_version": ["new_version"], "finish_weight_update": ["weight_version"]}
    for method, params in fake_methods.items():
        assert set(params) <= func_sig(llm.method(method)).keywords, method
    factory = vllm_src.class_info("vllm.distributed.weight_transfer.factory", "WeightTransferTrainerFactory")
    assert {"init_info", "client", "source"} <= func_sig(factory.method("trainer_init")).keywords




@pytest.fixture
def fake_vllm_installed(monkeypatch):
    fake_vllm.install(monkeypatch)


def expected_logprobs(ctx: list[int], temperature: float) -> torch.Tensor:
    """The contract: log softmax(logits / T), untruncated by top-p (greedy: T = 1)."""
    return (logits_at(ctx) / (temperature or 1.0)).log_softmax(-1)


@pytest.mark.parametrize("temperature,top_p", [(1.0, 0.8), (0.7, 1.0), (0.0, 1.0)])
def test_contract_parsing_with_fake_vllm_outputs(fake_vllm_installed, temperature, top_p):
    spec = SamplingSpec(max_new_tokens=6, temperature=temperature, top_p=top_p, return_topk=2, seed=3)
    engine = VLLMEngine("fake", logprobs_mode=logprobs_mode_for(spec), max_topk=4, version=2)
    prompts = [[3, 4], [5], [3, 4], [6, 7, 8], [9]]
    ro = engine.generate(prompts, spec)
    n, width = ro.completion_ids.shape
    assert (n, ro.student_topk_ids.shape) == (5, (5, width, 2)) and ro.weight_version == 2
    lengths = ro.completion_mask.sum(1)
    assert torch.equal(ro.completion_mask, torch.arange(width)[None] < lengths[:, None])
    outside_topk = 0
    for i, prompt in enumerate(prompts):
        toks = ro.completion_ids[i, : lengths[i]].tolist()
        assert ro.finish_reasons[i] == ("stop" if toks[-1] == EOS else "length")  # EOS kept in the completion
        assert ro.finish_reasons[i] == "stop" or len(toks) == 6
        for t, tok in enumerate(toks):
            exp = expected_logprobs(prompt + toks[:t], temperature)
            assert ro.behaviour_logprobs[i, t].item() == pytest.approx(exp[tok].item(), abs=1e-5)
            assert ro.student_topk_ids[i, t].tolist() == logits_at(prompt + toks[:t]).topk(2).indices.tolist()
            outside_topk += tok not in ro.student_topk_ids[i, t].tolist()
        assert not ro.behaviour_logprobs[i, lengths[i]:].any() and not ro.student_topk_ids[i, lengths[i]:].any()
    assert set(ro.finish_reasons) == {"stop", "length"}
    if temperature:  # vLLM's k+1-entry case (sampled token outside the top-k) was exercised
        assert outside_topk > 0
    assert [p.seed for p in engine.llm.last_params] == [3, 4, 5, 6, 7]  # repeated prompts must differ

    # The teacher sees a longer, different prompt (OPSD): completion token t sits at P + t.
    teacher_prompts = [[10, 11, 0] + p for p in prompts]
    mask = ro.completion_mask.clone()
    mask[4] = False  # an empty completion: nothing to score, row of zeros
    for exact in (False, True):
        teacher = VLLMTeacher("fake", max_topk=4, exact_ids=exact)
        req = ScoreRequest(topk=3, at_student_topk=exact)
        scores = teacher.score(teacher_prompts, ro.completion_ids, mask, req, ro.student_topk_ids)
        assert scores.topk_ids.shape == (5, width, 3) and (scores.at_student_topk is not None) == exact
        for i, tp in enumerate(teacher_prompts):
            toks = ro.completion_ids[i, : mask[i].sum()].tolist()
            for t, tok in enumerate(toks):
                exp = expected_logprobs(tp + toks[:t], 1.0)
                assert scores.sampled_logprobs[i, t].item() == pytest.approx(exp[tok].item(), abs=1e-5)
                top = exp.topk(3)
                assert scores.topk_ids[i, t].tolist() == top.indices.tolist()
                assert scores.topk_logprobs[i, t].tolist() == pytest.approx(top.values.tolist(), abs=1e-5)
                if exact:
                    assert scores.at_student_topk[i, t].tolist() == pytest.approx(
                        exp[ro.student_topk_ids[i, t]].tolist(), abs=1e-5)
            assert not scores.sampled_logprobs[i, len(toks):].any() and not scores.topk_ids[i, len(toks):].any()


def test_contract_refuses_what_vllm_cannot_do_exactly(fake_vllm_installed):
    with pytest.raises(ValueError, match="no exact"):
        logprobs_mode_for(SamplingSpec(max_new_tokens=2, temperature=0.7, top_p=0.9))
    engine = VLLMEngine("fake", logprobs_mode="raw_logprobs")
    with pytest.raises(ValueError, match="processed_logprobs"):
        engine.generate([[1]], SamplingSpec(max_new_tokens=2, temperature=0.7))
    with pytest.raises(ValueError, match="raw_logprobs"):
        VLLMEngine("fake", logprobs_mode="processed_logprobs").generate(
            [[1]], SamplingSpec(max_new_tokens=2, top_p=0.9))
    teacher, ids, mask = VLLMTeacher("fake"), torch.tensor([[2, 3]]), torch.tensor([[True, True]])
    for req, match in [(ScoreRequest(full_vocab=True), "full vocabulary"),
                       (ScoreRequest(temperature=0.5), "1.0"), (ScoreRequest(at_student_topk=True), "exact_ids"),
                       (ScoreRequest(topk=21), "max_topk")]:
        with pytest.raises(ValueError, match=match):
            teacher.score([[4]], ids, mask, req, torch.zeros(1, 2, 2, dtype=torch.long))
    with pytest.raises(ValueError, match="right-padded"):
        teacher.score([[4]], ids, torch.tensor([[False, True]]), ScoreRequest())
    engine.llm.version = "7"  # vLLM's label disagrees with our counter: refuse the rollout
    with pytest.raises(RuntimeError, match="sampled by weights"):
        engine.generate([[1]], SamplingSpec(max_new_tokens=2))


def test_contract_weight_sync_with_fake_vllm(fake_vllm_installed):
    engines = [VLLMEngine("fake"), VLLMEngine("fake")]
    client = WeightSyncClient(engines, workers_per_engine=[2, 1])
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    sender = WeightSender(model, rank=0, client=client, master_address="10.0.0.1", master_port=29600,
                          bucket_bytes=40, dtype=torch.bfloat16)
    assert sender.engine.info.world_size == 4  # learner rank 0 + 3 vLLM workers
    sender.send(version=5)
    want = [(n, p.detach().to(torch.bfloat16)) for n, p in model.named_parameters()]
    assert [n for n, _ in sender.engine.received] == [n for n, _ in want]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(sender.engine.received, want))
    for engine, offset in zip(engines, [1, 3]):  # each engine's workers after the previous engine's
        names = [c[0] for c in engine.llm.calls]
        assert names == ["init_weight_transfer_engine", "start_weight_update", "update_weights",
                         "finish_weight_update", "reset_prefix_cache"]
        assert engine.llm.calls[0][1][0].init_info["rank_offset"] == offset
        assert engine.weight_version == 5 and engine.llm.version == "5"
        assert engine.generate([[1]], SamplingSpec(max_new_tokens=2)).weight_version == 5
    engines[0].update_weights(iter(want), version=6)  # the object-store path
    method, args, kwargs = engines[0].llm.calls[-2]
    assert (method, args[0], sorted(kwargs["kwargs"])) == (
        "collective_rpc", "reload_weights", ["is_checkpoint_format", "weights_iterator"])
    assert engines[0].weight_version == 6 and engines[0].llm.version == "6"
    with pytest.raises(ValueError, match="needs a WeightSyncClient"):
        WeightSender(model, rank=0, client=None)
    WeightSender(model, rank=1, client=None)  # other learner ranks only join the gathers


ZERO3_SCRIPT = """
import os, torch, deepspeed
os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT="{port}", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
deepspeed.init_distributed(dist_backend="gloo")
from actors.vllm_engine import full_shape, iter_gathered
with deepspeed.zero.Init(config_dict_or_path={{"train_batch_size": 1, "zero_optimization": {{"stage": 3}}}}):
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Linear(16, 4))
named = list(model.named_parameters())
assert all(p.numel() == 0 for _, p in named), "not partitioned"
with deepspeed.zero.GatheredParameters([p for _, p in named], modifier_rank=0):
    for i, (_, p) in enumerate(named):
        p.data.copy_(torch.arange(p.numel()).view_as(p.data) + i)
got = list(iter_gathered(named, bucket_bytes=300))  # several buckets; tensors kept past each one
for i, ((name, p), (gname, t)) in enumerate(zip(named, got, strict=True)):
    assert name == gname and tuple(t.shape) == full_shape(p) == tuple(p.ds_shape), name
    assert torch.equal(t, (torch.arange(t.numel()).view_as(t) + i).to(t.dtype)), name
print("ZERO3-OK")
"""


def test_contract_zero3_gather_per_bucket_on_cpu():
    """Real DeepSpeed ZeRO-3 (CPU, gloo, one rank), in a subprocess so torch.distributed stays clean."""
    pytest.importorskip("deepspeed")
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.run([sys.executable, "-c", ZERO3_SCRIPT.format(port=port)], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert "ZERO3-OK" in proc.stdout, proc.stderr[-3000:]
