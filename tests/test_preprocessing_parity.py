"""Training and evaluation see the same inputs: one recorded episode, replayed in the simulator.

Mismatches between the two paths (a flipped image, a resize done differently, a gripper sign or a
normalization applied twice) are the usual reason published success rates do not reproduce.
"""
import numpy as np
import pytest
import torch

from conftest import SMALL


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    from embodied.collect import CollectConfig, collect

    root = tmp_path_factory.mktemp("parity")
    collect(CollectConfig(backend="mujoco", tasks=["PickCube"], episodes_per_task=1, image_size=SMALL,
                          image_encoding="png", num_envs=1, vector="sync", randomization="default",
                          wrist_camera=True),
            root, show_progress=False)
    return root


def test_reader_batches_and_env_observations_give_identical_model_inputs(recorded):
    import tensorflow_datasets as tfds

    import policies
    from embodied.data import RLDSDataset
    from embodied.data.reader import resolve_builder_dir
    from envs.env import TabletopEnv

    name = "embodied_tabletop10_mujoco"
    builder = tfds.builder_from_directory(str(resolve_builder_dir(name, recorded)))
    episode = next(iter(builder.as_dataset(split="train")))
    seed = int(episode["episode_metadata"]["seed"])
    raw_actions = np.stack([s["action"].numpy() for s in episode["steps"]])

    data = RLDSDataset(datasets=name, data_dir=str(recorded), split="train[:100%]", image_size=SMALL, shuffle=False,
                       repeat=False, batch_size=len(raw_actions), show_progress=False, wrist_image=True)
    batch = next(iter(data))

    # Replay the recorded actions from the recorded initial state: the simulator renders what was stored.
    env = TabletopEnv("PickCube", backend="mujoco", image_size=SMALL, randomization="default", wrist_camera=True)
    try:
        obs, _ = env.reset(seed=seed)
        observations = [obs]
        for action in raw_actions[:-1]:
            obs, *_ = env.step(action)
            observations.append(obs)
    finally:
        env.close()
    assert obs["instruction"] == batch["instruction"][0]
    for key in ("image", "wrist_image"):  # no flip, no resampling drift
        np.testing.assert_array_equal(np.stack([o[key] for o in observations]), batch[key].numpy())
    np.testing.assert_allclose(np.stack([o["state"] for o in observations]), batch["state"].numpy(), atol=1e-6)

    # A policy reading both cameras and the robot state (OpenVLA-OFT's inputs)
    policy = policies.OpenVLAPolicy.from_size("tiny", statistics=data.statistics, observation_image_size=SMALL,
                                              wrist_image=True, use_proprio=True)
    train_inputs = policy.processor(batch["image"], batch["instruction"], states=batch["state"],
                                    wrist_images=batch["wrist_image"])
    eval_inputs = policy.processor.from_observations(observations, [obs["instruction"]] * len(observations))
    for key in ("pixel_values", "wrist_pixel_values"):
        for tower, pixels in train_inputs[key].items():
            torch.testing.assert_close(pixels, eval_inputs[key][tower], rtol=0, atol=0)
    torch.testing.assert_close(train_inputs["proprio"], eval_inputs["proprio"], rtol=0, atol=1e-6)
    assert torch.equal(train_inputs["input_ids"], eval_inputs["input_ids"])

    # The reader's normalized actions un-normalize to what the robot was sent; the gripper keeps
    # its convention (1 = open, 0 = closed) untouched.
    restored = policy.processor.unnormalize_actions(batch["action"].numpy())
    np.testing.assert_array_equal(restored[:, 6], raw_actions[:, 6])
    stats = data.statistics[name]["action"]
    inside = (raw_actions >= np.asarray(stats["q01"])) & (raw_actions <= np.asarray(stats["q99"]))
    np.testing.assert_allclose(restored[inside], raw_actions[inside], atol=1e-5)
    assert {0.0, 1.0} <= set(np.unique(raw_actions[:, 6]))  # the expert both opened and closed the gripper
