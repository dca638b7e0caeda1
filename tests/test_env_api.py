"""gymnasium conformance and bad-input handling of every task on both engines."""
import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env

import envs
from conftest import BACKENDS, SMALL
from envs.env import ACTION_HIGH, ACTION_LOW, TabletopEnv
from envs.tasks import TASKS


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_check_env(task, backend):
    env = gym.make(f"embodied/{task}-v0", backend=backend, image_size=SMALL, render_mode="rgb_array")
    try:
        check_env(env.unwrapped, skip_render_check=False)
        obs, info = env.reset(seed=3)
        assert obs["image"].shape == (SMALL, SMALL, 3) and obs["image"].dtype == np.uint8
        assert obs["state"].shape == (8,)
        assert obs["instruction"] and obs["instruction"] == info["instruction"]
        assert env.render().shape == (SMALL, SMALL, 3)
    finally:
        env.close()


def test_wrist_camera_and_image_size():
    env = envs.make_env("PickCube", backend="mujoco", image_size=(40, 56), wrist_camera=True)
    try:
        obs, _ = env.reset(seed=0)
        assert obs["image"].shape == (40, 56, 3)
        assert obs["wrist_image"].shape == (40, 56, 3)
        assert not np.array_equal(obs["image"], obs["wrist_image"])
    finally:
        env.close()


def test_instruction_names_the_target_colour():
    env = TabletopEnv("PickCube", backend="pybullet", image_size=SMALL)
    try:
        seen = set()
        for seed in range(6):
            env.reset(seed=seed)
            colour = env.instruction.split()[3]
            assert env.instruction == f"pick up the {colour} cube"
            assert env.episode.rgba["cube"][:3] != env.episode.rgba["distractor_0"][:3]
            seen.add(colour)
        assert len(seen) > 1
    finally:
        env.close()


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(ValueError, match="valid tasks: .*PickCube"):
        envs.make_env("FlipPancake")
    with pytest.raises(ValueError, match="valid backends: mujoco, pybullet"):
        TabletopEnv("PickCube", backend="isaac")
    from envs.suites import get_suite
    with pytest.raises(ValueError, match="valid suites: .*tabletop10"):
        get_suite("tabletop1000")
    with pytest.raises(ValueError, match=r"unknown randomization key\(s\) \['gravity'\]; valid: .*friction"):
        TabletopEnv("PickCube", randomization={"gravity": 0.1})


def test_bad_actions_raise_and_out_of_bounds_actions_are_clipped():
    env = TabletopEnv("ReachTarget", backend="mujoco", image_size=SMALL)
    try:
        env.reset(seed=0)
        with pytest.raises(ValueError, match=r"shape \(7,\)"):
            env.step(np.zeros(6))
        with pytest.raises(ValueError, match=r"shape \(7,\)"):
            env.step(np.zeros((1, 7)))
        for bad in (np.nan, np.inf, -np.inf):
            action = np.zeros(7)
            action[2] = bad
            with pytest.raises(ValueError, match=r"\(7,\).*NaN or inf"):
                env.step(action)
        clipped = TabletopEnv.validate_action([1, -1, 0.01, 3, -3, 0, 5])
        np.testing.assert_allclose(clipped, [ACTION_HIGH[0], ACTION_LOW[1], 0.01, ACTION_HIGH[3], ACTION_LOW[4], 0, 1])
        # A huge step moves the hand no further than the bound allows.
        before = env.unwrapped.sim.ee_pose()[0].copy()
        env.step([1.0, 0, 0, 0, 0, 0, 1])
        moved = env.unwrapped.sim.ee_pose()[0] - before
        assert moved[0] <= ACTION_HIGH[0] + 0.005
    finally:
        env.close()


def test_placement_failure_names_task_and_seed(monkeypatch):
    from envs import tasks

    env = TabletopEnv("PickCube", backend="mujoco", image_size=SMALL)
    try:
        monkeypatch.setattr(tasks, "WORKSPACE_X", (0.5, 0.5001))
        monkeypatch.setattr(tasks, "WORKSPACE_Y", (0.0, 0.0001))
        monkeypatch.setattr(tasks.Placer.place, "__defaults__",
                            (tasks.WORKSPACE_X, tasks.WORKSPACE_Y, 0.02, None))
        with pytest.raises(tasks.PlacementError, match=r"task PickCube, seed 17: .*after 200 attempts"):
            env.reset(seed=17)
    finally:
        env.close()


def test_missing_gl_library_names_the_package(monkeypatch):
    import sys

    from envs import rendering

    monkeypatch.delenv("MUJOCO_GL", raising=False)
    monkeypatch.delitem(sys.modules, "mujoco", raising=False)
    monkeypatch.setattr(rendering, "_have_library", lambda name: False)
    with pytest.raises(rendering.RenderingUnavailable, match="libosmesa6"):
        rendering.configure_mujoco_gl()
    monkeypatch.setattr(rendering, "_have_library", lambda name: name == "OSMesa")
    assert rendering.configure_mujoco_gl() == "osmesa"


@pytest.mark.parametrize("backend", ["mujoco", "pybullet"])
def test_set_task_matches_a_fresh_env(backend):
    """Switching an env's task (how evaluation reuses its workers) gives the fresh env's episodes."""
    fresh = TabletopEnv("PressButton", backend=backend, image_size=32)
    switched = TabletopEnv("PickCube", backend=backend, image_size=32)
    try:
        switched.reset(seed=3)
        switched.step(switched.expert_action())
        pick_steps = switched.max_episode_steps
        switched.set_task("PressButton")
        assert switched.max_episode_steps == fresh.max_episode_steps != pick_steps
        a, _ = fresh.reset(seed=11)
        b, _ = switched.reset(seed=11)
        np.testing.assert_array_equal(a["image"], b["image"])
        assert a["instruction"] == b["instruction"]
        for _ in range(5):
            a, *_ = fresh.step(fresh.expert_action())
            b, *_ = switched.step(switched.expert_action())
        np.testing.assert_array_equal(a["state"], b["state"])
        np.testing.assert_array_equal(a["image"], b["image"])
        with pytest.raises(ValueError, match="valid tasks: .*PickCube"):
            switched.set_task("FlipPancake")
        assert switched.task.name == "PressButton"  # a refused switch leaves the env as it was
    finally:
        fresh.close()
        switched.close()
