"""The interface every physics backend implements. Tasks and experts only talk to this."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np

from envs.scene import EpisodeConfig, SceneSpec


class PhysicsBackend(ABC):
    """A Franka Panda on a table with a task's objects, stepped at the control rate.

    Lifecycle: `__init__` -> `build(scene)` once -> (`reset(episode)` -> `apply_action`*)* -> `close`.
    Given the same `EpisodeConfig` and the same actions, a backend must reproduce the same
    states and the same images bit for bit on the same machine.
    """

    name: str

    def __init__(self, image_size: tuple[int, int] = (224, 224), wrist_camera: bool = False,
                 control_hz: float = 10.0):
        self.image_size = tuple(image_size)  # (height, width)
        self.wrist_camera = wrist_camera
        self.control_hz = control_hz

    @abstractmethod
    def build(self, scene: SceneSpec) -> None:
        """Create the arm, the table and the scene's objects. Called once."""

    @abstractmethod
    def reset(self, episode: EpisodeConfig) -> None:
        """Arm at HOME_JOINTS with the gripper open; objects, colours, lights, camera and
        physical parameters as `episode` says; objects settled at rest."""

    @abstractmethod
    def apply_action(self, target_pos: np.ndarray, target_quat: np.ndarray, gripper: float) -> None:
        """Drive the gripper's tool centre point towards the target pose through inverse
        kinematics for one control period (1 / control_hz s of simulated time, physics
        sub-steps inside). `gripper` in [0, 1]: 1 = fully open (GRIPPER_MAX_WIDTH), 0 = closed."""

    @abstractmethod
    def ee_pose(self) -> tuple[np.ndarray, np.ndarray]:
        """Tool centre point (between the fingertips): position (3,), quaternion xyzw (4,)."""

    @abstractmethod
    def gripper_opening(self) -> float:
        """Distance between the fingers in metres, 0 .. GRIPPER_MAX_WIDTH."""

    @abstractmethod
    def object_pose(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """Position (3,) and quaternion xyzw (4,) of a scene object's base frame."""

    @abstractmethod
    def joint_position(self, name: str) -> float:
        """Drawer opening (m, >= 0) or button press depth (m, <= 0) of a scene object."""

    @abstractmethod
    def light_button(self, name: str, lit: bool = True) -> None:
        """Light (or darken) a button's base ring, as a latching button shows it was pressed; reset darkens it."""

    @abstractmethod
    def grasped(self, name: str) -> bool:
        """True when both fingers touch the object."""

    @abstractmethod
    def render(self, camera: str = "front") -> np.ndarray:
        """uint8 (H, W, 3) image from the 'front' (third-person) or 'wrist' camera."""

    @abstractmethod
    def physics_parameters(self) -> dict[str, float]:
        """Current physical parameters actually in the simulator, for tests of randomization:
        '{name}/mass', '{name}/friction' for boxes, 'damping' for the arm's first joint."""

    def close(self) -> None:
        pass
