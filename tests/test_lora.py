"""LoRA students (model.lora): only the adapters train, under ZeRO 0-3 and any rank split, with the
gradient of a peft reference; the merged export computes what the adapter model computes; an engine
after a (partial) sync generates what the merged export generates; checkpoints carry the adapters and
resume exactly. Real DeepSpeed, peft, Ray, transformers and vLLM's CPU build on tiny models."""
import json
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from actors.hf_engine import HFEngine
from launch.config import ManifestError
from launch.manifest import load_manifest
from learner.lora import ADAPTER_DIR, LoraStudent, optimizer_state_bytes
from opd.contracts import SamplingSpec
from opd.weight_sync import open_sender
from opd.weight_sync.source import ParamStream
from test_learner_sync import make_batch

LR = 0.05
PROMPTS = [[1, 5, 6, 41, 7, 8, 44], [1, 9, 41, 4, 44], [1, 44], [1, 7, 41, 7, 44]]
GREEDY = SamplingSpec(max_new_tokens=6, temperature=0.0, behaviour_logprobs=False)


def lora_cfg(write_manifest, *over, **sections):
    return load_manifest(write_manifest(**sections), ["model.lora.r=4", "loss.name=full_reverse_kl", *over])


@pytest.fixture(scope="module")
def worker(ray_session, assets, tmp_path_factory):
    """One in-process LoRA learner rank (DeepSpeed keeps process-wide group state: one per process)."""
    import yaml
    from learner.worker import LearnerWorker
    path = tmp_path_factory.mktemp("lora") / "manifest.yaml"
    path.write_text(yaml.safe_dump({
        "run": {"name": "t", "output_dir": str(path.parent / "runs"), "steps": 2},
        "model": {"path": str(assets["tiny"]), "lora": {"r": 4}}, "teacher": {"kind": "hf", "path": str(assets["tiny"])},
        "rollout": {"prompts_per_step": 4, "samples_per_prompt": 2}, "learner": {"micro_batch_size": 8},
        "loss": {"name": "full_reverse_kl"}, "data": {"train": str(assets["train"]), "eval": str(assets["eval"])}}))
    w = LearnerWorker(load_manifest(path), 0, 1, rows_per_step=8)
    return w


def adapter_model(path, adapter: dict):
    """An independent peft model on the base at `path` holding `adapter` (peft's names)."""
    from peft import LoraConfig, get_peft_model
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           LoraConfig(r=4, lora_alpha=32, target_modules="all-linear"))
    missing = set(adapter) - set(model.state_dict())
    assert not missing, sorted(missing)[:3]
    model.load_state_dict(adapter, strict=False)
    return model


def randomise_adapters(model, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if ".lora_" in n:
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)


def test_manifest_keys(write_manifest):
    path = write_manifest()
    assert load_manifest(path).model.lora.r == 0  # off unless asked: every existing manifest is unchanged
    cfg = load_manifest(path, ["model.lora.r=8", "model.lora.target_modules=[q_proj,v_proj]"])
    assert (cfg.model.lora.alpha, list(cfg.model.lora.target_modules)) == (32.0, ["q_proj", "v_proj"])
    for override, message in [("model.lora.dropout=1", "model.lora.dropout: must be in"),
                              ("model.lora.alpha=0", "model.lora.alpha: must be > 0"),
                              ("model.lora.target_modules=[]", "model.lora.target_modules: empty"),
                              ("model.lora.rank=8", "did you mean 'model.lora.r'")]:
        with pytest.raises(ManifestError, match=message):
            load_manifest(path, ["model.lora.r=8", override])


def test_targets_that_cannot_be_merged_are_refused(assets):
    from omegaconf import OmegaConf
    from launch.config import LoraConfig
    for targets, message in [(["lm_head"], "the output layer is not a LoRA target"),
                             (["embed_tokens"], "is a Embedding; LoRA here trains torch.nn.Linear"),
                             (["no_such_proj"], "model.lora.target_modules: \\['no_such_proj'\\]")]:
        lora = OmegaConf.to_object(OmegaConf.structured(LoraConfig(r=4, target_modules=targets)))
        with pytest.raises(ValueError, match=message):
            LoraStudent(AutoModelForCausalLM.from_pretrained(assets["tiny"]), lora)


