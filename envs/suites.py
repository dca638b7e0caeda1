"""Named task suites with fixed initial states, so that every evaluation repeats exactly.

As in LIBERO, a suite fixes 50 initial states per task. Here each initial state is an
episode seed derived from the suite and task names; the seed fixes the object layout, the
colours named in the instruction and the domain-randomization draw.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import numpy as np

from envs.tasks import TASKS

INITIAL_STATES_PER_TASK = 50


@dataclass(frozen=True)
class Suite:
    name: str
    tasks: tuple[str, ...]
    description: str

    def episode_seeds(self, task: str, count: int = INITIAL_STATES_PER_TASK, seed: int = 0) -> list[int]:
        """Episode seeds for `task`; `seed=0` gives the suite's fixed initial states."""
        if task not in self.tasks:
            raise ValueError(f"task {task!r} is not in suite {self.name!r}; its tasks: {', '.join(self.tasks)}")
        entropy = [zlib.crc32(self.name.encode()), zlib.crc32(task.encode()), int(seed)]
        return [int(s) for s in np.random.SeedSequence(entropy).generate_state(count, dtype=np.uint32)]


SUITES: dict[str, Suite] = {
    "tabletop10": Suite("tabletop10", tuple(TASKS), "ten language-conditioned tabletop tasks, one per family"),
    "tabletop_pick_place": Suite("tabletop_pick_place", ("PickCube", "PlaceInTray", "StackCube", "SortByColor"),
                                 "the grasping subset"),
}


def get_suite(name: str) -> Suite:
    if name not in SUITES:
        raise ValueError(f"unknown suite {name!r}; valid suites: {', '.join(SUITES)}")
    return SUITES[name]
