"""Open X-Embodiment standardization registry: each dataset's keys and encodings → the common layout.

Every registered dataset maps its RLDS steps to

    image        encoded bytes (T,)   the primary third-person camera
    wrist_image  encoded bytes (T,)   the wrist camera, where the dataset has one
    state        float32 (T, 8)       end-effector position 3, quaternion xyzw 4, gripper 1
    action       float32 (T, 7)       [dx, dy, dz, droll, dpitch, dyaw, gripper], gripper 1 = open
    instruction  string (T,)

Keys, shapes and encodings are the published OXE feature specs (the tfds catalog entries of
each dataset); the per-dataset action and state mappings follow OpenVLA's
`prismatic/vla/datasets/rlds/oxe/{configs,transforms}.py`:

| dataset | image / wrist | state (OpenVLA encoding) | action |
|---|---|---|---|
| fractal20220817_data | image / - | base_pose_tool_reached (xyz+quat), gripper_closed (POS_QUAT) | world_vector, rotation_delta, gripper_closedness_action relative→absolute |
| kuka | image / - | clip_function_input/base_pose_tool_reached, gripper_closed (zlib tensors; POS_QUAT) | as fractal |
| bridge_dataset | image_0 / - | state[:6] xyz+rpy, state[-1] (POS_EULER) | first step dropped, gripper binarized, xyz/rpy relabelled from reached states, last step dropped |
| taco_play | rgb_static / rgb_gripper | robot_obs xyz+euler, gripper width (POS_EULER) | rel_actions_world, gripper clipped to [0, 1] |
| jaco_play | image / image_wrist | end_effector_cartesian_pos[:6], [-1] (POS_EULER) | world_vector, zero rotation, gripper relative→absolute |
| berkeley_autolab_ur5 | image / hand_image | robot_state[6:14] (POS_QUAT) | world_vector, rotation_delta, gripper relative→absolute |
| language_table | rgb / - | effector_translation (x, y) | 2-D action → [dx, dy, 0, 0, 0, 0, 1]; instruction decoded from int32 UTF-8 codes |
| embodied_* (this platform) | image / wrist_image | state (already common) | action (already common) |

State: Euler angles (roll-pitch-yaw, extrinsic x-y-z as in `envs.scene.euler_to_matrix`) are
converted to quaternions; components a dataset does not record are 0. "Closed" gripper
readings (fractal, kuka) are turned into openings (1 - closed); other gripper readings are the
dataset's own values. Two choices differ from OpenVLA on purpose: states are always 8-D
POS_QUAT (the platform's contract) rather than OpenVLA's per-dataset 8-D encodings, and
taco_play's gripper state is `robot_obs[6]`, the gripper width according to the dataset's own
feature description ("EE position (3), EE orientation in euler angles (3), gripper width (1),
joint positions (7), gripper action (1)"), where OpenVLA reads `robot_obs[7:8]`. Actions
follow OpenVLA exactly (they are what a policy trained on OXE predicts). Nothing here is
needed to *read* a dataset with tfds; it only maps features.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from embodied.data.errors import MissingFeatureError, UnknownDatasetError

DEFAULT_ACTION_MASK = (True,) * 6 + (False,)  # normalize xyz/rpy deltas, never the gripper
PLATFORM_PREFIX = "embodied_"


from embodied.data._tensorflow import tf as _tf


# -- TF building blocks (shared by the transforms; inputs have a leading time axis) ---------------

def rel2abs_gripper(actions):
    """Relative gripper commands (+1 close, -1 open, 0 keep) → absolute (1 open, 0 closed).

    The state before the first command is the opposite of that command (open if none).
    """
    tf = _tf()
    actions = tf.reshape(tf.cast(actions, tf.float32), [-1])
    thresholded = tf.where(actions < -0.1, 1, tf.where(actions > 0.1, -1, 0))  # +1 open, -1 close, 0 keep
    first = -thresholded[tf.argmax(tf.cast(thresholded != 0, tf.int32))]
    start = tf.where(first == 0, 1, first)
    absolute = tf.scan(lambda carry, x: tf.where(x == 0, carry, x), thresholded, initializer=start)
    return tf.cast(absolute, tf.float32) / 2.0 + 0.5


def binarize_gripper(actions):
    """Continuous gripper actions → {0, 1}; values in between take the next settled value."""
    tf = _tf()
    actions = tf.reshape(tf.cast(actions, tf.float32), [-1])
    is_open, is_closed = actions > 0.95, actions < 0.05
    between = tf.logical_not(tf.logical_or(is_open, is_closed))
    open_float = tf.cast(is_open, tf.float32)

    def step(carry, i):
        return tf.where(between[i], carry, open_float[i])

    return tf.scan(step, tf.range(tf.shape(actions)[0]), initializer=actions[-1], reverse=True)


def euler_to_quat(rpy):
    """Roll-pitch-yaw (extrinsic x-y-z, i.e. R = Rz Ry Rx) → quaternion xyzw, batched on axis 0."""
    tf = _tf()
    rpy = tf.cast(rpy, tf.float32)
    half = rpy / 2.0
    cr, cp, cy = tf.cos(half[:, 0]), tf.cos(half[:, 1]), tf.cos(half[:, 2])
    sr, sp, sy = tf.sin(half[:, 0]), tf.sin(half[:, 1]), tf.sin(half[:, 2])
    return tf.stack([sr * cp * cy - cr * sp * sy,
                     cr * sp * cy + sr * cp * sy,
                     cr * cp * sy - sr * sp * cy,
                     cr * cp * cy + sr * sp * sy], axis=-1)


def _col(x):
    tf = _tf()
    x = tf.cast(x, tf.float32)
    return tf.reshape(x, [-1, 1])


def _pos_quat_state(pos, quat, gripper):
    tf = _tf()
    return tf.concat([tf.cast(pos, tf.float32), tf.cast(quat, tf.float32), _col(gripper)], axis=-1)


def _pos_euler_state(pos, rpy, gripper):
    return _pos_quat_state(pos, euler_to_quat(rpy), gripper)


def decode_int_text(codes):
    """language_table's instructions: int32 UTF-8 codes padded with zeros → strings."""
    tf = _tf()
    text = tf.strings.unicode_encode(tf.cast(codes, tf.int32), output_encoding="UTF-8")
    return tf.strings.split(text, "\x00")[:, :1].to_tensor(default_value="")[:, 0]


