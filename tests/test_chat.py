"""Chat-format data end to end on the tiny Qwen3 family: the tokens an engine is fed are the chat template's,
both engines stop at the end of turn, no template text reaches completions, rewards or metrics, and OPSD's
teacher gets its own system message while completions stay shared."""
import json

import pytest
import torch

from launch.batches import sft_batch
from launch.manifest import load_manifest
from launch.inputs import load_inputs
from opd.contracts import SamplingSpec
from opd.modeling import completion_logits

QUESTION = [{"role": "user", "content": "Ann has 3 apples and buys 4 more. How many apples does she have now?"}]


@pytest.fixture
def chat_manifest(tmp_path, qwen3_assets):
    """write(**sections) -> a chat OPD manifest on the small-vocabulary tiny Qwen3 student and teacher."""
    import yaml

    def write(**over):
        doc = {"algorithm": "opd",
               "run": {"name": "chat", "output_dir": str(tmp_path / "runs"), "steps": 2},
               "cluster": {"mode": "local", "num_cpus": 2},
               "model": {"path": str(qwen3_assets["student"])},
               "teacher": {"kind": "hf", "path": str(qwen3_assets["teacher"])},
               "rollout": {"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 8},
               "learner": {"micro_batch_size": 4, "lr": 1e-3},
               "loss": {"name": "sampled_token_rkl"},
               "data": {"train": str(qwen3_assets["train"]), "eval": str(qwen3_assets["eval"]),
                        "chat_template": True, "chat_template_kwargs": {"enable_thinking": False},
                        "sft_field": "solution"},
               "eval": {"interval": 0, "size": 4, "verifier": "boxed_match"}}
        for section, value in over.items():
            doc[section] = {**doc.get(section, {}), **value} if isinstance(value, dict) else value
        path = tmp_path / "chat.yaml"
        path.write_text(yaml.safe_dump(doc))
        return path
    return write


def chat_ids(tok, messages, **kwargs):
    out = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, **kwargs)
    return list(out["input_ids"] if isinstance(out, dict) or hasattr(out, "keys") else out)


@pytest.mark.parametrize("thinking", [False, True])
def test_prompt_tokens_equal_apply_chat_template(chat_manifest, thinking):
    cfg = load_manifest(chat_manifest(), [f"data.chat_template_kwargs={{enable_thinking: {str(thinking).lower()}}}"])
    inputs = load_inputs(cfg)
    tok, row = inputs.tokenizer, inputs.train.rows[0]
    assert inputs.fmt.student(row) == chat_ids(tok, row["messages"], enable_thinking=thinking)
    text = tok.decode(inputs.fmt.student(row))
    assert text.count("<|im_start|>") == 2 and text.endswith("<|im_start|>assistant\n" + ("" if thinking else
                                                                                          "<think>\n\n</think>\n\n"))
    # one user turn from a plain prompt field renders the same as that turn in messages form
    plain = dict(row, messages=None)
    assert inputs.fmt.student(plain) == inputs.fmt.student(row)


def test_opsd_system_prompt_is_the_teachers_alone(chat_manifest):
    rule = "Always reason step by step and box the answer."
    cfg = load_manifest(chat_manifest(teacher={"kind": "self", "path": None, "system_prompt": rule,
                                               "prompt_template": "Hint: add or subtract. {prompt}"}))
    inputs = load_inputs(cfg)
    tok, row = inputs.tokenizer, inputs.train.rows[0]
    student, teacher = inputs.fmt.student(row), inputs.fmt.teacher(row)
    assert "<|im_start|>system" not in tok.decode(student)
    assert teacher == chat_ids(tok, [{"role": "system", "content": rule},
                                     {"role": "user", "content": "Hint: add or subtract. " + row["prompt"]}],
                               enable_thinking=False)
    # the same rule given to both: the student's prompt has it too; "" takes it away from the teacher
    both = load_inputs(load_manifest(chat_manifest(data={"system_prompt": rule}, teacher={"kind": "self", "path": None})))
    assert "<|im_start|>system\n" + rule in tok.decode(both.fmt.student(row)) == tok.decode(both.fmt.teacher(row))
    none = load_inputs(load_manifest(chat_manifest(data={"system_prompt": rule},
                                                   teacher={"kind": "self", "path": None, "system_prompt": ""})))
    assert "<|im_start|>system" not in tok.decode(none.fmt.teacher(row))


def test_each_padded_row_equals_its_unpadded_forward_under_the_chat_template(chat_manifest, qwen3_assets):
    """Student prompts without, teacher prompts with a system message (ragged lengths): the teacher's
    scores of a padded batch equal scoring each row alone."""
    from teachers.hf_teacher import HFTeacher
    from opd.contracts import ScoreRequest
    cfg = load_manifest(chat_manifest(teacher={"kind": "self", "path": None, "system_prompt": "Be careful."}))
    inputs = load_inputs(cfg)
    rows = inputs.train.rows[:4]
    prompts = inputs.fmt.teachers(rows)
    assert len({len(p) for p in prompts}) > 1
    teacher = HFTeacher(str(qwen3_assets["student"]))
    completions = torch.randint(0, len(inputs.tokenizer), (4, 6))
    mask = torch.tensor([[1] * n + [0] * (6 - n) for n in (6, 3, 5, 1)], dtype=torch.bool)
    request = ScoreRequest(topk=3)
    together = teacher.score(prompts, completions, mask, request)
    for i in range(4):
        alone = teacher.score(prompts[i:i + 1], completions[i:i + 1], mask[i:i + 1], request)
        keep = mask[i]
        assert torch.allclose(together.sampled_logprobs[i][keep], alone.sampled_logprobs[0][keep], atol=1e-5)
        assert torch.equal(together.topk_ids[i][keep], alone.topk_ids[0][keep])