def test_only_adapters_get_gradients_and_the_optimizer_state_is_theirs(worker, assets):
    """Gradients reach the adapter matrices alone, the base stays bitwise as loaded, and AdamW's state is
    the adapters' alone."""
    module = worker.engine.module
    base = AutoModelForCausalLM.from_pretrained(assets["tiny"]).state_dict()
    trainable = {n for n, p in module.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    batch = make_batch(module.config.vocab_size)
    counts = batch.denominators("token_mean", slice(0, 8))
    worker.train_step(batch, counts)  # B leaves 0, so the A gradient below is not 0
    loss, _ = worker.micro_loss(batch, counts)
    worker.engine.backward(loss)
    grads = {n for n, p in module.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    assert grads == trainable
    worker.engine.zero_grad()
    state = {n.replace(".base_layer", ""): p for n, p in module.state_dict().items() if ".lora_" not in n}
    assert state.keys() == base.keys() and all(torch.equal(state[k], base[k]) for k in base)
    adapters = [p for n, p in module.named_parameters() if n in trainable]
    assert {id(p) for p in worker.engine.optimizer.state} == {id(p) for p in adapters}
    # exp_avg and exp_avg_sq in float32, and fused AdamW's one-element float32 step count
    assert optimizer_state_bytes(worker.engine.optimizer) == sum(2 * 4 * p.numel() + 4 for p in adapters)


def test_merged_export_and_saved_adapter_compute_the_adapter_models_logits(worker, assets, tmp_path):
    """final/ (merged, base names) and final/adapter (peft) both give the training model's logits."""
    from peft import PeftModel
    randomise_adapters(worker.engine.module)
    ids = torch.tensor([p + [5] * (7 - len(p)) for p in PROMPTS])
    worker.engine.module.eval()
    with torch.no_grad():
        want = worker.engine.module(ids).logits
    worker.save_hf(str(tmp_path / "final"), str(assets["tiny"]))
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "final")
    assert {n for n, _ in merged.named_parameters()} == \
        {n for n, _ in AutoModelForCausalLM.from_pretrained(assets["tiny"]).named_parameters()}
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(assets["tiny"]), tmp_path / "final" / ADAPTER_DIR)
    with torch.no_grad():
        for model in (merged, peft):
            got = model.eval()(ids).logits
            assert torch.allclose(got, want, atol=1e-5, rtol=1e-5), (got - want).abs().max()
        base = AutoModelForCausalLM.from_pretrained(assets["tiny"]).eval()(ids).logits
    assert not torch.allclose(base, want, atol=1e-2)  # the adapters moved the model: the check has teeth


@pytest.mark.parametrize("ranks,micro,zero", [(1, 8, 0), (2, 4, 1), (2, 2, 2), (2, 4, 3)])
def test_lora_split_gives_the_peft_gradient_and_an_hf_engine_syncs_to_the_export(
        ray_session, placed, write_manifest, assets, ranks, micro, zero):
    """Plain SGD: the adapters' update / lr equals the gradient of one independent peft model on the whole
    batch, for every ZeRO stage and rank split; then a partial sync (the touched modules only) makes an HF
    engine equal the merged export and generate what it generates."""
    import ray
    from launch.cluster import LearnerGroup, connect_weight_sync
    cfg = lora_cfg(write_manifest, "learner.optimizer=sgd", f"learner.lr={LR}", "learner.warmup_ratio=0",
                   "learner.schedule=constant", "learner.grad_clip=0", f"learner.num_ranks={ranks}",
                   f"learner.micro_batch_size={micro}", f"learner.zero_stage={zero}")
    path = str(assets["tiny"])
    batch = make_batch(AutoModelForCausalLM.from_pretrained(path).config.vocab_size)
    placement = placed(cfg)
    group = LearnerGroup(cfg, rows_per_step=8, placement=placement)
    engine = ray.remote(HFEngine).options(**placement.options(placement.layout.rollout[0])).remote(path)
    try:
        group.train_step(batch)  # B leaves 0; the checked step has a gradient in A too
        a0 = group.call("export_adapter")
        group.train_step(batch)
        a1 = group.call("export_adapter")
        reference = adapter_model(path, a0)
        loss = reference_loss(reference, batch)
        loss.backward()
        grads = {n: p.grad for n, p in reference.named_parameters() if p.requires_grad}
        assert grads.keys() == a0.keys()
        for name, g in grads.items():
            got = (a0[name] - a1[name]) / LR
            assert g.abs().sum() > 0 and torch.allclose(got, g, atol=2e-5, rtol=2e-3), \
                f"{name}: max err {(got - g).abs().max()}"
        exported = ray.get(group.export_weights())
        connect_weight_sync(cfg, group, [engine], ["hf"])
        group.call("sync_weights", 1)
        synced = ray.get(engine.get_weights.remote())
        assert synced.keys() == exported.keys() and all(torch.equal(synced[k], exported[k]) for k in exported)
        merged = AutoModelForCausalLM.from_pretrained(path)
        merged.load_state_dict(exported)
        with torch.no_grad():
            want = adapter_model(path, a1).eval()(torch.tensor([[1, 5, 6, 41]])).logits
            assert torch.allclose(merged.eval()(torch.tensor([[1, 5, 6, 41]])).logits, want, atol=1e-5)
    finally:
        group.call("close_weight_sync")
        for actor in group.ranks + [engine]:
            ray.kill(actor)


