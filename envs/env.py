"""`TabletopEnv`: one language-conditioned task on a Franka Panda, on MuJoCo or PyBullet.

Action (7,), float32, the Open X-Embodiment convention: [dx, dy, dz, droll, dpitch, dyaw,
gripper]. Deltas move the tool centre point in the robot base frame per control step
(metres; radians as extrinsic roll-pitch-yaw applied on the left of the current
orientation); gripper 1 = open, 0 = closed. Values outside `ACTION_LOW`..`ACTION_HIGH`
are clipped to those bounds; a wrong shape, NaN or inf raises ValueError.
"""
from __future__ import annotations

import string
from collections.abc import Mapping
from typing import Any

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from envs.backends import BACKENDS, make_backend
from envs.experts import ScriptedExpert
from envs.randomization import RandomizationConfig, apply_randomization
from envs.scene import GRIPPER_MAX_WIDTH, euler_to_matrix, matrix_to_quat, quat_to_matrix
from envs.tasks import PlacementError, make_task

ACTION_LOW = np.array([-0.05, -0.05, -0.05, -0.25, -0.25, -0.25, 0.0], dtype=np.float32)
ACTION_HIGH = np.array([0.05, 0.05, 0.05, 0.25, 0.25, 0.25, 1.0], dtype=np.float32)
STATE_DIM = 8  # tcp position 3, tcp quaternion xyzw 4, gripper opening in [0, 1] 1
STATE_LOW = np.array([-2, -2, -2, -1, -1, -1, -1, 0], dtype=np.float32)
STATE_HIGH = np.array([2, 2, 2, 1, 1, 1, 1, 1], dtype=np.float32)
INSTRUCTION_CHARSET = string.ascii_letters + string.digits + " ,.'-"
INSTRUCTION_MAX_LENGTH = 256


def _image_shape(image_size) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


class TabletopEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, task: str, backend: str = "mujoco", randomization: Any = "default",
                 image_size: int | tuple[int, int] = 224, wrist_camera: bool = False, control_hz: float = 10.0,
                 render_mode: str | None = None, max_episode_steps: int | None = None,
                 steps_after_success: int | Mapping[str, int] = 0, clause_pause: int = 0):
        if backend not in BACKENDS:
            raise ValueError(f"unknown backend {backend!r}; valid backends: {', '.join(BACKENDS)}")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"unsupported render_mode {render_mode!r}; valid: 'rgb_array' or None")
        self.backend_name = backend
        self.randomization = RandomizationConfig.from_any(randomization)
        self.image_shape = _image_shape(image_size)
        self.wrist_camera = wrist_camera
        self.control_hz = float(control_hz)
        self.render_mode = render_mode
        self._max_episode_steps_arg = max_episode_steps
        # Recording demonstrations: the episode runs on this many steps past its first success, so that a
        # motion that crosses a threshold (a cube lifted past 10 cm) is not cut there. Evaluation keeps 0.
        # A {task: n} mapping sets it per task (0 for the tasks it does not name), following `set_task`.
        by_task = isinstance(steps_after_success, Mapping)
        for n in steps_after_success.values() if by_task else [steps_after_success]:
            if int(n) < 0:
                raise ValueError(f"steps_after_success must be >= 0, got {n}")
        self._steps_after_success = dict(steps_after_success) if by_task else int(steps_after_success)
        # Recording clause-labelled demonstrations: the expert stands still this many steps after each clause of
        # a multi-step instruction but the last, and `info["clause"]` moves on after them, so that a policy
        # prompted with a clause sees its done state (a lit button) labelled "stand still".
        if int(clause_pause) < 0:
            raise ValueError(f"clause_pause must be >= 0, got {clause_pause}")
        self.clause_pause = int(clause_pause)
        self._pause_left, self._clause_shown, self._gripper = 0, 0, 1.0
        self._succeeded_at: int | None = None
        self.sim = None
        self.set_task(task)

        h, w = self.image_shape
        obs = {"image": spaces.Box(0, 255, (h, w, 3), np.uint8)}
        if wrist_camera:
            obs["wrist_image"] = spaces.Box(0, 255, (h, w, 3), np.uint8)
        obs["state"] = spaces.Box(STATE_LOW, STATE_HIGH, dtype=np.float32)
        obs["instruction"] = spaces.Text(INSTRUCTION_MAX_LENGTH, min_length=1, charset=INSTRUCTION_CHARSET)
        self.observation_space = spaces.Dict(obs)
        self.action_space = spaces.Box(ACTION_LOW, ACTION_HIGH, dtype=np.float32)
        self.seed_used: int | None = None
        self._steps = 0

    def set_task(self, task: str) -> None:
        """Switch this env to another task of the same observation and action spaces (its own scene,
        built afresh, and episode length); the next call must be `reset`. Evaluation keeps its worker
        processes across tasks this way instead of starting new ones per task."""
        new_task = make_task(task)
        if self.sim is not None and new_task.name == self.task.name:
            return
        if self.sim is not None:
            self.sim.close()
        self.task = new_task
        self.max_episode_steps = int(self._max_episode_steps_arg or self.task.max_steps)
        after = self._steps_after_success
        self.steps_after_success = int(after.get(task, 0) if isinstance(after, dict) else after)
        self.sim = make_backend(self.backend_name, image_size=self.image_shape, wrist_camera=self.wrist_camera,
                                control_hz=self.control_hz)
        self.sim.build(self.task.scene)
        self.episode, self.instruction = None, ""
        self._expert: ScriptedExpert | None = None
        self._last_image: np.ndarray | None = None

    # -- gymnasium API -------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        # Every episode is identified by one integer; unseeded resets draw it from the env's rng.
        self.seed_used = int(seed) if seed is not None else int(self.np_random.integers(2**62))
        # Separate streams keep the layout independent of the randomization config.
        layout_rng, random_rng = (np.random.default_rng(s) for s in np.random.SeedSequence(self.seed_used).spawn(2))
        try:
            layout = self.task.sample_layout(layout_rng)
        except PlacementError as err:
            raise PlacementError(f"task {self.task.name}, seed {self.seed_used}: {err}") from None
        self.episode = apply_randomization(layout.episode(), self.task.scene, self.randomization, random_rng)
        self.instruction = self.task.instruction(layout)
        self.task.reset()
        self.sim.reset(self.episode)
        self._steps = 0
        self._succeeded_at = None
        self._pause_left, self._clause_shown, self._gripper = 0, 0, 1.0
        self._expert = ScriptedExpert(self.task, self.sim)
        obs = self.observe()
        return obs, self._info(success=False)

    def step(self, action):
        if self.step_physics(action) and self._succeeded_at is None:
            self._succeeded_at = self._steps
        if self._pause_left > 0:  # this step was one of the pause's
            self._pause_left -= 1
            if self._pause_left == 0:
                self._clause_shown = self.task.clause
        elif self.task.clause > self._clause_shown:
            if self.clause_pause:
                self._pause_left = self.clause_pause
            else:
                self._clause_shown = self.task.clause
        obs = self.observe()
        succeeded = self._succeeded_at is not None
        terminated = succeeded and (self._steps - self._succeeded_at >= self.steps_after_success
                                    or self._steps >= self.max_episode_steps)
        truncated = self._steps >= self.max_episode_steps and not succeeded
        return obs, float(terminated), terminated, truncated, self._info(succeeded)

    def step_physics(self, action) -> bool:
        """Apply one action without rendering an observation (tools that image only some steps);
        returns whether the task succeeded. `step` is this plus the observation."""
        action = self.validate_action(action)
        pos, quat = self.sim.ee_pose()
        target_pos = pos + action[:3]
        target_rot = euler_to_matrix(*action[3:6]) @ quat_to_matrix(quat)
        self.sim.apply_action(target_pos, matrix_to_quat(target_rot), float(action[6]))
        self._gripper = float(action[6])
        self.task.update(self.sim)
        self._steps += 1
        return bool(self.task.success(self.sim))

    def observe(self) -> dict:
        """The observation of the current state, rendered now (what `step` returns after `step_physics`)."""
        self._last_image = self.sim.render("front")
        obs = {"image": self._last_image}
        if self.wrist_camera:
            obs["wrist_image"] = self.sim.render("wrist")
        obs["state"] = self.state()
        obs["instruction"] = self.instruction
        return obs

    def render(self):
        if self.render_mode != "rgb_array":
            return None
        return self._last_image if self._last_image is not None else self.sim.render("front")

    def close(self):
        self.sim.close()

    # -- helpers -------------------------------------------------------------------------
    @staticmethod
    def validate_action(action) -> np.ndarray:
        """Check shape and finiteness, then clip to the documented bounds."""
        arr = np.asarray(action, dtype=np.float64)
        if arr.shape != (7,):
            raise ValueError(f"action must have shape (7,) = [dx, dy, dz, droll, dpitch, dyaw, gripper]; got shape {arr.shape}")
        if not np.all(np.isfinite(arr)):
            raise ValueError(f"action of shape (7,) contains NaN or inf: {arr.tolist()}")
        return np.clip(arr, ACTION_LOW, ACTION_HIGH)

    def expert_action(self) -> np.ndarray:
        """The scripted expert's next action from privileged state (call after `reset`)."""
        if self._expert is None:
            raise RuntimeError("call reset() before expert_action()")
        if self._pause_left > 0:  # standing still after a clause (clause_pause); the script waits
            return np.array([0, 0, 0, 0, 0, 0, self._gripper], dtype=np.float32)
        return self._expert.act()

    def state(self) -> np.ndarray:
        pos, quat = self.sim.ee_pose()
        grip = self.sim.gripper_opening() / GRIPPER_MAX_WIDTH
        return np.concatenate([pos, quat, [grip]]).astype(np.float32)

    def _info(self, success: bool) -> dict:
        return {"success": success, "is_success": success, "task": self.task.name, "instruction": self.instruction,
                "steps": self._steps, "stages": self.stages_reached(),
                "clause": self._clause_shown}

    def stages_reached(self) -> dict[str, bool]:
        """For each of the task's named stages, whether this episode has reached it so far."""
        return {name: name in self.task.reached for name in self.task.stage_names}

    def episode_metadata(self) -> dict:
        """What identifies this episode exactly: for RLDS metadata and result files."""
        return {"task": self.task.name, "backend": self.backend_name, "seed": self.seed_used,
                "instruction": self.instruction, "randomization": self.randomization.to_dict(),
                "control_hz": self.control_hz}
