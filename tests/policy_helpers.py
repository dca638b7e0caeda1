"""Shared pieces of the policy tests: statistics, batches and quick training of tiny policies."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from embodied.data.statistics import compute_statistics

IMAGE = 32  # camera image side in the policy tests
TOWER = 56  # tower input side: 4 x 4 patches of 14 px
INSTRUCTIONS = ["pick up the red cube", "open the drawer", "press the blue button", "stack the red cube on the blue cube"]


def statistics(seed: int = 0, dim: int = 7) -> dict:
    rng = np.random.default_rng(seed)
    actions = rng.normal(0.0, 0.02, size=(500, dim)).astype(np.float32)
    actions[:, -1] = rng.integers(0, 2, 500)
    return {"sim_tabletop10": compute_statistics(actions, rng.normal(size=(500, 8)), 20)}


def batch(size: int = 4, chunk: int = 1, seed: int = 0) -> dict:
    """A batch shaped like the data reader's: uint8 images, normalized actions, instructions."""
    g = torch.Generator().manual_seed(seed)
    shape = (size, chunk, 7) if chunk > 1 else (size, 7)
    out = {"image": torch.randint(0, 256, (size, IMAGE, IMAGE, 3), dtype=torch.uint8, generator=g),
           "instruction": [INSTRUCTIONS[i % len(INSTRUCTIONS)] for i in range(size)],
           "action": torch.rand(shape, generator=g) * 2 - 1}
    if chunk > 1:
        out["action_mask"] = torch.ones(size, chunk, dtype=torch.bool)
    return out


def tiny(cls, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return cls.from_size("tiny", statistics=statistics(), observation_image_size=IMAGE, tower_image_size=TOWER,
                         **overrides)


def train_until_exact(model, data: dict, lr: float = 2e-3, max_steps: int = 300) -> dict:
    """Adam steps on one batch until every action token is right; returns the last metrics."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    metrics = {}
    for _ in range(max_steps):
        loss, metrics = model(data)
        if metrics["action_accuracy"] == 1.0:
            break
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return metrics


def train_steps(model, data: dict, steps: int = 200, lr: float = 2e-3) -> tuple[dict, dict]:
    """Adam steps on one batch; returns the first and the last step's metrics."""
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    first = metrics = None
    for _ in range(steps):
        loss, metrics = model(data)
        first = first or metrics
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    model.eval()
    return first, metrics


def observations(data: dict) -> list[dict]:
    return [{"image": image.numpy(), "instruction": text} for image, text in zip(data["image"], data["instruction"])]


@pytest.fixture(autouse=True)
def single_thread():
    """Tiny models run fastest on one thread; on a shared 2-core machine more threads spin and stall."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