def reference_loss(model, b):
    """Exact reverse KL per token, mean over all tokens, one unpadded forward per row (as test_learner_sync)."""
    total = 0.0
    for i, prompt in enumerate(b.prompt_ids):
        comp = b.completion_ids[i][b.completion_mask[i]].tolist()
        logits = model(torch.tensor([prompt + comp])).logits[0, len(prompt) - 1: len(prompt) - 1 + len(comp)]
        logp = torch.log_softmax(logits, -1)
        total = total + (logp.exp() * (logp - b.teacher.full_logprobs[i, : len(comp)])).sum()
    return total / b.loss_tokens


def lora_source(path, targets, dtype=None):
    """A LoRA student on the base at `path` with random adapters, and its touched-modules stream."""
    from omegaconf import OmegaConf
    from launch.config import LoraConfig
    model = AutoModelForCausalLM.from_pretrained(path)
    lora = LoraStudent(model, OmegaConf.to_object(OmegaConf.structured(LoraConfig(r=4, target_modules=targets))))
    randomise_adapters(model, seed=1)
    return model, lora, ParamStream(model, dtype, parts=lora.parts(model, touched_only=True), complete=False)


def write_export(model, lora, tokenizer_path, out: Path) -> Path:
    """The merged model as save_hf writes it."""
    merged = AutoModelForCausalLM.from_pretrained(tokenizer_path)
    merged.load_state_dict(ParamStream(model, parts=lora.parts(model, touched_only=False)).to_cpu_dict())
    merged.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_path).save_pretrained(out)
    return out


def test_a_sync_sends_the_touched_modules_with_their_fused_siblings(assets):
    """q_proj and v_proj adapted: the round carries q, k, v, o of every layer (vLLM fuses q/k/v into one
    layer and rebuilds it from what arrives), merged where touched; never the MLP, norms, embeddings or head."""
    model, lora, stream = lora_source(assets["student"], ["q_proj", "v_proj"])
    names = [m.name for m in stream.metadata()]
    layers = model.config.num_hidden_layers
    assert sorted(names) == sorted(f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(layers) for p in "qkvo")
    sent = dict(stream)
    base = dict(AutoModelForCausalLM.from_pretrained(assets["student"]).named_parameters())
    for name, t in sent.items():
        assert torch.equal(t, base[name]) == (name.split(".")[-2] in ("k_proj", "o_proj")), name
    full = sum(p.numel() for p in base.values())
    assert sum(t.numel() for t in sent.values()) < full / 2


def test_an_hf_engine_after_a_partial_sync_generates_what_the_merged_export_does(assets, tmp_path):
    model, lora, stream = lora_source(assets["student"], ["q_proj", "v_proj"])
    export = write_export(model, lora, assets["student"], tmp_path / "export")
    engine = HFEngine(str(assets["student"]))
    sender = open_sender("gloo", stream, [engine], [1], rank=0, address="127.0.0.1")
    sender.send(3)
    sender.shutdown()
    want = AutoModelForCausalLM.from_pretrained(export).state_dict()
    assert all(torch.equal(w, want[k]) for k, w in engine.get_weights().items())
    out = engine.generate(PROMPTS, GREEDY)
    assert out.weight_version == 3
    assert out.completions() == HFEngine(str(export)).generate(PROMPTS, GREEDY).completions()
    assert out.completions() != HFEngine(str(assets["student"])).generate(PROMPTS, GREEDY).completions()


