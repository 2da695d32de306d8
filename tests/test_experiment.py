"""`opd experiment` and `opd report`: the OPSD experiment end to end at toy length (every PI kind runs a
short real OPSD run), the results files, the plots, and arm errors caught before any work."""
import json
import re

import pytest

from launch.cli import main
from launch.config import ManifestError
from launch.experiment import Arm, Experiment, load_experiment, resolve


def test_opsd_experiment_runs_every_pi_kind_and_writes_results(ray_session, tmp_path, capsys):
    out = tmp_path / "exp"
    assert main(["experiment", "opsd", "--out", str(out), "run.steps=2", "eval.size=8", "eval.interval=0",
                 "logging.tensorboard=false"]) == 0
    root = out / "opsd"
    results = json.loads((root / "results.json").read_text())
    assert [r["arm"] for r in results] == ["base", "shared-rule", "shared-preference", "instance-answer",
                                           "instance-solution", "instance-answer-inferable"]
    for r in results:
        assert {"arm", "metric", "start", "end", "steps", "wall_s"} <= set(r) and r["steps"] == 2
        assert 0 <= r["start"] <= 1 and 0 <= r["end"] <= 1 and r["wall_s"] > 0
    # each OPSD arm's teacher saw its PI: the manifest it ran with, and the PI gap it logged
    for arm, template in (("shared-rule", "rev:{prompt}"), ("instance-solution", "sol {solution}:{prompt}")):
        assert f"prompt_template: {template}" in (root / "runs" / arm / "manifest.yaml").read_text()
        steps = [json.loads(line) for line in (root / "runs" / arm / "metrics.jsonl").read_text().splitlines()]
        assert all("opsd/pi_gap_nats" in s for s in steps if "train/loss" in s)
    md = (root / "results.md").read_text()
    assert "| shared-rule |" in md and "![eval_accuracy](eval_accuracy.png)" in md
    for png in ("eval_accuracy.png", "train_loss.png", "opsd_pi_gap_nats.png"):
        assert (root / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png

    # opd report draws any runs, by folder
    runs = [str(root / "runs" / a) for a in ("shared-rule", "instance-answer")]
    assert main(["report", *runs, "--out", str(tmp_path / "report")]) == 0
    report = (tmp_path / "report" / "report.md").read_text()
    assert "| shared-rule |" in report and "| instance-answer |" in report
    assert (tmp_path / "report" / "train_reverse_kl.png").exists()


def test_arm_errors_stop_before_any_work(tmp_path):
    exp = load_experiment("opsd")
    bad_ref = Experiment("x", "", "m", [], [Arm("a", exp.arms[1].manifest, ["model.path=${final:nobody}"])])
    with pytest.raises(ManifestError, match=r"arm 'a' uses \$\{final:nobody\}, but no earlier arm is named 'nobody'"):
        resolve(bad_ref, tmp_path)
    bad_key = Experiment("x", "", "m", [], [Arm("a", exp.arms[1].manifest, ["rollout.temprature=2"])])
    with pytest.raises(ManifestError, match=r"experiment x, arm 'a': .*did you mean 'rollout.temperature'"):
        resolve(bad_key, tmp_path)
    with pytest.raises(ManifestError, match=r"experiment 'nope': no configs/experiments/nope.yaml; known: .*opsd"):
        load_experiment("nope")


def test_report_on_a_missing_run(tmp_path, capsys):
    assert main(["report", str(tmp_path / "nothing")]) == 2
    assert "no metrics.jsonl" in capsys.readouterr().err


def test_teacher_choice_chains_grpo_teacher_into_opd(ray_session, tmp_path):
    """A multi-stage experiment at toy length: SFT student -> GRPO teacher from it -> OPD from that
    teacher, each stage's output named by the next; the mechanism-1 diagnostics are logged."""
    out = tmp_path / "exp"
    assert main(["experiment", "teacher-choice", "--out", str(out), "run.steps=2", "eval.size=8",
                 "eval.interval=0", "logging.tensorboard=false"]) == 0
    root = out / "teacher-choice"
    results = {r["arm"]: r for r in json.loads((root / "results.json").read_text())}
    assert list(results) == ["student", "grpo-teacher", "verbose-teacher", "opd-from-grpo-teacher",
                             "opd-from-verbose-teacher"]
    assert results["grpo-teacher"]["loss"] == "grpo" and results["student"]["stage"]
    manifest = (root / "runs" / "opd-from-grpo-teacher" / "manifest.yaml").read_text()
    assert f"path: {root / 'runs' / 'grpo-teacher' / 'final'}" in manifest
    steps = [json.loads(line) for line in (root / "runs" / "opd-from-verbose-teacher" / "metrics.jsonl").read_text().splitlines()]
    step = next(s for s in steps if "train/loss" in s)
    assert {"teacher/logprob_sampled", "teacher/rank_sampled", "teacher/entropy", "rollout/response_length",
            "rollout/repetition_3gram"} <= set(step)
    assert (root / "teacher_rank_sampled.png").exists()


def test_check_on_an_experiment_file_checks_every_arm(capsys):
    path = "configs/experiments/opsd.yaml"
    assert main(["check", path]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"opsd / {a.name}" for a in load_experiment("opsd").arms]
    assert all(": valid (" in line for line in lines) and "opd train configs/opsd/shared_rule.yaml" in lines[1]
    assert main(["check", path, "run.steps=0"]) == 2  # overrides reach every arm, as `opd experiment` passes them
    assert "experiment opsd, arm 'base': run.steps: must be > 0" in capsys.readouterr().err
    assert main(["check", path, "configs/opsd/base_sft.yaml"]) == 2
    assert "an experiment file is checked on its own" in capsys.readouterr().err
    assert main(["train", path]) == 2
    assert "is an experiment file (it lists arms); run it with `opd experiment" in capsys.readouterr().err


def test_experiments_by_path_and_arms_of_several_manifests(tmp_path, write_manifest):
    assert load_experiment("configs/experiments/opsd.yaml").name == "opsd"
    with pytest.raises(ManifestError, match="not an experiment file"):
        load_experiment(str(write_manifest()))
    small = tmp_path / "small.yaml"
    small.write_text("rollout: {max_new_tokens: 5}\n")
    exp_file = tmp_path / "mine.yaml"
    exp_file.write_text(f"arms:\n  - name: a\n    manifest: [{write_manifest()}, {small}]\n"
                        "    overrides: [run.steps=3]\n")
    exp = load_experiment(str(exp_file))
    ((arm, cfg),) = resolve(exp, tmp_path / "out")
    assert exp.name == "mine" and (cfg.rollout.max_new_tokens, cfg.run.steps) == (5, 3)
    assert arm.command() == f"opd train {write_manifest()} {small} run.steps=3"


def test_chat_math_experiment_runs_end_to_end_in_chat_format(ray_session, tmp_path):
    """`opd experiment chat-math` shrunk to 2 steps an arm: its prepare step writes the small-vocabulary
    tiny Qwen3 pair and the easier task from run.seed, the stages feed the OPD arm in chat format, and
    results.json / results.md carry every arm and the gap closed."""
    from tasks.chat_math import write_task
    from tasks.tiny_qwen3 import QWEN3_ROWS
    out = tmp_path / "exp"
    assert main(["experiment", "chat-math", "--out", str(out), "run.steps=2", "run.seed=1", "eval.size=4",
                 "eval.interval=0", "eval.stop_at_accuracy=null", "rollout.prompts_per_step=4",
                 "learner.micro_batch_size=4", "logging.tensorboard=false"]) == 0
    root = out / "chat-math"
    assert sorted(p.name for p in (root / "models").iterdir()) == ["student", "teacher"]
    for name in ("student", "teacher"):
        rows = json.loads((root / "models" / name / "config.json").read_text())["vocab_size"]
        assert rows < QWEN3_ROWS and rows % 64 == 0
    # the data follow run.seed and the experiment's prepare args (two-digit sums worked column by column, 64
    # held-out problems, OPD prompts over 400 more sums); no sum is in two splits, the OPD prompts carry no solution
    write_task(tmp_path / "seed1", n_eval=64, seed=1, opd_sums=400, style="column")
    for split in ("eval", "train", "opd_prompts"):
        assert (root / "data" / f"{split}.jsonl").read_text() == (tmp_path / "seed1" / f"{split}.jsonl").read_text()
    splits = {k: [json.loads(r) for r in (root / "data" / f"{k}.jsonl").read_text().splitlines()]
              for k in ("train", "eval", "opd_prompts")}
    assert all(r["solution"].startswith("Ones: ") and 20 <= int(r["answer"]) <= 198 for r in splits["train"])
    assert all(set(r) == {"messages", "answer"} for r in splits["opd_prompts"])
    sums = {k: {tuple(re.findall(r"\d+", r["messages"][0]["content"])) + (r["answer"],) for r in rows}
            for k, rows in splits.items()}
    assert len(sums["eval"]) == 64 and len(sums["opd_prompts"]) == 400
    assert not sums["eval"] & sums["train"] and not sums["opd_prompts"] & (sums["train"] | sums["eval"])

    results = json.loads((root / "results.json").read_text())
    assert [(r["arm"], r["stage"], r["loss"]) for r in results] == [
        ("teacher", True, "sft"), ("student", True, "sft"), ("opd", False, "full_reverse_kl")]
    for r in results:
        assert {"arm", "metric", "start", "end", "steps", "wall_s"} <= set(r) and r["steps"] == 2
        assert 0 <= r["start"] <= 1 and 0 <= r["end"] <= 1 and r["wall_s"] > 0
    teacher, _, opd = results
    assert "gap_closed" in opd and "gap_closed" not in teacher
    gap = teacher["end"] - opd["start"]
    assert opd["gap_closed"] == (pytest.approx((opd["end"] - opd["start"]) / gap) if gap > 0 else None)
    assert "gap closed by opd: " in (root / "results.md").read_text()

    manifest = (root / "runs" / "opd" / "manifest.yaml").read_text()
    assert f"path: {root / 'runs' / 'teacher' / 'final'}" in manifest
    assert f"train: {root / 'data' / 'opd_prompts.jsonl'}" in manifest
    for line in ("chat_template: true", "enable_thinking: false", "verifier: boxed_match", "samples_per_prompt: 4",
                 "temperature: 0.7"):
        assert line in manifest, line
    steps = [json.loads(line) for line in (root / "runs" / "opd" / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/pass@4" in s for s in steps) and any("train/reverse_kl" in s for s in steps)


def test_check_passes_on_the_chat_math_experiment(capsys):
    assert main(["check", "configs/experiments/chat-math.yaml"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split(":")[0] for line in lines] == [f"chat-math / {a}" for a in ("teacher", "student", "opd")]


def test_prepare_args_and_gap_to_are_checked(tmp_path):
    from launch.experiment import Prepare, add_gaps
    path = tmp_path / "e.yaml"
    arms = "arms:\n  - {name: t, manifest: configs/chat_math/teacher_sft.yaml}\n"
    path.write_text("prepare: [{call: tasks.tiny_qwen3:prepare_chat_math, args: {max_answer: 20}}]\ngap_to: t\n" + arms)
    exp = load_experiment(str(path))
    assert exp.prepare == [Prepare("tasks.tiny_qwen3:prepare_chat_math", {"max_answer": 20})] and exp.gap_to == "t"
    for bad in ("prepare: [tasks.tiny_qwen3.prepare_chat_math]", "prepare: [{call: a:b, args: {seed: 3}}]",
                "prepare: [{call: a:b, with: {}}]"):
        path.write_text(bad + "\n" + arms)
        with pytest.raises(ManifestError, match=r"prepare\[0\]: give \"module:function\""):
            load_experiment(str(path))
    path.write_text("gap_to: nobody\n" + arms)
    with pytest.raises(ManifestError, match="gap_to: 'nobody' is not an arm; name one of \\['t'\\]"):
        load_experiment(str(path))
    # the gap is measured from each arm's own start to the teacher's end; none where it starts level or above
    exp = Experiment("x", "", "m", [], [], gap_to="teacher")
    results = [{"arm": "teacher", "start": 0.0, "end": 0.8, "stage": True},
               {"arm": "a", "start": 0.2, "end": 0.5, "stage": False},
               {"arm": "b", "start": 0.9, "end": 0.9, "stage": False}]
    add_gaps(exp, results)
    assert results[1]["gap_closed"] == pytest.approx(0.5) and results[2]["gap_closed"] is None
    from launch.experiment import gap_lines
    assert gap_lines(exp, results).split("\n")[1::2][:2] == [
        "gap closed by a: 50.0% of the 60.0-point gap between its start (20.0%) and teacher (80.0%); it ended at 50.0%",
        "gap closed by b: none to close (it started level with or above teacher): between its start (90.0%) and "
        "teacher (80.0%); it ended at 90.0%"]


def test_multi_teacher_experiment_reports_every_arm_on_every_task(ray_session, tmp_path):
    """`opd experiment multi-teacher` at toy length: specialists and a mix teacher trained, the student
    distilled by the routed pair, the mix teacher and each specialist alone; one result per arm and task."""
    out = tmp_path / "exp"
    assert main(["experiment", "multi-teacher", "--out", str(out), "run.steps=2", "eval.size=8", "eval.stop_at_accuracy=null",
                 "eval.interval=0", "logging.tensorboard=false"]) == 0
    root = out / "multi-teacher"
    results = json.loads((root / "results.json").read_text())
    arms = ["addition-teacher", "reversal-teacher", "mix-teacher", "student", "routed", "mix-teacher-only",
            "addition-teacher-only", "reversal-teacher-only"]
    assert [(r["arm"], r["task"]) for r in results] == [(a, t) for a in arms for t in ("addition", "reversal")]
    for r in results:
        assert r["metric"] == f"eval/{r['task']}/accuracy" and r["steps"] == 2
        assert 0 <= r["start"] <= 1 and 0 <= r["end"] <= 1
    steps = [json.loads(line) for line in (root / "runs" / "routed" / "metrics.jsonl").read_text().splitlines()]
    step = next(s for s in steps if "train/loss" in s)
    assert step["teacher/addition/rows"] + step["teacher/reversal/rows"] == 64
    manifest = (root / "runs" / "routed" / "manifest.yaml").read_text()
    assert f"path: {root / 'runs' / 'reversal-teacher' / 'final'}" in manifest and "field: task" in manifest
    md = (root / "results.md").read_text()
    assert "| arm | addition: start -> end | reversal: start -> end |" in md and "| routed |" in md
    assert (root / "eval_reversal_accuracy.png").exists()
