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
MAX_NAMED = 4  # the most objects an instruction names (SortByColor: two cubes, two trays)


def object_slots(env) -> dict[str, int]:
    """Each object of the env's current scene → its index in SLOTS."""
    slots: dict[str, int] = {}
    kinds = {obj.name: obj.kind for obj in env.task.objects}
    for role, rgba in env.episode.rgba.items():
        distance = {name: float(np.abs(np.asarray(c[:3]) - np.asarray(rgba[:3])).max()) for name, c in COLORS.items()}
        color = min(distance, key=distance.get)
        tray = "_tray" if kinds[role] == "tray" else ""
        if distance[color] < _COLOR_TOLERANCE:
            slot = SLOTS.index(color + tray)
        elif kinds[role] == "drawer":
            slot = SLOTS.index("drawer_handle")
        elif tray:
            slot = SLOTS.index("gray_tray")
        else:
            raise ValueError(f"task {env.task.name}: object {role!r} (kind {kinds[role]!r}, rgba {rgba}) has no "
                             f"localization slot; slots: {', '.join(SLOTS)}")
        if slot in slots.values():
            raise ValueError(f"task {env.task.name}: two objects share the localization slot {SLOTS[slot]!r}")
        slots[role] = slot
    return slots


def object_positions(env) -> tuple[np.ndarray, np.ndarray]:
    """(positions (len(SLOTS), 3) in metres, present (len(SLOTS),) bool) of the env's current scene."""
    positions = np.zeros((len(SLOTS), 3), dtype=np.float32)
    present = np.zeros(len(SLOTS), dtype=bool)
    kinds = {obj.name: obj.kind for obj in env.task.objects}
    for role, slot in object_slots(env).items():
        positions[slot] = handle_position(env.sim, role) if kinds[role] == "drawer" else env.sim.object_pose(role)[0]
        present[slot] = True
    return positions, present


def named_slots(env, roles: Sequence[str] | None = None) -> np.ndarray:
    """(MAX_NAMED,) int: the slot of each object the instruction names (or of `roles`), in its order; -1 past
    the last."""
    slots = object_slots(env)
    named = np.full(MAX_NAMED, -1, dtype=np.int64)
    for i, role in enumerate(env.task.named_objects if roles is None else roles):
        named[i] = slots[role]
    return named


def instruction_examples(env) -> list[tuple[str, np.ndarray]]:
    """What the instruction grounding learns from the env's current episode: its instruction and the named
    objects' slots, then, for a multi-step task, each clause (`Task.clauses`) and its objects."""
    examples = [(env.instruction, named_slots(env))]
    if env.task.num_clauses > 1:
        examples += [(text, named_slots(env, roles))
                     for text, roles in zip(env.task.clauses(env.instruction), env.task.clause_named_objects)]
    return examples


ARM_MOTIONS = ("random", "expert")


def render_layouts(task: str, seeds: Sequence[int], backend: str = "mujoco", image_size: int = 112,
                   randomization: Any = "default", arm_steps: int = 10, arm: str = "random",
                   expert_noise: float = 0.01, wrist_camera: bool = False) -> dict[str, np.ndarray]:
    """One front image per seed (and, with `wrist_camera`, the wrist camera's), with the robot state,
    `object_positions`, the instruction and `named_slots` after the arm moved.

    arm="random": up to `arm_steps` 3 cm steps in one random direction (gripper open or closed at
    random). arm="expert": the scripted expert (DART noise of `expert_noise` m on the executed
    motion) runs for a random number of steps in [0, 4 * arm_steps], unrendered, so that the arm is
    at, around or holding the objects as in demonstrations. Objects the arm moves are read where
    they end up."""
    from envs.env import TabletopEnv

    if arm not in ARM_MOTIONS:
        raise ValueError(f"unknown arm motion {arm!r}; valid: {', '.join(ARM_MOTIONS)}")
    env = TabletopEnv(task, backend=backend, image_size=image_size, randomization=randomization,
                      wrist_camera=wrist_camera)
    out = {key: [] for key in ("images", "states", "positions", "present", "instructions", "named",
                               "grounding_texts", "grounding_named")}
    if wrist_camera:
        out["wrist_images"] = []
    try:
        for seed in seeds:
            obs, _ = env.reset(seed=int(seed))
            rng = np.random.default_rng(int(seed))
            moved = False
            if arm == "random":
                moves = int(rng.integers(0, arm_steps + 1)) if arm_steps > 0 else 0
                direction = rng.normal(size=3)
                direction /= np.linalg.norm(direction)
                gripper = float(rng.integers(0, 2))
                for _ in range(moves):
                    action = np.zeros(7, dtype=np.float32)
                    action[:3] = 0.03 * direction + rng.normal(0.0, 0.01, 3)
                    action[6] = gripper
                    env.step_physics(action)
                    moved = True
            else:
                for _ in range(int(rng.integers(0, 4 * arm_steps + 1))):
                    action = env.expert_action()
                    action[:3] += rng.normal(0.0, expert_noise, 3)
                    moved = True
                    if env.step_physics(action):
                        break
            where, found = object_positions(env)
            if moved:
                obs = env.observe()
            out["images"].append(obs["image"])
            if wrist_camera:
                out["wrist_images"].append(obs["wrist_image"])
            out["states"].append(obs["state"])
            out["positions"].append(where)
            out["present"].append(found)
            out["instructions"].append(env.instruction)
            out["named"].append(named_slots(env))
            for text, named in instruction_examples(env):
                out["grounding_texts"].append(text)
                out["grounding_named"].append(named)
    finally:
        env.close()
    return {key: np.array(value) if key in ("instructions", "grounding_texts") else np.stack(value)
            for key, value in out.items()}
