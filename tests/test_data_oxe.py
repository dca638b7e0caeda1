"""OXE standardization: shards with each dataset's published feature spec → common observation and 7-D action.

Each dataset is written with its tfds catalog features (`embodied.data.synthetic.oxe_features`),
read back through the registry, and compared with a numpy re-derivation of OpenVLA's
per-dataset transforms from the raw values that were written.
"""
import json

import numpy as np
import pytest

from embodied.data import DATASETS, MissingFeatureError, RLDSSource, UnknownDatasetError, get_dataset_spec
from embodied.data.synthetic import OXE_FEATURES, synthetic_oxe_episodes, write_platform_dataset, \
    write_synthetic_dataset

LENGTH = 4
EPISODES = 2
REQUIRED = ("fractal20220817_data", "bridge_dataset", "kuka", "taco_play", "jaco_play", "berkeley_autolab_ur5",
            "language_table")
WRIST = {"taco_play": "rgb_gripper", "jaco_play": "image_wrist", "berkeley_autolab_ur5": "hand_image"}


@pytest.fixture(scope="module")
def oxe_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("oxe")
    for name in REQUIRED:
        write_synthetic_dataset(name, root, num_episodes=EPISODES, length=LENGTH, seed=7)
    return root


# -- numpy references of OpenVLA's transforms -------------------------------------------------------

def rel2abs(commands):
    """Relative gripper commands (+1 close, -1 open) → absolute (1 open, 0 closed)."""
    signs = np.where(commands < -0.1, 1, np.where(commands > 0.1, -1, 0))
    nonzero = signs[signs != 0]
    state = -nonzero[0] if len(nonzero) else 1
    out = []
    for s in signs:
        state = state if s == 0 else s
        out.append(state / 2 + 0.5)
    return np.asarray(out, np.float32)


def binarize(values):
    out, carry = np.zeros_like(values), values[-1]
    for i in range(len(values) - 1, -1, -1):
        if values[i] > 0.95 or values[i] < 0.05:
            carry = float(values[i] > 0.95)
        out[i] = carry
    return out


def _hamilton(a, b):
    (ax, ay, az, aw), (bx, by, bz, bw) = a, b
    return np.array([aw * bx + ax * bw + ay * bz - az * by, aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw, aw * bw - ax * bx - ay * by - az * bz])


def quat(rpy):
    """Extrinsic x-y-z Euler angles (R = Rz Ry Rx) → quaternion xyzw, as the product qz qy qx."""
    out = []
    for roll, pitch, yaw in np.asarray(rpy, np.float64):
        qx = np.array([np.sin(roll / 2), 0, 0, np.cos(roll / 2)])
        qy = np.array([0, np.sin(pitch / 2), 0, np.cos(pitch / 2)])
        qz = np.array([0, 0, np.sin(yaw / 2), np.cos(yaw / 2)])
        out.append(_hamilton(qz, _hamilton(qy, qx)))
    return np.asarray(out, np.float32)


def stack(steps, *path):
    values = []
    for step in steps:
        node = step
        for key in path:
            node = node[key]
        values.append(node)
    return np.stack([np.asarray(v) for v in values])


def expected(name, steps):
    """(action (T', 7), state (T', 8), instruction, primary image key, frame slice)."""
    a = lambda *k: stack(steps, "action", *k).astype(np.float32)  # noqa: E731
    o = lambda *k: stack(steps, "observation", *k).astype(np.float32)  # noqa: E731
    words = "pick up object"
    if name in ("fractal20220817_data", "kuka"):
        pose = o("base_pose_tool_reached" if name == "fractal20220817_data"
                 else "clip_function_input/base_pose_tool_reached")
        action = np.c_[a("world_vector"), a("rotation_delta"), rel2abs(a("gripper_closedness_action")[:, 0])]
        state = np.c_[pose[:, :7], 1 - o("gripper_closed")]
        return action, state, words, "image", slice(None)
    if name == "bridge_dataset":
        s, act = o("state"), stack(steps, "action").astype(np.float32)
        action = np.c_[s[2:, :6] - s[1:-1, :6], binarize(act[1:, -1])[:-1]]
        state = np.c_[s[1:-1, :3], quat(s[1:-1, 3:6]), s[1:-1, 6]]
        return action, state, words, "image_0", slice(1, -1)
    if name == "taco_play":
        rel, robot = a("rel_actions_world"), o("robot_obs")
        action = np.c_[rel[:, :6], np.clip(rel[:, 6], 0, 1)]
        state = np.c_[robot[:, :3], quat(robot[:, 3:6]), robot[:, 6]]
        return action, state, words, "rgb_static", slice(None)
    if name == "jaco_play":
        eef = o("end_effector_cartesian_pos")
        action = np.c_[a("world_vector"), np.zeros((len(steps), 3)), rel2abs(a("gripper_closedness_action")[:, 0])]
        state = np.c_[eef[:, :3], quat(eef[:, 3:6]), eef[:, 6]]
        return action, state, words, "image", slice(None)
    if name == "berkeley_autolab_ur5":
        action = np.c_[a("world_vector"), a("rotation_delta"), rel2abs(a("gripper_closedness_action"))]
        return action, o("robot_state")[:, 6:14], words, "image", slice(None)
    if name == "language_table":
        xy = stack(steps, "action").astype(np.float32)
        n = len(steps)
        action = np.c_[xy, np.zeros((n, 4)), np.ones(n)]
        state = np.c_[o("effector_translation"), np.zeros((n, 6))]
        return action, state, words, "rgb", slice(None)
    raise AssertionError(name)


