"""Domain randomization: a seeded config, drawn once per episode (never per step).

Ranges follow robosuite's DomainRandomizationWrapper defaults where it has one
(camera ±1 cm / ±5° rotation / ±5° fovy, lighting, ±10% friction) and about ±10% on mass
and damping. `RandomizationConfig.none()` turns everything off.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

import numpy as np

from embodied.config_keys import from_mapping
from envs.scene import (DEFAULT_CAMERA, DEFAULT_LIGHT_POS, NUM_TABLE_TEXTURES, Camera,
                        EpisodeConfig, SceneSpec, euler_to_matrix)

NOMINAL_TABLE_RGBA = (0.55, 0.42, 0.3, 1.0)


@dataclass(frozen=True)
class RandomizationConfig:
    """All amplitudes are half-widths of uniform ranges; 0 disables that factor."""

    object_color: float = 0.06  # added to each RGB channel of every object
    table_color: float = 0.15
    table_texture: bool = True  # draw one of NUM_TABLE_TEXTURES table looks
    light_position: float = 0.1  # metres
    light_intensity: float = 0.15  # added to the nominal 0.7
    camera_position: float = 0.01  # metres
    camera_rotation: float = 0.087  # radians (≈5°), applied to the viewing direction
    camera_fovy: float = 5.0  # degrees
    friction: float = 0.1  # relative
    mass: float = 0.1  # relative
    damping: float = 0.1  # relative
    object_position: float = 0.01  # metres, added to the task's sampled object positions
    object_yaw: float = 0.1  # radians

    @classmethod
    def none(cls) -> "RandomizationConfig":
        return cls(**{f.name: (False if f.type in ("bool", bool) else 0.0) for f in fields(cls)})

    @classmethod
    def from_any(cls, value) -> "RandomizationConfig":
        """Accepts a config, None/False/"none" (off), True/"default", or a mapping of fields."""
        if isinstance(value, cls):
            return value
        if value is None or value is False or value == "none":
            return cls.none()
        if value is True or value == "default":
            return cls()
        if hasattr(value, "items"):
            return from_mapping(cls, value, "randomization key")
        raise ValueError(f"randomization must be a RandomizationConfig, a mapping, 'default' or 'none'; got {value!r}")

    @property
    def enabled(self) -> bool:
        return any(bool(v) for v in asdict(self).values())

    def to_dict(self) -> dict:
        return asdict(self)


def _jitter_rgba(rgba, amplitude: float, rng: np.random.Generator):
    rgb = np.clip(np.asarray(rgba[:3]) + rng.uniform(-amplitude, amplitude, 3), 0.0, 1.0)
    return (*[float(c) for c in rgb], float(rgba[3]))


def _perturb_camera(camera: Camera, cfg: RandomizationConfig, rng: np.random.Generator) -> Camera:
    eye = np.asarray(camera.eye) + rng.uniform(-cfg.camera_position, cfg.camera_position, 3)
    target = np.asarray(camera.target)
    direction = target - np.asarray(camera.eye)
    rotation = euler_to_matrix(*rng.uniform(-cfg.camera_rotation, cfg.camera_rotation, 3))
    target = eye + rotation @ direction
    fovy = camera.fovy_deg + rng.uniform(-cfg.camera_fovy, cfg.camera_fovy)
    return Camera(tuple(map(float, eye)), tuple(map(float, target)), float(fovy))


def apply_randomization(episode: EpisodeConfig, scene: SceneSpec, cfg: RandomizationConfig,
                        rng: np.random.Generator) -> EpisodeConfig:
    """Return `episode` with one draw of every randomized factor. Draw order is fixed, so the
    same rng state always gives the same episode."""
    u = lambda a: rng.uniform(-a, a)  # noqa: E731
    poses = {}
    for name, (pos, yaw) in episode.poses.items():
        kind = scene.get(name).kind
        if kind in ("box", "tray", "marker", "drawer", "button"):
            dx, dy, dyaw = u(cfg.object_position), u(cfg.object_position), u(cfg.object_yaw)
            if kind in ("drawer", "tray", "button"):
                dyaw = 0.0  # fixtures keep their facing; experts rely on it
            poses[name] = ((pos[0] + dx, pos[1] + dy, pos[2]), yaw + dyaw)
        else:
            poses[name] = (pos, yaw)
    rgba = {name: _jitter_rgba(c, cfg.object_color, rng) for name, c in episode.rgba.items()}
    table_rgba = _jitter_rgba(NOMINAL_TABLE_RGBA, cfg.table_color, rng)
    texture = int(rng.integers(0, NUM_TABLE_TEXTURES)) if cfg.table_texture else 0
    light = tuple(float(v) for v in np.asarray(DEFAULT_LIGHT_POS) + rng.uniform(-cfg.light_position, cfg.light_position, 3))
    intensity = float(0.7 + u(cfg.light_intensity))
    camera = _perturb_camera(episode.camera, cfg, rng)
    names = [o.name for o in scene.objects if o.kind == "box"]
    friction = {n: float(1.0 + u(cfg.friction)) for n in names}
    mass = {n: float(1.0 + u(cfg.mass)) for n in names}
    damping = float(1.0 + u(cfg.damping))
    return EpisodeConfig(poses=poses, rgba=rgba, joints=dict(episode.joints), table_rgba=table_rgba,
                         table_texture=texture, light_pos=light, light_intensity=intensity, camera=camera,
                         friction=friction, mass=mass, damping=damping)


__all__ = ["RandomizationConfig", "apply_randomization", "DEFAULT_CAMERA"]
