"""The scripted experts solve every task on both engines; random actions don't."""
import numpy as np
import pytest

from conftest import BACKENDS, SMALL
from envs.env import TabletopEnv
from envs.suites import get_suite
from envs.tasks import TASKS

SEEDS_PER_TASK = 2


def run_expert(env, seed):
    env.reset(seed=seed)
    for _ in range(env.max_episode_steps):
        action = env.expert_action()
        # binary gripper commands, as OXE's grippers and a gripper classifier expect
        assert action[6] in (0.0, 1.0), f"{env.task.name}: expert gripper command {action[6]}"
        _, reward, terminated, truncated, info = env.step(action)
        if terminated or truncated:
            # an episode that succeeds has passed through every named stage on its way
            assert not info["success"] or all(info["stages"].values()), f"{env.task.name}: {info['stages']}"
            return info["success"]
    return False


@pytest.mark.parametrize("task", list(TASKS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_expert_succeeds(task, backend):
    env = TabletopEnv(task, backend=backend, image_size=SMALL, randomization="default")
    try:
        seeds = get_suite("tabletop10").episode_seeds(task, SEEDS_PER_TASK)
        results = [run_expert(env, s) for s in seeds]
        assert all(results), f"expert failed {task} on {backend} for seeds {[s for s, r in zip(seeds, results) if not r]}"
    finally:
        env.close()


def test_the_push_expert_does_not_turn_the_wrist():
    # a turn to the push line made no difference to the expert and halved how well it clones
    env = TabletopEnv("PushCube", backend="mujoco", image_size=SMALL, randomization="default")
    try:
        for seed in get_suite("tabletop10").episode_seeds("PushCube", 3):
            env.reset(seed=seed)
            yaws = []
            for _ in range(env.max_episode_steps):
                action = env.expert_action()
                yaws.append(action[5])
                if env.step(action)[2]:
                    break
            assert env.task.success(env.sim) and np.abs(yaws).max() < 0.05, (seed, np.abs(yaws).max())
    finally:
        env.close()


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_actions_rarely_succeed(backend):
    rng = np.random.default_rng(0)
    successes, episodes = 0, 0
    for task in TASKS:
        env = TabletopEnv(task, backend=backend, image_size=16, randomization="none")
        try:
            env.action_space.seed(0)
            _, info = env.reset(seed=int(rng.integers(1 << 30)))
            # A predicate that is true at reset would end the episode at once.
            assert not env.task.success(env.sim), f"{task} is successful before any action"
            assert not any(info["stages"].values()), f"{task} has reached stages before any action: {info['stages']}"
            for _ in range(40):
                _, _, terminated, truncated, _ = env.step(env.action_space.sample())
                if terminated or truncated:
                    break
            successes += int(terminated)
            episodes += 1
        finally:
            env.close()
    assert successes <= 1, f"random actions solved {successes}/{episodes} tasks"


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_pressed_button_lights_its_ring_until_reset(backend):
    # a momentary press leaves no trace but this: without it one frame cannot tell what is left to do
    env = TabletopEnv("ButtonThenTray", backend=backend, image_size=SMALL, randomization="none", wrist_camera=True)
    try:
        env.reset(seed=3)
        for _ in range(60):
            env.step(env.expert_action())
            if env.task.latched:
                break
        assert env.task.latched == {"button"}
        lit = env.sim.render("wrist").astype(int)
        env.sim.light_button("button", False)
        dark = env.sim.render("wrist").astype(int)
        changed = np.abs(lit - dark).sum(-1) > 60
        assert 0.01 < changed.mean() < 0.5, f"{changed.mean():.3f} of the wrist view changed"
        assert (lit[changed][:, 2] > dark[changed][:, 2] + 40).mean() > 0.9  # pale cyan where the ring was grey
        env.sim.light_button("button")
        env.reset(seed=3)
        reset_view = env.sim.render("wrist")
        env.sim.light_button("button", False)
        np.testing.assert_array_equal(reset_view, env.sim.render("wrist"))  # reset darkened it
        with pytest.raises(ValueError, match="'cube' is a box, not a button"):
            env.sim.light_button("cube")
    finally:
        env.close()


@pytest.mark.parametrize("task, done_at", [("ButtonThenTray", "button_pressed"), ("SortByColor", "cube_a_in_tray")])
def test_a_multi_step_episode_says_which_clause_of_its_instruction_it_is_on(task, done_at):
    from policies.instructions import split_instruction

    env = TabletopEnv(task, backend="mujoco", image_size=SMALL, randomization="default")
    try:
        _, info = env.reset(seed=get_suite("tabletop10").episode_seeds(task, 1)[0])
        assert len(split_instruction(env.instruction)) == env.task.num_clauses == 2
        clauses, stages = [info["clause"]], [False]
        while True:
            _, _, terminated, truncated, info = env.step(env.expert_action())
            clauses.append(info["clause"]), stages.append(info["stages"][done_at])
            if terminated or truncated:
                break
        assert terminated and clauses[-1] == 1 and sorted(set(clauses)) == [0, 1]
        switch = clauses.index(1)
        assert clauses[switch:] == [1] * (len(clauses) - switch)  # never back
        assert stages[switch] and (task == "ButtonThenTray") == (not stages[switch - 1])  # sorted: let go first
        env.reset(seed=1)
        assert env.task.clause == 0
    finally:
        env.close()
    for name in get_suite("tabletop10").tasks:  # every other instruction is one clause
        one = TabletopEnv(name, backend="mujoco", image_size=SMALL)
        try:
            one.reset(seed=2)
            assert len(split_instruction(one.instruction)) == one.task.num_clauses, one.instruction
        finally:
            one.close()


@pytest.mark.parametrize("task", ["ButtonThenTray", "SortByColor"])
def test_between_clauses_the_expert_goes_back_to_where_the_episode_started(task):
    """So that the second clause starts where its one-step task's demonstrations start: fingers open, at the start pose."""
    env = TabletopEnv(task, backend="mujoco", image_size=SMALL, randomization="default")
    try:
        env.reset(seed=get_suite("tabletop10").episode_seeds(task, 1)[0])
        start = env.sim.ee_pose()[0].copy()
        distances, opened = [], []
        for _ in range(env.max_episode_steps):
            action = env.expert_action()
            _, _, terminated, truncated, info = env.step(action)
            if info["clause"] == 1:
                distances.append(float(np.linalg.norm(env.sim.ee_pose()[0] - start)))
                opened.append(action[6] == 1.0)
            if terminated or truncated:
                break
        assert terminated and distances[0] > 0.05
        back = int(np.argmin(distances))
        assert distances[back] < 0.015 and opened[back], (distances[back], opened[back])
        assert back < len(distances) // 2  # on the way to the second clause, not at the end
    finally:
        env.close()


def test_clause_pause_stands_the_expert_still_after_a_clause_before_the_next_one():
    env = TabletopEnv("ButtonThenTray", backend="mujoco", image_size=SMALL, randomization="default", clause_pause=3)
    try:
        _, info = env.reset(seed=get_suite("tabletop10").episode_seeds("ButtonThenTray", 1)[0])
        while env.task.clause == 0:
            _, _, _, _, info = env.step(env.expert_action())
        assert info["clause"] == 0 and env.task.latched == {"button"}  # done, not yet shown
        pose = env.sim.ee_pose()[0].copy()
        for _ in range(3):
            action = env.expert_action()
            assert np.all(action[:6] == 0) and info["clause"] == 0
            _, _, _, _, info = env.step(action)
        assert info["clause"] == 1 and np.linalg.norm(env.sim.ee_pose()[0] - pose) < 0.005
        assert np.abs(env.expert_action()[:3]).max() > 0.005  # the script goes on where it left off
    finally:
        env.close()
    with pytest.raises(ValueError, match="clause_pause must be >= 0, got -1"):
        TabletopEnv("ButtonThenTray", backend="mujoco", image_size=SMALL, clause_pause=-1)


@pytest.mark.parametrize("task, stop_at, expected", [
    ("ButtonThenTray", "button_pressed", {"button_pressed": True, "cube_grasped": False, "cube_in_tray": False}),
    ("SortByColor", "cube_a_in_tray", {"cube_a_grasped": True, "cube_a_in_tray": True, "cube_b_grasped": False,
                                       "cube_b_in_tray": False}),
])
def test_stages_say_how_far_an_unfinished_episode_got(task, stop_at, expected):
    env = TabletopEnv(task, backend="mujoco", image_size=SMALL, randomization="default")
    try:
        _, info = env.reset(seed=get_suite("tabletop10").episode_seeds(task, 1)[0])
        while not info["stages"][stop_at]:
            _, _, terminated, truncated, info = env.step(env.expert_action())
            assert not (terminated or truncated), info
        assert info["stages"] == expected and not info["success"]
        # reached is remembered: lifting the arm away keeps the press and the first grasp counted
        for _ in range(5):
            _, _, _, _, info = env.step(np.array([0, 0, 0.03, 0, 0, 0, 1.0], np.float32))
        assert all(info["stages"][name] for name, reached in expected.items() if reached)
        env.reset(seed=1)
        assert not any(env.stages_reached().values())
    finally:
        env.close()