@pytest.fixture(scope="session")
def chat_student(qwen3_assets, tmp_path_factory):
    """The small tiny-Qwen3 student after a brief in-process SFT on the chat data: it knows to end its turn."""
    from transformers import AutoModelForCausalLM
    cfg = load_manifest(_session_manifest(qwen3_assets, tmp_path_factory.mktemp("chat-sft")))
    inputs = load_inputs(cfg)
    model = AutoModelForCausalLM.from_pretrained(qwen3_assets["student"])
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    rows = inputs.train.rows
    for step in range(80):
        b = sft_batch(inputs.fmt, rows[16 * step % len(rows):][:16], "target")
        logits = completion_logits(model, b.prompt_ids, b.completion_ids, b.completion_mask, inputs.special.pad)
        lp = torch.log_softmax(logits.float(), -1).gather(-1, b.completion_ids[..., None]).squeeze(-1)
        loss = -(lp * b.completion_mask).sum() / b.completion_mask.sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    out = tmp_path_factory.mktemp("chat-student") / "student"
    model.save_pretrained(out)
    inputs.tokenizer.save_pretrained(out)
    return out, inputs


def _session_manifest(assets, tmp):
    import yaml
    path = tmp / "m.yaml"
    path.write_text(yaml.safe_dump({
        "algorithm": "sft", "run": {"name": "x", "output_dir": str(tmp), "steps": 1}, "loss": {"name": "sft"},
        "teacher": {"kind": "none"},
        "model": {"path": str(assets["student"])},
        "data": {"train": str(assets["train"]), "chat_template": True, "sft_field": "solution",
                 "chat_template_kwargs": {"enable_thinking": False}},
        "rollout": {"prompts_per_step": 16}, "learner": {"micro_batch_size": 16}}))
    return path


def _check_stops_at_end_of_turn(rollout, inputs):
    im_end = inputs.tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in inputs.special.stop
    for ids, reason in zip(rollout.completions(), rollout.finish_reasons):
        assert reason == "stop" and ids[-1] == im_end and im_end not in ids[:-1]
        text = inputs.fmt.text(ids)
        assert not any(t in text for t in ("<|im_start|>", "<|im_end|>", "<|endoftext|>", "assistant\n"))


def test_hf_and_vllm_engines_stop_at_the_end_of_turn(chat_student):
    from actors.hf_engine import HFEngine
    from actors.vllm_engine import VLLMEngine
    from opd.vllm_llm import LLMSpec
    path, inputs = chat_student
    rows = inputs.train.rows[:6]
    spec = SamplingSpec(max_new_tokens=48, temperature=0.0, stop_ids=inputs.special.stop)
    hf = HFEngine(str(path)).generate(inputs.fmt.students(rows), spec)
    _check_stops_at_end_of_turn(hf, inputs)
    vllm = VLLMEngine(LLMSpec(model=str(path), dtype="float32", max_model_len=256), spec, inputs.special.pad)
    out = vllm.generate(inputs.fmt.students(rows), spec)
    _check_stops_at_end_of_turn(out, inputs)
    assert out.completions() == hf.completions()  # greedy, same weights: the same tokens


def test_a_chat_opd_run_trains_and_grades_completions_without_template_text(ray_session, chat_manifest, chat_student,
                                                                            tmp_path):
    from launch.cli import main
    path, _ = chat_student
    manifest = chat_manifest(model={"path": str(path)}, teacher={"kind": "hf", "path": str(path)},
                             rollout={"prompts_per_step": 2, "samples_per_prompt": 2, "max_new_tokens": 48})
    assert main(["train", str(manifest)]) == 0
    metrics = [json.loads(line) for line in (tmp_path / "runs" / "chat" / "metrics.jsonl").read_text().splitlines()]
    stepped = [m for m in metrics if "rollout/stop_fraction" in m]
    assert stepped and all(m["rollout/stop_fraction"] == 1.0 for m in stepped)
    summary = json.loads((tmp_path / "runs" / "chat" / "summary.json").read_text())
    assert summary["end_eval_accuracy"] is not None


def test_opd_eval_renders_chat_prompts_and_stops_at_the_end_of_turn(chat_student, capsys):
    """`opd eval --chat-template-kwargs`: the same prompts and stop ids as a run's evaluation, so the same
    greedy answers as the HF engine fed the run's formatter."""
    from actors.hf_engine import HFEngine
    from launch.cli import main
    from tasks.verifiers import boxed_match
    path, inputs = chat_student
    rows = inputs.train.rows[:8]
    spec = SamplingSpec(max_new_tokens=48, temperature=0.0, stop_ids=inputs.special.stop)
    out = HFEngine(str(path)).generate(inputs.fmt.students(rows), spec)
    want = sum(boxed_match(inputs.fmt.text(c), r["answer"]) for c, r in zip(out.completions(), rows)) / len(rows)
    rows_file = path.parent / "rows.jsonl"
    rows_file.write_text("".join(json.dumps({"messages": r["messages"], "answer": r["answer"]}) + "\n" for r in rows))
    assert main(["eval", "--model", str(path), "--data", str(rows_file), "--verifier", "boxed_match",
                 "--max-new-tokens", "48", "--chat-template-kwargs", '{"enable_thinking": false}']) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert got["size"] == 8 and got["accuracy"] == want
    # the vLLM kind, built in-process through the engine registry (actors/kinds.py), greedy on the same prompts
    assert main(["eval", "--model", str(path), "--data", str(rows_file), "--verifier", "boxed_match", "--engine",
                 "vllm", "--max-new-tokens", "48", "--chat-template-kwargs", '{"enable_thinking": false}']) == 0
    got = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert (got["engine"], got["size"], got["accuracy"]) == ("vllm", 8, want)
