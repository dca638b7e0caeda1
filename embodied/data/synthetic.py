"""Small RLDS datasets with the published Open X-Embodiment feature specs, for tests and benchmarks.

`oxe_features(name)` rebuilds each registered dataset's tfds `FeaturesDict` from its public
catalog entry (keys, shapes, dtypes, encodings: e.g. kuka's zlib-encoded tensors, ur5's float
depth image, language_table's int32 instruction codes); `write_synthetic_dataset` fills it with
random but well-formed values and writes a real tfds builder directory with `RLDSWriter`.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from embodied.data._tensorflow import tf as _tf
from embodied.data._tensorflow import tfds as _tfds
from embodied.data.rlds_writer import RLDSWriter, episode_features, make_episode


def _F():
    return _tfds().features


def _string():
    return _F().Tensor(shape=(), dtype=_tf().string)


def _t(*shape, dtype=np.float32, encoding=None):
    kwargs = {"encoding": encoding} if encoding else {}
    return _F().Tensor(shape=tuple(shape), dtype=dtype, **kwargs)


def _img(h, w, c=3, dtype=np.uint8, fmt="jpeg"):
    F = _F()
    if dtype != np.uint8:
        return F.Image(shape=(h, w, c), dtype=dtype)
    return F.Image(shape=(h, w, c), dtype=dtype, encoding_format=fmt)


def _rlds_flags():
    F = _F()
    return {"is_first": _t(dtype=np.bool_), "is_last": _t(dtype=np.bool_), "is_terminal": _t(dtype=np.bool_),
            "reward": F.Scalar(dtype=np.float32)}


def _rt1_action(gripper_scalar: bool = False, terminate=((3,), np.int32)):
    action = {"gripper_closedness_action": _t() if gripper_scalar else _t(1), "rotation_delta": _t(3),
              "world_vector": _t(3)}
    shape, dtype = terminate
    action["terminate_episode"] = _t(*shape, dtype=dtype) if shape else _t(dtype=dtype)
    return action


def _fractal():
    F = _F()
    observation = {
        "base_pose_tool_reached": _t(7), "gripper_closed": _t(1), "gripper_closedness_commanded": _t(1),
        "height_to_bottom": _t(1), "image": _img(256, 320), "natural_language_embedding": _t(512),
        "natural_language_instruction": _string(), "orientation_box": _t(2, 3), "orientation_start": _t(4),
        "robot_orientation_positions_box": _t(3, 3), "rotation_delta_to_go": _t(3), "src_rotation": _t(4),
        "vector_to_go": _t(3), "workspace_bounds": _t(3, 3)}
    action = {**_rt1_action(), "base_displacement_vector": _t(2), "base_displacement_vertical_rotation": _t(1)}
    attributes = {"collection_mode": _t(dtype=np.int64), "collection_mode_name": _string(),
                  "data_type": _t(dtype=np.int64), "data_type_name": _string(), "env": _t(dtype=np.int64),
                  "env_name": _string(), "location": _t(dtype=np.int64), "location_name": _string(),
                  "objects_family": _t(dtype=np.int64), "objects_family_name": _string(),
                  "task_family": _t(dtype=np.int64), "task_family_name": _string()}
    aspects = {k: _t(dtype=np.bool_) for k in ("already_success", "feasible", "has_aspects", "success", "undesirable")}
    return F.FeaturesDict({
        "aspects": F.FeaturesDict(aspects), "attributes": F.FeaturesDict(attributes),
        "steps": F.Dataset({"action": F.FeaturesDict(action), "observation": F.FeaturesDict(observation),
                            **_rlds_flags()})})


def _kuka():
    F = _F()
    observation = {
        "clip_function_input/base_pose_tool_reached": _t(7, encoding="zlib"),
        "clip_function_input/workspace_bounds": _t(3, 3, encoding="zlib"),
        "gripper_closed": _t(1, encoding="zlib"), "height_to_bottom": _t(1, encoding="zlib"),
        "image": _img(512, 640), "natural_language_embedding": _t(512), "natural_language_instruction": _string(),
        "task_id": _t(1, encoding="zlib")}
    action = {**_rt1_action(), "base_displacement_vector": _t(2), "base_displacement_vertical_rotation": _t(1)}
    return F.FeaturesDict({
        "success": _t(dtype=np.bool_),
        "steps": F.Dataset({"action": F.FeaturesDict(action), "observation": F.FeaturesDict(observation),
                            **_rlds_flags()})})


def _bridge():
    F = _F()
    metadata = {"episode_id": F.Scalar(dtype=np.int32), "file_path": _string(),
                **{f"has_image_{i}": F.Scalar(dtype=np.bool_) for i in range(4)},
                "has_language": F.Scalar(dtype=np.bool_)}
    observation = {**{f"image_{i}": _img(256, 256) for i in range(4)}, "state": _t(7)}
    return F.FeaturesDict({
        "episode_metadata": F.FeaturesDict(metadata),
        "steps": F.Dataset({"action": _t(7), "discount": F.Scalar(dtype=np.float32), "language_embedding": _t(512),
                            "language_instruction": _string(), "observation": F.FeaturesDict(observation),
                            **_rlds_flags()})})


def _taco_play():
    F = _F()
    observation = {"depth_gripper": _t(84, 84), "depth_static": _t(150, 200), "natural_language_embedding": _t(512),
                   "natural_language_instruction": _string(), "rgb_gripper": _img(84, 84),
                   "rgb_static": _img(150, 200), "robot_obs": _t(15), "structured_language_instruction": _string()}
    action = {"actions": _t(7), "rel_actions_gripper": _t(7), "rel_actions_world": _t(7), "terminate_episode": _t()}
    return F.FeaturesDict({"steps": F.Dataset({"action": F.FeaturesDict(action),
                                               "observation": F.FeaturesDict(observation), **_rlds_flags()})})


def _jaco_play():
    F = _F()
    observation = {"end_effector_cartesian_pos": _t(7), "end_effector_cartesian_velocity": _t(6),
                   "image": _img(224, 224), "image_wrist": _img(224, 224), "joint_pos": _t(8),
                   "natural_language_embedding": _t(512), "natural_language_instruction": _string()}
    action = {"gripper_closedness_action": _t(1), "terminate_episode": _t(3, dtype=np.int32), "world_vector": _t(3)}
    return F.FeaturesDict({"steps": F.Dataset({"action": F.FeaturesDict(action),
                                               "observation": F.FeaturesDict(observation), **_rlds_flags()})})


def _berkeley_autolab_ur5():
    F = _F()
    observation = {"hand_image": _img(480, 640), "image": _img(480, 640),
                   "image_with_depth": _img(480, 640, 1, dtype=np.float32), "natural_language_embedding": _t(512),
                   "natural_language_instruction": _string(), "robot_state": _t(15)}
    return F.FeaturesDict({"steps": F.Dataset({"action": F.FeaturesDict(_rt1_action(True, ((), np.float32))),
                                               "observation": F.FeaturesDict(observation), **_rlds_flags()})})


def _language_table():
    F = _F()
    observation = {"effector_target_translation": _t(2), "effector_translation": _t(2),
                   "instruction": _t(512, dtype=np.int32), "rgb": _img(360, 640)}
    return F.FeaturesDict({"steps": F.Dataset({"action": _t(2), "observation": F.FeaturesDict(observation),
                                               **_rlds_flags()})})


OXE_FEATURES: dict[str, Callable[[], Any]] = {
    "fractal20220817_data": _fractal, "kuka": _kuka, "bridge_dataset": _bridge, "taco_play": _taco_play,
    "jaco_play": _jaco_play, "berkeley_autolab_ur5": _berkeley_autolab_ur5, "language_table": _language_table,
}


def oxe_features(name: str):
    """The published tfds features of an OXE dataset (see the module docstring)."""
    if name not in OXE_FEATURES:
        raise KeyError(f"no synthetic spec for {name!r}; available: {', '.join(OXE_FEATURES)}")
    return OXE_FEATURES[name]()


# -- filling a spec with values ---------------------------------------------------------------------

def _value(feature, rng: np.random.Generator, key: str):
    """A random, valid value for one (non-dict) feature."""
    F = _F()
    if isinstance(feature, F.Image):
        h, w, c = feature.shape
        if feature.np_dtype == np.uint8:
            base = rng.integers(0, 256, size=(1, 1, c), dtype=np.uint8)  # flat colour + noise: fast to encode
            return np.clip(base + rng.integers(0, 16, size=(h, w, c)), 0, 255).astype(np.uint8)
        return rng.random((h, w, c), dtype=np.float32)
    dtype = np.dtype(feature.np_dtype) if feature.np_dtype is not object else None
    shape = feature.shape
    if dtype is None or dtype.kind in "OSU":
        return f"{key} {int(rng.integers(1000))}"
    if dtype == np.bool_:
        return bool(rng.integers(2)) if not shape else rng.integers(0, 2, size=shape).astype(bool)
    if dtype.kind in "iu":
        return dtype.type(rng.integers(0, 5)) if not shape else rng.integers(0, 5, size=shape).astype(dtype)
    value = rng.normal(size=shape).astype(dtype)
    return dtype.type(value) if not shape else value


def _fill(features, rng: np.random.Generator, prefix: str = ""):
    F = _F()
    return {key: (_fill(feature, rng, key) if isinstance(feature, F.FeaturesDict) else _value(feature, rng, key))
            for key, feature in features.items()}


def _gripper_commands(length: int, rng) -> np.ndarray:
    """Relative gripper commands (+1 close, -1 open, 0 keep) with a close and a reopen."""
    commands = np.zeros(length, np.float32)
    if length >= 3:
        close, reopen = sorted(rng.choice(np.arange(1, length), size=2, replace=False))
        commands[close], commands[reopen] = 1.0, -1.0
    return commands


def _instruction_codes(text: str) -> np.ndarray:
    codes = np.zeros(512, np.int32)
    raw = np.frombuffer(text.encode(), dtype=np.uint8)
    codes[:len(raw)] = raw
    return codes


def synthetic_oxe_episode(name: str, features, length: int, rng: np.random.Generator, index: int = 0) -> dict:
    """One episode for `name` with `features`; dataset-specific fields are made realistic."""
    step_features = features["steps"].feature
    instruction = f"pick up object {index}"
    gripper = _gripper_commands(length, rng)
    steps = []
    for t in range(length):
        step = _fill(step_features, rng)
        step.update(is_first=t == 0, is_last=t == length - 1, is_terminal=t == length - 1,
                    reward=np.float32(t == length - 1))
        obs, action = step["observation"], step.get("action")
        if "natural_language_instruction" in obs:
            obs["natural_language_instruction"] = instruction
        if "language_instruction" in step:
            step["language_instruction"] = instruction
        if name == "language_table":
            obs["instruction"] = _instruction_codes(instruction)
        if isinstance(action, dict) and "gripper_closedness_action" in action:
            shape = step_features["action"]["gripper_closedness_action"].shape
            action["gripper_closedness_action"] = np.full(shape, gripper[t], np.float32) if shape else gripper[t]
        if name == "bridge_dataset":
            step["action"][-1] = np.float32(rng.choice([0.0, 0.5, 1.0]))
        if name == "taco_play":
            action["rel_actions_world"][-1] = np.float32(rng.choice([-1.0, 1.0]))
        steps.append(step)
    episode = _fill({k: v for k, v in features.items() if k != "steps"}, rng)
    episode["steps"] = steps
    return episode


def synthetic_oxe_episodes(name: str, num_episodes: int = 2, length: int = 5, seed: int = 0,
                           features=None) -> list[dict]:
    """The raw episodes `write_synthetic_dataset` writes for the same arguments (deterministic)."""
    features = features or oxe_features(name)
    rng = np.random.default_rng(seed)
    return [synthetic_oxe_episode(name, features, length, rng, i) for i in range(num_episodes)]


def write_synthetic_dataset(name: str, data_dir: str | os.PathLike, num_episodes: int = 2, length: int = 5,
                            seed: int = 0, version: str = "0.1.0", features=None, episodes_per_shard: int = 1,
                            dataset_name: str | None = None) -> Path:
    """Write `num_episodes` episodes of OXE dataset `name` (one shard per `episodes_per_shard`)."""
    features = features or oxe_features(name)
    episodes = synthetic_oxe_episodes(name, num_episodes, length, seed, features)
    return _write(dataset_name or name, data_dir, features, episodes, version, episodes_per_shard)


def write_platform_dataset(data_dir: str | os.PathLike, name: str = "embodied_synthetic", num_episodes: int = 4,
                           length: int | tuple[int, int] = 10, image_size: int = 16, seed: int = 0,
                           episodes_per_shard: int = 1, wrist_image: bool = False, image_encoding: str = "png",
                           action_fn: Callable[[int, int], np.ndarray] | None = None,
                           version: str = "1.0.0", failed_episodes: tuple[int, ...] = ()) -> tuple[Path, list[dict]]:
    """A dataset in the platform's own layout; returns the directory and the raw episodes written.

    `length` is a fixed length or a (low, high) range; `action_fn(episode, t)` overrides the
    random actions; the episodes numbered in `failed_episodes` are written as failures.
    """
    rng = np.random.default_rng(seed)
    features = episode_features(image_size, wrist_image=wrist_image, image_encoding=image_encoding)
    raw = []
    for e in range(num_episodes):
        n = int(rng.integers(length[0], length[1] + 1)) if isinstance(length, tuple) else int(length)
        obs = {"image": rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8),
               "state": rng.normal(size=(n, 8)).astype(np.float32)}
        if wrist_image:
            obs["wrist_image"] = rng.integers(0, 256, size=(n, image_size, image_size, 3), dtype=np.uint8)
        actions = (np.stack([action_fn(e, t) for t in range(n)]) if action_fn
                   else rng.normal(scale=0.02, size=(n, 7))).astype(np.float32)
        if action_fn is None:
            actions[:, 6] = rng.integers(0, 2, size=n)
        meta = {"episode_id": e, "task": "ReachTarget", "suite": "synthetic", "backend": "none", "seed": e,
                "randomization": {}, "control_hz": 10.0}
        raw.append({"observations": obs, "actions": actions, "instruction": f"reach target {e}"})
        raw[-1]["episode"] = make_episode(obs, actions, raw[-1]["instruction"], meta, success=e not in failed_episodes)
    path = _write(name, data_dir, features, [r.pop("episode") for r in raw], version, episodes_per_shard)
    return path, raw


def _write(name, data_dir, features, episodes, version, episodes_per_shard) -> Path:
    # a byte budget just under `episodes_per_shard` episodes per shard
    sizes = [len(features.serialize_example(e)) for e in episodes[:1]]
    budget = max(1, int(sizes[0] * (episodes_per_shard + 0.5)))
    with RLDSWriter(data_dir, name, features, version=version, max_shard_bytes=budget, overwrite=True) as writer:
        writer.write_all(episodes)
    return writer.builder_dir
