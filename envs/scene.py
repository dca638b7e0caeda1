"""Backend-agnostic description of a tabletop scene and of one episode's draw.

Frame: world z up, table top at z = 0, robot base at the origin facing +x.
Quaternions are (x, y, z, w) everywhere in this package.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

TABLE_HALF_EXTENTS = (0.6, 0.7, 0.025)  # box under z = 0, centred at (0.3, 0, -0.025)
TABLE_CENTER = (0.3, 0.0, -0.025)
NUM_TABLE_TEXTURES = 4  # index 0 = plain colour, 1..3 = procedural textures


@dataclass(frozen=True)
class ObjectSpec:
    """One object of a task's scene. `name` is the object's role in the task.

    kinds:
      box     free rigid box; `size` = half extents (x, y, z)
      tray    static open box (floor + 4 walls); `size` = (inner half x, inner half y, wall height)
      marker  visual-only cylinder lying on the table; `size` = (radius, half height)
      sphere  visual-only sphere floating in the air; `size` = (radius,)
      drawer  static cabinet whose drawer slides along -x (towards the robot) on a prismatic
              joint; `size` = cabinet half extents (x, y, z); the joint value is the opening
              in metres, range [0, DRAWER_TRAVEL]; a handle bar sticks out of the front
      button  static base with a cap that slides down along -z on a sprung prismatic joint;
              `size` = (cap radius, cap half height); the joint value is the press depth in
              metres (<= 0), range [-BUTTON_TRAVEL, 0]
    """

    name: str
    kind: str
    size: tuple[float, ...]
    mass: float = 0.1
    friction: float = 1.0


DRAWER_TRAVEL = 0.16
DRAWER_HANDLE_OFFSET = 0.045  # handle bar centre sits this far in front of the drawer face
DRAWER_HANDLE_RADIUS = 0.008
DRAWER_HANDLE_HALF_WIDTH = 0.05
BUTTON_TRAVEL = 0.015
BUTTON_BASE_HALF_HEIGHT = 0.01
BUTTON_BASE_RADIUS_MARGIN = 0.012
# A latching push button: its base ring lights up once pressed, so that a policy that sees one frame can tell
# a pressed button from an unpressed one (a momentary press leaves no other trace)
BUTTON_LIT_RGBA = (0.55, 1.0, 1.0, 1.0)  # pale cyan: no task colour


@dataclass(frozen=True)
class SceneSpec:
    objects: tuple[ObjectSpec, ...]

    def get(self, name: str) -> ObjectSpec:
        for obj in self.objects:
            if obj.name == name:
                return obj
        raise KeyError(f"scene has no object {name!r}; objects: {[o.name for o in self.objects]}")


@dataclass(frozen=True)
class Camera:
    """A pinhole camera looking from `eye` at `target`, with +z up and vertical field of view."""

    eye: tuple[float, float, float]
    target: tuple[float, float, float]
    fovy_deg: float


DEFAULT_CAMERA = Camera(eye=(1.25, 0.0, 0.75), target=(0.45, 0.0, 0.05), fovy_deg=45.0)
DEFAULT_LIGHT_POS = (0.6, 0.0, 1.6)
HOME_JOINTS = (0.0, -0.35, 0.0, -2.3, 0.0, 1.95, 0.785)  # gripper down, above the table
GRIPPER_MAX_WIDTH = 0.08


@dataclass
class EpisodeConfig:
    """Everything a backend needs to put the scene in its initial state for one episode.

    Poses and colours come from the task's layout draw; the rest from domain randomization.
    `friction`, `mass` and `damping` are multiplicative scales on the nominal values.
    """

    poses: dict[str, tuple[tuple[float, float, float], float]]  # name -> (position, yaw)
    rgba: dict[str, tuple[float, float, float, float]]
    joints: dict[str, float] = field(default_factory=dict)  # drawer opening / button depth
    table_rgba: tuple[float, float, float, float] = (0.55, 0.42, 0.3, 1.0)
    table_texture: int = 0
    light_pos: tuple[float, float, float] = DEFAULT_LIGHT_POS
    light_intensity: float = 0.7
    camera: Camera = DEFAULT_CAMERA
    friction: dict[str, float] = field(default_factory=dict)  # name -> scale
    mass: dict[str, float] = field(default_factory=dict)  # name -> scale
    damping: float = 1.0  # scale on articulated-joint damping (drawer, button) and arm joints

    def friction_of(self, obj: ObjectSpec) -> float:
        return obj.friction * self.friction.get(obj.name, 1.0)

    def mass_of(self, obj: ObjectSpec) -> float:
        return obj.mass * self.mass.get(obj.name, 1.0)


def yaw_to_quat(yaw: float) -> np.ndarray:
    return np.array([0.0, 0.0, np.sin(yaw / 2), np.cos(yaw / 2)])


def quat_to_matrix(q) -> np.ndarray:
    x, y, z, w = q
    return np.array(
        [
            [1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)],
            [2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)],
            [2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)],
        ]
    )


def matrix_to_quat(m) -> np.ndarray:
    m = np.asarray(m, dtype=np.float64)
    tr = m[0, 0] + m[1, 1] + m[2, 2]
    if tr > 0:
        s = np.sqrt(tr + 1.0) * 2
        q = [(m[2, 1] - m[1, 2]) / s, (m[0, 2] - m[2, 0]) / s, (m[1, 0] - m[0, 1]) / s, 0.25 * s]
    elif m[0, 0] > m[1, 1] and m[0, 0] > m[2, 2]:
        s = np.sqrt(1.0 + m[0, 0] - m[1, 1] - m[2, 2]) * 2
        q = [0.25 * s, (m[0, 1] + m[1, 0]) / s, (m[0, 2] + m[2, 0]) / s, (m[2, 1] - m[1, 2]) / s]
    elif m[1, 1] > m[2, 2]:
        s = np.sqrt(1.0 + m[1, 1] - m[0, 0] - m[2, 2]) * 2
        q = [(m[0, 1] + m[1, 0]) / s, 0.25 * s, (m[1, 2] + m[2, 1]) / s, (m[0, 2] - m[2, 0]) / s]
    else:
        s = np.sqrt(1.0 + m[2, 2] - m[0, 0] - m[1, 1]) * 2
        q = [(m[0, 2] + m[2, 0]) / s, (m[1, 2] + m[2, 1]) / s, 0.25 * s, (m[1, 0] - m[0, 1]) / s]
    q = np.array(q)
    q /= np.linalg.norm(q)
    return q if q[3] >= 0 else -q


def euler_to_matrix(roll: float, pitch: float, yaw: float) -> np.ndarray:
    """Extrinsic x-y-z rotations (roll about world x, then pitch about y, then yaw about z)."""
    cr, sr, cp, sp, cy, sy = np.cos(roll), np.sin(roll), np.cos(pitch), np.sin(pitch), np.cos(yaw), np.sin(yaw)
    rx = np.array([[1, 0, 0], [0, cr, -sr], [0, sr, cr]])
    ry = np.array([[cp, 0, sp], [0, 1, 0], [-sp, 0, cp]])
    rz = np.array([[cy, -sy, 0], [sy, cy, 0], [0, 0, 1]])
    return rz @ ry @ rx


def matrix_to_euler(m) -> np.ndarray:
    """Inverse of `euler_to_matrix`: returns (roll, pitch, yaw)."""
    m = np.asarray(m)
    pitch = np.arcsin(np.clip(-m[2, 0], -1.0, 1.0))
    roll = np.arctan2(m[2, 1], m[2, 2])
    yaw = np.arctan2(m[1, 0], m[0, 0])
    return np.array([roll, pitch, yaw])


def look_at_matrix(eye, target) -> np.ndarray:
    """Camera-to-world rotation with the camera looking along its -z axis, +y up (OpenGL/MuJoCo)."""
    eye, target = np.asarray(eye, float), np.asarray(target, float)
    forward = target - eye
    forward /= np.linalg.norm(forward)
    right = np.cross(forward, [0.0, 0.0, 1.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return np.stack([right, up, -forward], axis=1)
