"""Rendered layouts with privileged object positions, for teaching vision towers where things are.

An episode shows one layout for its whole length, so a few hundred demonstrations show only a few
hundred layouts; a reset plus a render shows a new one in ~10 ms. `render_layouts` draws layouts
of a task (with the task's domain randomization), optionally moves the arm away from its home pose
so that it occludes objects as it does in episodes, and returns each front image with the position
of every object, keyed by what tells it apart in the image: its colour (`red`, `green`, `blue`,
`yellow`, the colours that instructions name), the colour and `_tray` for trays (SortByColor puts
each cube in the tray of its colour), or, for the gray fixtures, their kind.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np

from envs.tasks import COLORS, handle_position

SLOTS: tuple[str, ...] = (*COLORS, *(f"{c}_tray" for c in COLORS), "gray_tray", "drawer_handle")
_COLOR_TOLERANCE = 0.2  # domain randomization moves each channel by at most 0.06


def object_positions(env) -> tuple[np.ndarray, np.ndarray]:
    """(positions (len(SLOTS), 3) in metres, present (len(SLOTS),) bool) of the env's current scene."""
    positions = np.zeros((len(SLOTS), 3), dtype=np.float32)
    present = np.zeros(len(SLOTS), dtype=bool)
    kinds = {obj.name: obj.kind for obj in env.task.objects}
    for role, rgba in env.episode.rgba.items():
        distance = {name: float(np.abs(np.asarray(c[:3]) - np.asarray(rgba[:3])).max()) for name, c in COLORS.items()}
        color = min(distance, key=distance.get)
        position = env.sim.object_pose(role)[0]
        tray = "_tray" if kinds[role] == "tray" else ""
        if distance[color] < _COLOR_TOLERANCE:
            slot = SLOTS.index(color + tray)
        elif kinds[role] == "drawer":
            slot, position = SLOTS.index("drawer_handle"), handle_position(env.sim, role)
        elif tray:
            slot = SLOTS.index("gray_tray")
        else:
            raise ValueError(f"task {env.task.name}: object {role!r} (kind {kinds[role]!r}, rgba {rgba}) has no "
                             f"localization slot; slots: {', '.join(SLOTS)}")
        if present[slot]:
            raise ValueError(f"task {env.task.name}: two objects share the localization slot {SLOTS[slot]!r}")
        positions[slot], present[slot] = position, True
    return positions, present


def render_layouts(task: str, seeds: Sequence[int], backend: str = "mujoco", image_size: int = 112,
                   randomization: Any = "default", arm_steps: int = 10) -> dict[str, np.ndarray]:
    """One front image per seed, with `object_positions` after the arm moved. The arm makes up to
    `arm_steps` 3 cm steps in one random direction (gripper open or closed at random) before the
    image is taken; objects it pushes are read where they end up."""
    from envs.env import TabletopEnv

    env = TabletopEnv(task, backend=backend, image_size=image_size, randomization=randomization)
    images, positions, present = [], [], []
    try:
        for seed in seeds:
            obs, _ = env.reset(seed=int(seed))
            rng = np.random.default_rng(int(seed))
            moves = int(rng.integers(0, arm_steps + 1)) if arm_steps > 0 else 0
            direction = rng.normal(size=3)
            direction /= np.linalg.norm(direction)
            gripper = float(rng.integers(0, 2))
            for _ in range(moves):
                action = np.zeros(7, dtype=np.float32)
                action[:3] = 0.03 * direction + rng.normal(0.0, 0.01, 3)
                action[6] = gripper
                obs, *_ = env.step(action)
            where, found = object_positions(env)
            images.append(obs["image"])
            positions.append(where)
            present.append(found)
    finally:
        env.close()
    return {"images": np.stack(images), "positions": np.stack(positions), "present": np.stack(present)}
