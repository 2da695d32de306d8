"""How a registered actor kind says it starts: the class and arguments, built under Ray by the launcher or
in-process by a test. Shared by the rollout-engine kinds (actors/kinds.py) and the teacher kinds
(teachers/kinds.py), which may not import each other (the layer contracts in pyproject.toml)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class ActorCall:
    """An actor to build: `cls(*args, **kwargs)` in-process, or under Ray as
    `ray.remote(cls).options(...).remote(*args, **kwargs)`."""
    cls: type
    args: tuple = ()
    kwargs: dict = field(default_factory=dict)

    def build(self):
        return self.cls(*self.args, **self.kwargs)