# -- per-dataset transforms: decoded steps (dict of tensors, time-major) → action/state/instruction --

def _rt1_action(action):
    tf = _tf()
    return tf.concat([action["world_vector"], action["rotation_delta"],
                      rel2abs_gripper(action["gripper_closedness_action"])[:, None]], axis=-1)


def _fractal(steps):
    obs = steps["observation"]
    pose = obs["base_pose_tool_reached"]
    return {"action": _rt1_action(steps["action"]),
            "state": _pos_quat_state(pose[:, :3], pose[:, 3:7], 1.0 - _col(obs["gripper_closed"])),
            "instruction": obs["natural_language_instruction"]}


def _kuka(steps):
    obs = steps["observation"]
    pose = obs["clip_function_input/base_pose_tool_reached"]
    return {"action": _rt1_action(steps["action"]),
            "state": _pos_quat_state(pose[:, :3], pose[:, 3:7], 1.0 - _col(obs["gripper_closed"])),
            "instruction": obs["natural_language_instruction"]}


def _bridge(steps):
    """Frames 1..T-2 (see `frame_slice`): step 0 has an all-zero action; the last has no successor state."""
    tf = _tf()
    state = tf.cast(steps["observation"]["state"], tf.float32)
    action = tf.cast(steps["action"], tf.float32)
    gripper = binarize_gripper(action[1:, -1])[:, None]  # from step 1 on
    movement = state[2:, :6] - state[1:-1, :6]  # relabel with the reached states
    return {"action": tf.concat([movement, gripper[:-1]], axis=-1),
            "state": _pos_euler_state(state[1:-1, :3], state[1:-1, 3:6], state[1:-1, 6:7]),
            "instruction": steps["language_instruction"][1:-1]}


def _taco_play(steps):
    tf = _tf()
    obs = steps["observation"]
    robot = tf.cast(obs["robot_obs"], tf.float32)
    rel = tf.cast(steps["action"]["rel_actions_world"], tf.float32)
    return {"action": tf.concat([rel[:, :6], tf.clip_by_value(rel[:, -1:], 0.0, 1.0)], axis=-1),
            "state": _pos_euler_state(robot[:, :3], robot[:, 3:6], robot[:, 6:7]),
            "instruction": obs["natural_language_instruction"]}


