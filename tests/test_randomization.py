"""Domain randomization: seeded, per episode, and it really changes images and physics."""
import numpy as np
import pytest

from conftest import SMALL
from envs.env import TabletopEnv
from envs.randomization import RandomizationConfig


def rollout(env, seed, steps=8):
    obs, _ = env.reset(seed=seed)
    images, states = [obs["image"]], [obs["state"]]
    for _ in range(steps):
        obs, *_ = env.step(env.expert_action())
        images.append(obs["image"])
        states.append(obs["state"])
    return np.stack(images), np.stack(states), env.instruction


def test_same_seed_same_episode(backend):
    env = TabletopEnv("PickCube", backend=backend, image_size=SMALL, randomization="default")
    other = TabletopEnv("PickCube", backend=backend, image_size=SMALL, randomization="default")
    try:
        a = rollout(env, 11)
        rollout(env, 12)  # an episode in between must not leak into the next one
        b = rollout(env, 11)
        c = rollout(other, 11)  # nor does the env instance matter
        for x in (b, c):
            np.testing.assert_array_equal(a[0], x[0])
            np.testing.assert_array_equal(a[1], x[1])
            assert a[2] == x[2]
    finally:
        env.close()
        other.close()


def test_randomization_changes_images_and_physics(backend):
    plain = TabletopEnv("PickCube", backend=backend, image_size=SMALL, randomization="none")
    varied = TabletopEnv("PickCube", backend=backend, image_size=SMALL, randomization="default")
    try:
        obs_plain, _ = plain.reset(seed=5)
        params_plain = plain.sim.physics_parameters()
        obs_a, _ = varied.reset(seed=5)
        params_a = varied.sim.physics_parameters()
        obs_b, _ = varied.reset(seed=6)
        params_b = varied.sim.physics_parameters()
        # Same seed, same layout and instruction, but the randomized episode looks different.
        assert plain.instruction == varied.instruction
        assert not np.array_equal(obs_plain["image"], obs_a["image"])
        assert not np.array_equal(obs_a["image"], obs_b["image"])
        for key in ("cube/mass", "cube/friction", "damping"):
            assert params_a[key] != pytest.approx(params_plain[key], rel=1e-6), key
            assert params_a[key] != pytest.approx(params_b[key], rel=1e-6), key
            assert abs(params_a[key] / params_plain[key] - 1) <= 0.1 + 1e-6, key
        assert varied.episode.camera != plain.episode.camera
    finally:
        plain.close()
        varied.close()


def test_layout_does_not_depend_on_randomization():
    plain = TabletopEnv("StackCube", backend="mujoco", image_size=16, randomization="none")
    varied = TabletopEnv("StackCube", backend="mujoco", image_size=16, randomization="default")
    try:
        plain.reset(seed=9)
        varied.reset(seed=9)
        assert plain.instruction == varied.instruction
        for name, (pos, _) in plain.episode.poses.items():
            assert np.allclose(pos, varied.episode.poses[name][0], atol=0.011)
    finally:
        plain.close()
        varied.close()


def test_config_parsing():
    assert not RandomizationConfig.from_any("none").enabled
    assert RandomizationConfig.from_any("default") == RandomizationConfig()
    assert RandomizationConfig.from_any({"friction": 0.3}).friction == 0.3
    with pytest.raises(ValueError, match="randomization must be"):
        RandomizationConfig.from_any(3.5)
