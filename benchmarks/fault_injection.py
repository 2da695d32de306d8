"""Kill rollout engines and teachers at random steps of a demo-sized OPD run; the run must survive
every fault and log exactly the metrics of a clean run.

    python benchmarks/fault_injection.py                       # 12 steps, 4 faults, HF engines (CPU)
    python benchmarks/fault_injection.py --steps 20 --faults 6 --seed 3 rollout.engine=vllm

Tiny models and the addition task are written to a temporary folder (as `opd make-tiny` does). Two
runs in one local Ray session, same manifest: a clean one, then one where, at randomly chosen steps, a
random rollout engine or teacher is `ray.kill`ed either just before its call or a random few
milliseconds into it. Prints steps completed, faults injected, faults survived (actors the run replaced)
and whether the faulty run's per-step metrics (everything but timings) equal the clean run's. Sampling
seeds are a function of (run seed, step, engine), and a replacement receives the current weights, so
they should. Exit status 1 if not.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from opd.env import set_quiet_env  # noqa: E402  (after the path above)

set_quiet_env()
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def manifest(root: Path, models: dict, data: dict, name: str, steps: int) -> dict:
    return {"algorithm": "opd",
            "run": {"name": name, "output_dir": str(root / "runs"), "steps": steps},
            "cluster": {"mode": "local", "num_cpus": 2},
            "model": {"path": str(models["tiny"])},
            "teacher": {"kind": "hf", "path": str(models["tiny"]), "num_actors": 2},
            "rollout": {"num_actors": 2, "prompts_per_step": 8, "samples_per_prompt": 2, "max_new_tokens": 4},
            "learner": {"micro_batch_size": 8, "lr": 1e-3},
            "loss": {"name": "topk_reverse_kl_sg", "params": {"k": 4}},
            "data": {"train": str(data["train"]), "eval": str(data["eval"])},
            "eval": {"interval": 4, "size": 16},
            "logging": {"tensorboard": False, "console": False}}


class Injector:
    """At each planned step, kill one actor of the planned role, before or during the step's call."""

    def __init__(self, plan: dict[int, tuple[str, float]], rng: random.Random):
        self.plan, self.rng, self.step, self.injected = plan, rng, 0, []

    def install(self) -> None:
        import launch.session
        from launch.cluster import RolloutGroup, TeacherGroup
        sampling_at = launch.session.Setup.sampling_at

        def tracking(setup, step):
            self.step = step
            return sampling_at(setup, step)
        launch.session.Setup.sampling_at = tracking
        for cls, method, role in ((RolloutGroup, "generate", "rollout"), (TeacherGroup, "score", "teacher")):
            setattr(cls, method, self._wrap(getattr(cls, method), role))

    def _wrap(self, call, role: str):
        import ray

        def wrapped(group, *args, **kw):
            planned = self.plan.get(self.step)
            if not planned or planned[0] != role:
                return call(group, *args, **kw)
            del self.plan[self.step]
            i, delay = self.rng.randrange(len(group.actors)), planned[1]
            victim = group.actors[i]
            self.injected.append(f"step {self.step}: {role} {i} {'before' if delay == 0 else f'{delay * 1000:.0f} ms into'} its call")
            kill = threading.Timer(delay, ray.kill, (victim,), {"no_restart": True})
            kill.start()
            if delay == 0:
                kill.join()
            try:
                return call(group, *args, **kw)
            finally:
                kill.join()  # a kill that lands after the call is found by the next one
        return wrapped


def comparable(run_dir: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if not k.startswith(("time/", "perf/", "faults/"))} for r in rows]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--faults", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", help="manifest key=value overrides for both runs")
    args = p.parse_args(argv)
    import transformers
    import yaml
    from launch.manifest import load_manifest
    from launch.driver import train
    from tasks.arithmetic import write_task
    from tasks.tiny import write_tiny_models

    transformers.utils.logging.disable_progress_bar()
    root = Path(tempfile.mkdtemp(prefix="opd-faults-"))
    models = write_tiny_models(root / "models")
    data = write_task(root / "data", digits=2, n_train=512, n_eval=32)
    rng = random.Random(args.seed)
    # Steps 1..steps-1 (a kill after the last call would go unnoticed); a delay of 0 kills before the call.
    steps = rng.sample(range(1, args.steps), min(args.faults, args.steps - 1))
    plan = {s: (rng.choice(["rollout", "teacher"]), rng.choice([0.0, rng.uniform(0.001, 0.05)])) for s in steps}

    summaries = {}
    for name in ("clean", "faulty"):
        path = root / f"{name}.yaml"
        path.write_text(yaml.safe_dump(manifest(root, models, data, name, args.steps)))
        if name == "faulty":
            injector = Injector(dict(plan), rng)
            injector.install()
        t = time.time()
        summaries[name] = train(load_manifest(path, args.overrides))
        print(f"{name}: {args.steps} steps in {time.time() - t:.1f}s", flush=True)
    for line in injector.injected:
        print(f"  killed {line}")
    same = comparable(root / "runs" / "faulty") == comparable(root / "runs" / "clean")
    faulty = summaries["faulty"]
    print(json.dumps({"steps_completed": faulty["steps"], "faults_injected": len(injector.injected),
                      "faults_survived": faulty["actor_restarts"], "metrics_equal_clean_run": same,
                      "end_eval_accuracy": [summaries["clean"]["end_eval_accuracy"], faulty["end_eval_accuracy"]]}))
    return 0 if same and faulty["actor_restarts"] == len(injector.injected) else 1


if __name__ == "__main__":
    sys.exit(main())