def _jaco_play(steps):
    tf = _tf()
    obs, action = steps["observation"], steps["action"]
    eef = tf.cast(obs["end_effector_cartesian_pos"], tf.float32)
    world = tf.cast(action["world_vector"], tf.float32)
    return {"action": tf.concat([world, tf.zeros_like(world),
                                 rel2abs_gripper(action["gripper_closedness_action"])[:, None]], axis=-1),
            "state": _pos_euler_state(eef[:, :3], eef[:, 3:6], eef[:, -1:]),
            "instruction": obs["natural_language_instruction"]}


def _berkeley_autolab_ur5(steps):
    tf = _tf()
    obs = steps["observation"]
    robot = tf.cast(obs["robot_state"], tf.float32)[:, 6:14]
    return {"action": _rt1_action(steps["action"]),
            "state": robot,
            "instruction": obs["natural_language_instruction"]}


def _language_table(steps):
    tf = _tf()
    obs = steps["observation"]
    xy = tf.cast(steps["action"], tf.float32)
    n = tf.shape(xy)[0]
    effector = tf.cast(obs["effector_translation"], tf.float32)
    return {"action": tf.concat([xy, tf.zeros([n, 4]), tf.ones([n, 1])], axis=-1),
            "state": tf.concat([effector, tf.zeros([n, 6])], axis=-1),
            "instruction": decode_int_text(obs["instruction"])}


def _platform(steps):
    tf = _tf()
    return {"action": tf.cast(steps["action"], tf.float32),
            "state": tf.cast(steps["observation"]["state"], tf.float32),
            "instruction": steps["language_instruction"],
            # whether the episode stopped at its goal (a failed or policy-driven one stops anywhere)
            "ends_at_goal": tf.cast(steps["is_terminal"][-1], tf.bool)}


# -- the registry -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetSpec:
    """How one dataset maps onto the common observation and 7-D action."""

    name: str
    image_key: str  # under steps/observation
    wrist_image_key: str | None
    required: tuple[tuple[str, ...], ...]  # feature paths under `steps` the transform reads
    transform: Callable[[dict], dict]
    state_encoding: str  # OpenVLA's StateEncoding name
    action_encoding: str = "EEF_POS"
    action_mask: tuple[bool, ...] = DEFAULT_ACTION_MASK
    frame_slice: tuple[int, int | None] = (0, None)  # which steps the transform's outputs belong to
    robot: str = ""
    control_hz: float | None = None
    notes: str = field(default="", compare=False)

    @property
    def min_steps(self) -> int:
        """Shortest episode that still yields one frame after `frame_slice`."""
        start, stop = self.frame_slice
        return start + (-stop if stop is not None and stop < 0 else 0) + 1

    def required_paths(self, wrist: bool = False) -> list[tuple[str, ...]]:
        paths = [("observation", self.image_key), *self.required]
        if wrist and self.wrist_image_key:
            paths.append(("observation", self.wrist_image_key))
        return paths


def _rt1_action_keys():
    return (("action", "world_vector"), ("action", "rotation_delta"), ("action", "gripper_closedness_action"))


DATASETS: dict[str, DatasetSpec] = {}


def register_dataset(spec: DatasetSpec, overwrite: bool = False) -> DatasetSpec:
    if spec.name in DATASETS and not overwrite:
        raise ValueError(f"dataset {spec.name!r} is already registered")
    DATASETS[spec.name] = spec
    return spec


for _spec in (
    DatasetSpec("fractal20220817_data", "image", None,
                (("observation", "base_pose_tool_reached"), ("observation", "gripper_closed"),
                 ("observation", "natural_language_instruction"), *_rt1_action_keys()),
                _fractal, "POS_QUAT", robot="Google robot", control_hz=3.0),
    DatasetSpec("kuka", "image", None,
                (("observation", "clip_function_input/base_pose_tool_reached"), ("observation", "gripper_closed"),
                 ("observation", "natural_language_instruction"), *_rt1_action_keys()),
                _kuka, "POS_QUAT", robot="KUKA iiwa", control_hz=10.0),
    DatasetSpec("bridge_dataset", "image_0", None,
                (("observation", "state"), ("action",), ("language_instruction",)),
                _bridge, "POS_EULER", frame_slice=(1, -1), robot="WidowX", control_hz=5.0),
    DatasetSpec("taco_play", "rgb_static", "rgb_gripper",
                (("observation", "robot_obs"), ("observation", "natural_language_instruction"),
                 ("action", "rel_actions_world")),
                _taco_play, "POS_EULER", robot="Franka", control_hz=15.0),
    DatasetSpec("jaco_play", "image", "image_wrist",
                (("observation", "end_effector_cartesian_pos"), ("observation", "natural_language_instruction"),
                 ("action", "world_vector"), ("action", "gripper_closedness_action")),
                _jaco_play, "POS_EULER", robot="Jaco 2", control_hz=10.0),
    DatasetSpec("berkeley_autolab_ur5", "image", "hand_image",
                (("observation", "robot_state"), ("observation", "natural_language_instruction"), *_rt1_action_keys()),
                _berkeley_autolab_ur5, "POS_QUAT", robot="UR5", control_hz=5.0),
    DatasetSpec("language_table", "rgb", None,
                (("observation", "effector_translation"), ("observation", "instruction"), ("action",)),
                _language_table, "POS_EULER", robot="xArm (planar)", control_hz=10.0),
):
    register_dataset(_spec)

