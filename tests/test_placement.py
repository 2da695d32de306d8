"""Where actors run: the layout a manifest asks for, `opd check` on every shipped manifest, and
placement on a simulated two-node Ray cluster (pinned roles land on their nodes; a layout the
cluster cannot hold fails within the timeout, saying what was asked and what the cluster has)."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from launch.cli import main
from launch.manifest import load_manifest
from launch.placement import layout, unplaceable

REPO = Path(__file__).resolve().parents[1]


def test_layout_bundles_per_role(write_manifest):
    cfg = load_manifest(write_manifest(), ["cluster.mode=ray", "cluster.num_gpus=7", "rollout.engine=vllm",
                                           "rollout.num_actors=2", "rollout.vllm.tensor_parallel_size=2",
                                           "learner.num_ranks=2", "learner.micro_batch_size=2",
                                           "cluster.node_resources={rollout: rollout_node}"])
    lay = layout(cfg)
    assert [b["GPU"] for b in lay.bundles] == [1, 1, 2, 2, 1]  # learner, learner, rollout, rollout, teacher
    assert [b.get("rollout_node", 0) for b in lay.bundles] == [0, 0, 0.001, 0.001, 0]
    assert lay.gpus == 7 and [s.num_gpus for s in lay.rollout] == [2, 2]


def test_colocated_engines_share_the_learners_bundles(write_manifest):
    cfg = load_manifest(write_manifest(), ["cluster.mode=ray", "cluster.num_gpus=3", "cluster.colocate=true",
                                           "rollout.num_actors=2", "learner.num_ranks=2", "learner.micro_batch_size=2"])
    lay = layout(cfg)
    assert len(lay.bundles) == 3 and lay.gpus == 3  # two shared learner/rollout bundles + the teacher's
    assert [(s.bundle, s.num_gpus) for s in lay.rollout] == [(0, 0.5), (1, 0.5)]
    assert [(s.bundle, s.num_gpus) for s in lay.learner] == [(0, 0.5), (1, 0.5)]


def test_unplaceable_explains():
    assert unplaceable([{"GPU": 2}, {"GPU": 1}], [{"GPU": 2}, {"GPU": 1}]) is None
    assert "needs 4 GPU in all, the nodes have 3" in unplaceable([{"GPU": 2}, {"GPU": 2}], [{"GPU": 2}, {"GPU": 1}])
    assert "bundle 0 {'GPU': 2} fits on no node" in unplaceable([{"GPU": 2}, {"GPU": 1}], [{"GPU": 1}] * 3)


def test_opd_check_passes_every_shipped_manifest(capsys):
    """Experiment files included: `opd check` checks each of their arms."""
    # base.yaml is extended, cpu*.yaml are layered on an arm (tests/test_paper_cpu.py checks them so)
    manifests = [p for p in sorted((REPO / "configs").rglob("*.yaml"))
                 if p.name != "base.yaml" and not p.name.startswith("cpu")]
    assert len(manifests) >= 3 and any(p.parent.name == "experiments" for p in manifests)
    for path in manifests:
        assert main(["check", str(path)]) == 0, capsys.readouterr().err


def test_every_shipped_experiment_resolves(tmp_path):
    from launch.experiment import available, load_experiment, resolve
    names = available()
    assert {"opsd", "teacher-choice", "sft-stabilised"} <= set(names)
    for name in names:  # every arm's manifest and overrides load and validate, before any work
        assert len(resolve(load_experiment(name), tmp_path)) >= 3


def test_opd_check_names_the_broken_key_and_an_unholdable_layout(write_manifest, capsys):
    assert main(["check", str(write_manifest()), "rollout.vllm.max_logprobs=0", "rollout.engine=vllm"]) == 2
    assert "rollout.vllm.max_logprobs: must be > 0" in capsys.readouterr().err
    args = ["check", str(write_manifest()), "cluster.mode=ray", "cluster.num_gpus=4", "rollout.engine=vllm",
            "rollout.vllm.tensor_parallel_size=2"]
    assert main(args + ["--nodes", "2", "--gpus-per-node", "2"]) == 0
    assert main(args + ["--nodes", "1", "--gpus-per-node", "2"]) == 2
    assert "1 node(s) x 2 GPU x 64 CPU cannot hold the layout: the layout needs 4 GPU" in capsys.readouterr().err


TWO_NODES = """
import json, sys, time, ray
from ray.cluster_utils import Cluster
from launch.manifest import load_manifest
from launch.placement import Placement
cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 2, "resources": {"trainer_node": 10}})
rollout_node = cluster.add_node(num_cpus=2, resources={"rollout_node": 10})
ray.init(address=cluster.address)
manifest, out = sys.argv[1], {}
cfg = load_manifest(manifest, ["cluster.mode=ray", "algorithm=grpo", "loss.name=grpo", "teacher.kind=none",
                               "cluster.node_resources={learner: trainer_node, rollout: rollout_node}"])
p = Placement(cfg, timeout_s=30)
node_of = ray.remote(lambda: ray.get_runtime_context().get_node_id())
out["learner"] = ray.get(node_of.options(**p.options(p.layout.learner[0])).remote())
out["rollout"] = ray.get(node_of.options(**p.options(p.layout.rollout[0])).remote())
out["rollout_node"], out["head_node"] = rollout_node.node_id, cluster.head_node.node_id
p.remove()
cfg = load_manifest(manifest, ["cluster.mode=ray", "cluster.num_gpus=3"])  # GPUs this cluster lacks
t = time.time()
try:
    Placement(cfg, timeout_s=5)
except RuntimeError as e:
    out["error"], out["waited"] = str(e), time.time() - t
print("RESULT " + json.dumps(out))
ray.shutdown()
cluster.shutdown()
"""


@pytest.mark.slow  # starts a Ray cluster of its own (in a subprocess, which the tier rules in conftest.py cannot see)
def test_two_node_cluster_places_pinned_roles_and_fails_fast(write_manifest):
    """In a subprocess: a simulated cluster needs a Ray session of its own."""
    proc = subprocess.run([sys.executable, "-c", TWO_NODES, str(write_manifest())], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    line = [s for s in proc.stdout.splitlines() if s.startswith("RESULT ")]
    assert line, proc.stdout[-2000:] + proc.stderr[-3000:]
    out = json.loads(line[0][7:])
    assert out["learner"] == out["head_node"] and out["rollout"] == out["rollout_node"]
    assert out["waited"] < 20
    assert "could not hold" in out["error"] and "'GPU': 1" in out["error"] and "the cluster has" in out["error"]
