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
        _, reward, terminated, truncated, info = env.step(env.expert_action())
        if terminated or truncated:
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_random_actions_rarely_succeed(backend):
    rng = np.random.default_rng(0)
    successes, episodes = 0, 0
    for task in TASKS:
        env = TabletopEnv(task, backend=backend, image_size=16, randomization="none")
        try:
            env.action_space.seed(0)
            env.reset(seed=int(rng.integers(1 << 30)))
            # A predicate that is true at reset would end the episode at once.
            assert not env.task.success(env.sim), f"{task} is successful before any action"
            for _ in range(40):
                _, _, terminated, truncated, _ = env.step(env.action_space.sample())
                if terminated or truncated:
                    break
            successes += int(terminated)
            episodes += 1
        finally:
            env.close()
    assert successes <= 1, f"random actions solved {successes}/{episodes} tasks"
