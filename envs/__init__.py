"""Simulated tabletop task suites on MuJoCo and PyBullet, through the gymnasium API.

Importing this package registers one gymnasium id per task, e.g. `embodied/PickCube-v0`:

    import gymnasium as gym, envs
    env = gym.make("embodied/PickCube-v0", backend="pybullet", render_mode="rgb_array")
"""
from __future__ import annotations

import gymnasium as gym

from envs.tasks import TASKS

ENV_IDS = {name: f"embodied/{name}-v0" for name in TASKS}


def _register() -> None:
    for name, env_id in ENV_IDS.items():
        if env_id not in gym.registry:
            # The env enforces each task's own episode length, so no TimeLimit wrapper is added.
            gym.register(id=env_id, entry_point="envs.env:TabletopEnv", kwargs={"task": name},
                         disable_env_checker=True)


_register()


def make_env(task: str, **kwargs):
    """`gym.make` by task name, with a clear error for unknown tasks."""
    if task not in ENV_IDS:
        raise ValueError(f"unknown task {task!r}; valid tasks: {', '.join(ENV_IDS)}")
    return gym.make(ENV_IDS[task], **kwargs)