# The platform's own layout (`python -m embodied.collect`, recorded robot data). Any dataset
# named `embodied_*` uses it; these are the names `collect` gives by default.
PLATFORM_SPEC = DatasetSpec("embodied", "image", "wrist_image",
                            (("observation", "state"), ("action",), ("language_instruction",), ("is_terminal",)),
                            _platform, "POS_QUAT", robot="Franka Panda (sim)", control_hz=10.0)
register_dataset(PLATFORM_SPEC)
for _suite in ("tabletop10", "tabletop_pick_place"):
    for _backend in ("mujoco", "pybullet"):
        register_dataset(DatasetSpec(**{**PLATFORM_SPEC.__dict__, "name": f"{PLATFORM_PREFIX}{_suite}_{_backend}"}))


def get_dataset_spec(name: str) -> DatasetSpec:
    """The spec registered for `name`; any `embodied_*` name gets the platform layout."""
    if name in DATASETS:
        return DATASETS[name]
    if name.startswith(PLATFORM_PREFIX):
        return DatasetSpec(**{**PLATFORM_SPEC.__dict__, "name": name})
    raise UnknownDatasetError(name, list(DATASETS) + [f"{PLATFORM_PREFIX}* (platform layout)"])


# -- applying a spec --------------------------------------------------------------------------------

def _feature_at(features, path: tuple[str, ...]):
    node = features
    for key in path:
        node = node[key]
    return node


def step_feature_paths(step_features) -> list[str]:
    """All leaf feature paths of a steps FeaturesDict, '/'-joined (for error messages)."""
    from embodied.data._tensorflow import tfds as _tfds

    tfds = _tfds()
    out = []

    def walk(node, prefix):
        if isinstance(node, tfds.features.FeaturesDict):
            for key in node.keys():
                walk(node[key], prefix + (key,))
        else:
            out.append("/".join(prefix))

    walk(step_features, ())
    return out


def check_features(spec: DatasetSpec, step_features, dataset: str, wrist: bool = False) -> None:
    """Raise MissingFeatureError naming the first key the spec needs that the dataset lacks."""
    for path in spec.required_paths(wrist):
        try:
            _feature_at(step_features, path)
        except (KeyError, TypeError):
            raise MissingFeatureError("steps/" + "/".join(path), dataset, step_feature_paths(step_features)) from None
    if wrist and not spec.wrist_image_key:
        raise MissingFeatureError("steps/observation/<wrist camera>", dataset, step_feature_paths(step_features))


def decode_steps(raw_steps, step_features, spec: DatasetSpec, wrist: bool = False) -> dict:
    """Decode the features the spec reads (batched over time); images stay encoded bytes."""
    out: dict = {}
    for path in spec.required_paths(wrist):
        feature = _feature_at(step_features, path)
        value = _feature_at(raw_steps, path)
        if type(feature).__name__ != "Image":
            value = feature.decode_batch_example(value)
        node = out
        for key in path[:-1]:
            node = node.setdefault(key, {})
        node[path[-1]] = value
    return out


def standardize(steps: dict, spec: DatasetSpec, wrist: bool = False) -> dict:
    """Decoded steps → the common per-episode layout (see module docstring)."""
    tf = _tf()
    common = spec.transform(steps)
    start, stop = spec.frame_slice
    common["image"] = steps["observation"][spec.image_key][start:stop]
    if wrist:
        common["wrist_image"] = steps["observation"][spec.wrist_image_key][start:stop]
    common["action"] = tf.ensure_shape(tf.cast(common["action"], tf.float32), [None, 7])
    common["state"] = tf.ensure_shape(tf.cast(common["state"], tf.float32), [None, 8])
    return common


def action_mask(spec: DatasetSpec) -> np.ndarray:
    return np.asarray(spec.action_mask, dtype=bool)
