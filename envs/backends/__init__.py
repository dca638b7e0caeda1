"""Physics backends. Each is imported only when used, so one engine's absence never breaks the other."""
from __future__ import annotations

from envs.backends.base import PhysicsBackend

BACKENDS = ("mujoco", "pybullet")


def make_backend(name: str, **kwargs) -> PhysicsBackend:
    if name == "mujoco":
        from envs.backends.mujoco_backend import MujocoBackend
        return MujocoBackend(**kwargs)
    if name == "pybullet":
        from envs.backends.pybullet_backend import PybulletBackend
        return PybulletBackend(**kwargs)
    raise ValueError(f"unknown backend {name!r}; valid backends: {', '.join(BACKENDS)}")
