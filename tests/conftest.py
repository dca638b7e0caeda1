import os

import pytest

from envs.rendering import configure_mujoco_gl

configure_mujoco_gl()  # before any test imports mujoco

BACKENDS = ("mujoco", "pybullet")
SMALL = 48  # image side used by tests, to stay fast


@pytest.fixture(params=BACKENDS)
def backend(request):
    return request.param


def pytest_collection_modifyitems(config, items):
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; none on this machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


os.environ.setdefault("WANDB_MODE", "offline")


@pytest.fixture(scope="module")
def one_thread():
    """One intra-op thread: on a small shared CPU, more threads only contend (3-10x slower here). A module
    opts in with `pytestmark = pytest.mark.usefixtures("one_thread")`."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def sim_episodes():
    """Three short scripted-expert PressButton episodes of real PyBullet frames (32×32), shared by the
    world-model tests: [(images, actions, states)]."""
    from worldmodel_helpers import render_sim_episodes

    return render_sim_episodes()


@pytest.fixture(scope="session")
def trained_tokenizer(sim_episodes):
    """The tiny world-model tokenizer fitted to `sim_episodes`' frames: (tokenizer, frames)."""
    import numpy as np

    from worldmodel_helpers import train_tokenizer

    frames = np.concatenate([imgs for imgs, _, _ in sim_episodes])
    return train_tokenizer(frames), frames