def _same_rotation(q_got, q_want):
    # q and -q are the same rotation
    return np.minimum(np.abs(q_got - q_want).max(-1), np.abs(q_got + q_want).max(-1)).max() < 1e-5


@pytest.mark.parametrize("name", REQUIRED)
def test_published_layout_standardizes_to_the_common_action_and_state(oxe_root, name):
    source = RLDSSource(name, data_dir=oxe_root, split="train[:100%]", wrist_image=name in WRIST)
    raw = synthetic_oxe_episodes(name, EPISODES, LENGTH, seed=7)
    episodes = list(source.episodes())
    assert len(episodes) == EPISODES
    for got, episode in zip(episodes, raw):
        action, state, words, image_key, frames = expected(name, episode["steps"])
        assert got["action"].shape == (len(action), 7) and got["state"].shape == (len(action), 8)
        np.testing.assert_allclose(got["action"], action, atol=1e-6)
        np.testing.assert_allclose(got["state"][:, :3], state[:, :3], atol=1e-6)
        assert _same_rotation(got["state"][:, 3:7], state[:, 3:7])
        np.testing.assert_allclose(got["state"][:, 7], state[:, 7], atol=1e-6)
        assert all(text.startswith(words) for text in got["instruction"])
        assert set(np.unique(got["action"][:, 6])) <= {0.0, 1.0} or name == "bridge_dataset"
        # JPEG round trip of the primary (and wrist) camera: same picture, same size
        images = stack(episode["steps"], "observation", image_key)[frames]
        assert got["image"].shape == images.shape
        assert np.abs(got["image"].astype(float) - images).mean() < 8
        if name in WRIST:
            wrist = stack(episode["steps"], "observation", WRIST[name])[frames]
            assert got["wrist_image"].shape == wrist.shape


def test_registry_covers_the_required_datasets_and_the_platform():
    assert set(REQUIRED) <= set(DATASETS)
    assert set(REQUIRED) <= set(OXE_FEATURES)
    for name in ("embodied_tabletop10_mujoco", "embodied_tabletop10_pybullet", "embodied_my_robot"):
        spec = get_dataset_spec(name)
        assert (spec.image_key, spec.wrist_image_key, spec.state_encoding) == ("image", "wrist_image", "POS_QUAT")
    # published keys and encodings, as OpenVLA's dataset configs record them
    assert (DATASETS["bridge_dataset"].image_key, DATASETS["bridge_dataset"].state_encoding) == ("image_0", "POS_EULER")
    assert DATASETS["taco_play"].wrist_image_key == "rgb_gripper"
    assert DATASETS["fractal20220817_data"].state_encoding == "POS_QUAT"


def test_catalog_feature_specs_are_written_as_published(oxe_root):
    import tensorflow_datasets as tfds

    kuka = oxe_root / "kuka" / "0.1.0"
    features = tfds.builder_from_directory(str(kuka)).info.features["steps"].feature
    assert features["observation"]["clip_function_input/base_pose_tool_reached"].shape == (7,)
    spec = json.loads((kuka / "features.json").read_text())
    observation = spec["featuresDict"]["features"]["steps"]["sequence"]["feature"]["featuresDict"]["features"][
        "observation"]["featuresDict"]["features"]
    assert observation["clip_function_input/base_pose_tool_reached"]["tensor"]["encoding"] == "zlib"
    assert features["observation"]["image"].shape == (512, 640, 3)
    table = tfds.builder_from_directory(str(oxe_root / "language_table" / "0.1.0")).info.features
    assert table["steps"]["observation"]["instruction"].shape == (512,)
    assert table["steps"]["action"].shape == (2,)


def test_unknown_dataset_name_lists_the_known_ones(tmp_path):
    with pytest.raises(UnknownDatasetError) as error:
        get_dataset_spec("no_such_dataset")
    message = str(error.value)
    assert "no_such_dataset" in message and all(name in message for name in REQUIRED)
    path, _ = write_platform_dataset(tmp_path, name="mystery_robot", num_episodes=1, length=2, image_size=4)
    with pytest.raises(UnknownDatasetError, match="mystery_robot.*fractal20220817_data"):
        RLDSSource(path)
    assert RLDSSource(path, spec="embodied_mystery", split="train[:100%]").num_episodes == 1  # explicit spec


def test_missing_feature_names_the_key_and_the_dataset(tmp_path):
    import tensorflow_datasets as tfds

    F = tfds.features
    full = OXE_FEATURES["fractal20220817_data"]()["steps"].feature
    observation = {k: full["observation"][k] for k in ("image", "gripper_closed", "natural_language_instruction")}
    features = F.FeaturesDict({"steps": F.Dataset({
        "observation": F.FeaturesDict(observation), "action": full["action"], "is_first": full["is_first"],
        "is_last": full["is_last"], "is_terminal": full["is_terminal"], "reward": full["reward"]})})
    write_synthetic_dataset("fractal20220817_data", tmp_path, num_episodes=1, length=3, features=features)
    with pytest.raises(MissingFeatureError) as error:
        RLDSSource("fractal20220817_data", data_dir=tmp_path)
    assert "steps/observation/base_pose_tool_reached" in str(error.value)
    assert "fractal20220817_data" in str(error.value)


def test_asking_for_a_wrist_camera_a_dataset_lacks_names_the_dataset(oxe_root):
    with pytest.raises(MissingFeatureError, match="wrist camera.*fractal20220817_data"):
        RLDSSource("fractal20220817_data", data_dir=oxe_root, wrist_image=True)