@pytest.mark.parametrize("targets", [["q_proj", "v_proj"], ["all-linear"]])
def test_a_vllm_engine_after_a_partial_sync_generates_what_the_merged_export_does(assets, tmp_path, targets):
    """vLLM's weight-transfer API over our gloo backend: a round holding only the touched modules (and
    their fused siblings) leaves the rest as loaded; greedy tokens and behaviour log-probs equal those of
    the merged export (fresh vLLM and HF engines)."""
    from actors.vllm_engine import VLLMEngine
    from opd.modeling import completion_logits
    from test_vllm import spec
    model, lora, stream = lora_source(assets["student"], targets)
    export = write_export(model, lora, assets["student"], tmp_path / "export")
    pad = AutoTokenizer.from_pretrained(assets["student"]).pad_token_id
    engine = VLLMEngine(spec(assets["student"], sync_backend="gloo"), SamplingSpec(max_new_tokens=8), pad)
    before = engine.generate(PROMPTS, GREEDY).completions()
    sender = open_sender("gloo", stream, [engine], [engine.weight_sync_workers()], rank=0, address="127.0.0.1")
    sender.send(2)
    sender.shutdown()
    out = engine.generate(PROMPTS, GREEDY)
    assert out.completions() != before
    assert out.completions() == HFEngine(str(export)).generate(PROMPTS, GREEDY).completions()
    r = engine.generate(PROMPTS, SamplingSpec(max_new_tokens=6, seed=4))
    merged = AutoModelForCausalLM.from_pretrained(export)
    with torch.no_grad():
        logits = completion_logits(merged, r.prompt_ids, r.completion_ids, r.completion_mask, pad)
    ref = torch.log_softmax(logits.float(), -1).gather(-1, r.completion_ids[..., None]).squeeze(-1)
    m = r.completion_mask
    assert torch.allclose(r.behaviour_logprobs[m], ref[m], atol=1e-4), (r.behaviour_logprobs[m] - ref[m]).abs().max()
    # last: a second in-process engine shares vLLM's process-wide state, and freeing it tears that down
    fresh = VLLMEngine(spec(export), SamplingSpec(max_new_tokens=8), pad)
    assert out.completions() == fresh.generate(PROMPTS, GREEDY).completions()


def test_lora_resume_is_exact_and_checkpoints_hold_the_adapters(ray_session, write_manifest, tmp_path):
    """A LoRA run resumed from its step-2 checkpoint logs what the run never stopped logged and ends at the
    same final model; the checkpoint's model states are the adapters alone."""
    from launch.cli import main
    from learner import checkpoint
    from test_resume import comparable, read_metrics
    runs = tmp_path / "runs"
    manifest = write_manifest(run={"name": "clean", "output_dir": str(runs), "steps": 4},
                              model={"lora": {"r": 4}}, checkpoint={"interval": 2, "keep": 2},
                              eval={"interval": 2, "size": 8}, learner={"micro_batch_size": 8, "lr": 1e-2})
    assert main(["train", str(manifest)]) == 0
    clean = runs / "clean"
    states = torch.load(clean / "checkpoints" / "step2" / "mp_rank_00_model_states.pt", weights_only=False)["module"]
    assert states and all(".lora_" in k for k in states)
    shutil.copytree(clean, runs / "cut")
    cut = runs / "cut"
    shutil.rmtree(cut / "checkpoints" / "step4")
    shutil.rmtree(cut / "final")
    (cut / "summary.json").unlink()
    assert [p.name for p in checkpoint.complete(cut / "checkpoints")] == ["step2"]
    assert main(["train", str(manifest), "run.name=cut", "run.resume=true"]) == 0
    got, want = read_metrics(cut), read_metrics(clean)
    assert [r["step"] for r in got if "train/loss" in r] == [1, 2, 3, 4]
    assert comparable(got) == comparable(want)
    a, b = (AutoModelForCausalLM.from_pretrained(d / "final").state_dict() for d in (cut, clean))
    assert all(torch.equal(a[k], b[k]) for k in b)
    assert json.loads((cut / "summary.json").read_text())["end_eval_accuracy"] == \
        json.loads((clean / "summary.json").read_text())["end_eval_accuracy"]
