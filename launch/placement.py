"""Where every actor runs: the layout a manifest asks for, checked against the GPUs it grants,
and one Ray placement group that holds it (or fails within a timeout, saying why).

Bundles, in order: learner ranks, then rollout engines, then teachers (training first, as slime
orders them, so PACK puts the learner's ranks together). `cluster.node_resources` pins a role to
nodes that advertise a custom resource; `cluster.strategy` is Ray's (PACK by default). A vLLM engine with tensor parallelism t
takes one bundle of t GPUs (its workers are processes of that actor, on one node). Colocated
rollout engines take no bundle of their own: engine i shares learner rank i's GPU.
"""
from __future__ import annotations

from dataclasses import dataclass

from actors.kinds import engine_kind
from launch.config import ExperimentConfig, ManifestError
from launch.routing import teacher_specs
from teachers.kinds import kind_of


@dataclass
class Slot:
    """One actor's claim: which bundle, and how much of it (fractions when two actors share one)."""
    bundle: int
    num_cpus: float
    num_gpus: float


@dataclass
class Layout:
    bundles: list[dict[str, float]]
    learner: list[Slot]
    rollout: list[Slot]
    teacher: list[Slot]
    # teacher's slots per teacher of launch.routing.teacher_specs, in its order (one list for `teacher:`)
    teacher_groups: list[list[Slot]]

    @property
    def gpus(self) -> float:
        return sum(b.get("GPU", 0) for b in self.bundles)

    def describe(self) -> str:
        def gpus(slots):
            return sum(s.num_gpus for s in slots)
        return (f"{len(self.learner)} learner rank(s) {gpus(self.learner):g} GPU, {len(self.rollout)} rollout "
                f"engine(s) {gpus(self.rollout):g} GPU, {len(self.teacher)} teacher(s) {gpus(self.teacher):g} GPU")


def engine_gpus(cfg: ExperimentConfig, side: str, teacher=None) -> int:
    """GPUs one rollout engine / teacher occupies (`teacher`: which TeacherConfig; default `teacher:`)."""
    if side == "rollout":
        return engine_kind(cfg.rollout.engine).gpus(cfg.rollout)
    tc = teacher or cfg.teacher
    kind = kind_of(tc)
    return kind.gpus(tc) if kind else 1


def layout(cfg: ExperimentConfig) -> Layout:
    gpu = cfg.cluster.num_gpus > 0
    has_teacher = cfg.algorithm == "opd"
    n_learner, n_rollout = cfg.learner.num_ranks, cfg.rollout.num_actors  # SFT runs still evaluate
    teachers = [t.config for t in teacher_specs(cfg)] if has_teacher else []
    n_teacher = sum(t.num_actors for t in teachers)
    colocate = cfg.cluster.colocate and n_rollout > 0
    n_bundles = n_learner + (0 if colocate else n_rollout) + n_teacher
    # Local mode shares the machine's CPUs out (Ray's CPU counts are logical); a cluster gives each 1.
    cpu = cfg.cluster.num_cpus / n_bundles if cfg.cluster.mode == "local" else 1.0
    bundles: list[dict[str, float]] = []
    pins = cfg.cluster.node_resources

    def add(num_gpus: int, role: str) -> int:
        bundles.append({"CPU": cpu, **({"GPU": num_gpus} if gpu else {}), **({pins[role]: 0.001} if role in pins else {})})
        return len(bundles) - 1

    learner = [Slot(add(1, "learner"), cpu, 1.0 if gpu else 0.0) for _ in range(n_learner)]
    if colocate:  # half of each learner bundle to the learner, half to its engine
        for s in learner:
            s.num_cpus, s.num_gpus = cpu / 2, 0.5
        rollout = [Slot(s.bundle, cpu / 2, 0.5) for s in learner]
    else:
        g = engine_gpus(cfg, "rollout")
        rollout = [Slot(add(g, "rollout"), cpu, g if gpu else 0) for _ in range(n_rollout)]
    groups = []
    for tc in teachers:
        g = engine_gpus(cfg, "teacher", tc)
        groups.append([Slot(add(g, "teacher"), cpu, g if gpu else 0) for _ in range(tc.num_actors)])
    return Layout(bundles, learner, rollout, [s for group in groups for s in group], groups)


def check_resources(cfg: ExperimentConfig) -> None:
    """The layout must fit in cluster.num_gpus (checked before any work, on any machine)."""
    if cfg.cluster.num_gpus == 0:
        return
    lay = layout(cfg)
    if lay.gpus > cfg.cluster.num_gpus:
        raise ManifestError(f"cluster.num_gpus: {cfg.cluster.num_gpus}, but the layout needs {lay.gpus:g} "
                            f"({lay.describe()}); raise cluster.num_gpus, use fewer actors, or set "
                            "cluster.colocate: true to share the learner's GPUs with the rollout engines")


class Placement:
    """The run's placement group. `options(slot)` gives the Ray actor options for one slot."""

    def __init__(self, cfg: ExperimentConfig, timeout_s: float = 120.0):
        import ray
        from ray.util.placement_group import placement_group, remove_placement_group
        self.layout = layout(cfg)
        self.pg = placement_group(self.layout.bundles, strategy=cfg.cluster.strategy)
        ready, _ = ray.wait([self.pg.ready()], timeout=timeout_s)
        if not ready:
            remove_placement_group(self.pg)
            raise RuntimeError(
                f"placement: the cluster could not hold {self.layout.bundles} within {timeout_s:g}s "
                f"({self.layout.describe()}); the cluster has {ray.cluster_resources()} of which "
                f"{ray.available_resources()} are free")

    def options(self, slot: Slot) -> dict:
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy
        return {"num_cpus": slot.num_cpus, "num_gpus": slot.num_gpus,
                "scheduling_strategy": PlacementGroupSchedulingStrategy(
                    placement_group=self.pg, placement_group_bundle_index=slot.bundle)}

    def remove(self) -> None:
        from ray.util.placement_group import remove_placement_group
        remove_placement_group(self.pg)


def unplaceable(bundles: list[dict[str, float]], nodes: list[dict[str, float]]) -> str | None:
    """Can `nodes` (each a resource dict) hold every bundle, each bundle on one node? First-fit
    decreasing, as close to Ray's PACK as a laptop can check. None when they fit, else why not."""
    for res in ("GPU", "CPU"):
        need, have = sum(b.get(res, 0) for b in bundles), sum(n.get(res, 0) for n in nodes)
        if need > have:
            return f"the layout needs {need:g} {res} in all, the nodes have {have:g}"
    free = [dict(n) for n in nodes]
    for i, bundle in sorted(enumerate(bundles), key=lambda ib: -ib[1].get("GPU", 0)):
        for node in free:
            if all(node.get(k, 0) >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] -= v
                break
        else:
            return f"bundle {i} {bundle} fits on no node (free after the bundles before it: {free})"
    return None
