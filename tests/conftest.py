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
