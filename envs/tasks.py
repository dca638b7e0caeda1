"""The tabletop tasks: scene, instruction, initial-state draw, success predicate, max length.

Each task is the same on every physics backend: it only reads simulator state through
`PhysicsBackend`. Object names are roles ("cube", "distractor_0"); colours are drawn per
episode and named in the instruction, so a policy has to read it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from envs.backends.base import PhysicsBackend
from envs.scene import (BUTTON_BASE_HALF_HEIGHT, BUTTON_TRAVEL, DRAWER_HANDLE_OFFSET, DRAWER_TRAVEL,
                        EpisodeConfig, ObjectSpec, SceneSpec, quat_to_matrix)

COLORS: dict[str, tuple[float, float, float, float]] = {
    "red": (0.85, 0.12, 0.1, 1.0),
    "green": (0.15, 0.7, 0.2, 1.0),
    "blue": (0.12, 0.3, 0.9, 1.0),
    "yellow": (0.92, 0.8, 0.12, 1.0),
}
FIXTURE_GRAY = (0.55, 0.55, 0.58, 1.0)
CUBE_HALF = 0.02
CUBE = (CUBE_HALF, CUBE_HALF, CUBE_HALF)
TRAY = (0.065, 0.065, 0.035)  # inner half extents and wall height
DRAWER = (0.1, 0.14, 0.04)
BUTTON = (0.025, 0.01)
PLACEMENT_ATTEMPTS = 200
WORKSPACE_X = (0.38, 0.62)
WORKSPACE_Y = (-0.22, 0.22)


class PlacementError(RuntimeError):
    """Raised when a task cannot place its objects without overlap in the bounded attempts."""


@dataclass
class Layout:
    """One initial-state draw: object poses and colours, plus words for the instruction."""

    poses: dict[str, tuple[tuple[float, float, float], float]]
    rgba: dict[str, tuple[float, float, float, float]]
    words: dict[str, str]
    joints: dict[str, float] = field(default_factory=dict)

    def episode(self) -> EpisodeConfig:
        return EpisodeConfig(poses=dict(self.poses), rgba=dict(self.rgba), joints=dict(self.joints))


class Placer:
    """Rejection sampling of footprints (xy discs) with a bounded number of attempts."""

    def __init__(self, rng: np.random.Generator, task: str):
        self.rng, self.task, self.placed = rng, task, []

    def place(self, radius: float, x=WORKSPACE_X, y=WORKSPACE_Y, clearance: float = 0.02,
              near: tuple[np.ndarray, float, float] | None = None) -> np.ndarray:
        """A free xy for a disc of `radius`; `near=(centre, rmin, rmax)` restricts it to a ring."""
        for _ in range(PLACEMENT_ATTEMPTS):
            if near is None:
                xy = np.array([self.rng.uniform(*x), self.rng.uniform(*y)])
            else:
                centre, rmin, rmax = near
                angle, dist = self.rng.uniform(-np.pi, np.pi), self.rng.uniform(rmin, rmax)
                xy = np.asarray(centre) + dist * np.array([np.cos(angle), np.sin(angle)])
                if not (x[0] <= xy[0] <= x[1] and y[0] <= xy[1] <= y[1]):
                    continue
            if all(np.linalg.norm(xy - p) >= radius + r + clearance for p, r in self.placed):
                self.placed.append((xy, radius))
                return xy
        raise PlacementError(f"could not place an object of radius {radius} after {PLACEMENT_ATTEMPTS} attempts")


class Task:
    """Base class. Subclasses define `name`, `objects`, `max_steps`, `template` and the hooks."""

    name: str = ""
    objects: tuple[ObjectSpec, ...] = ()
    max_steps: int = 100
    template: str = ""
    # The objects the instruction names, in the order it names them (what it asks to act on and where to).
    named_objects: tuple[str, ...] = ()
    # Named steps towards the goal that `stages` checks, in order; an episode records which it reached,
    # so that a failure says how far it got (a grasp that never happened, a first cube sorted).
    stage_names: tuple[str, ...] = ()
    # Clauses of the instruction, done one after another ("press the red button, then put ..."): for a task of
    # several, the named objects (of `named_objects`, in order) each clause names. Such a task says when each
    # clause but the last is done (`clause_done`), so that collection can label every step with the clause it
    # serves; `clauses` gives their words.
    clause_named_objects: tuple[tuple[str, ...], ...] = ()

    def __init__(self):
        self.scene = SceneSpec(self.objects)
        self.latched: set[str] = set()
        self.reached: set[str] = set()
        self.clause = 0  # the clause the episode is on

    # -- episode ------------------------------------------------------------------------
    def sample_layout(self, rng: np.random.Generator) -> Layout:
        raise NotImplementedError

    def instruction(self, layout: Layout) -> str:
        return self.template.format(**layout.words)

    def reset(self) -> None:
        self.latched.clear()
        self.reached.clear()
        self.clause = 0

    def update(self, sim: PhysicsBackend) -> None:
        """Called after every step: latches momentary events such as a button press, and notes the
        stages reached."""
        for obj in self.objects:
            if (obj.kind == "button" and obj.name not in self.latched
                    and sim.joint_position(obj.name) <= -0.6 * BUTTON_TRAVEL):
                self.latched.add(obj.name)
                sim.light_button(obj.name)
        self.reached.update(name for name, holds in self.stages(sim).items() if holds)
        while self.clause < self.num_clauses - 1 and self.clause_done(sim, self.clause):
            self.clause += 1

    def stages(self, sim: PhysicsBackend) -> dict[str, bool]:
        """Which of `stage_names` hold now (none by default)."""
        return {}

    @property
    def num_clauses(self) -> int:
        return max(1, len(self.clause_named_objects))

    def clauses(self, instruction: str) -> list[str]:
        """The clauses of one of this task's instructions (policies.split_instruction), checked against the task's."""
        from policies.instructions import split_instruction

        clauses = split_instruction(instruction)
        if len(clauses) != self.num_clauses:
            raise ValueError(f"task {self.name}: instruction {instruction!r} splits into {len(clauses)} clause(s) "
                             f"({clauses}), but the task has {self.num_clauses}")
        return clauses

    def clause_done(self, sim: PhysicsBackend, clause: int) -> bool:
        """Whether clause `clause` (< num_clauses - 1) is done now; the last one is done at `success`."""
        raise NotImplementedError(f"{self.name} has {self.num_clauses} clauses and does not say when they are done")

    def success(self, sim: PhysicsBackend) -> bool:
        raise NotImplementedError

    def _colored(self, rng, roles: list[str]) -> tuple[dict, dict]:
        names = list(rng.permutation(list(COLORS)))[: len(roles)]
        return {r: COLORS[c] for r, c in zip(roles, names)}, dict(zip(roles, names))


# -- predicates shared by tasks ----------------------------------------------------------
def in_tray(sim: PhysicsBackend, obj: str, tray: str, margin: float = 0.0) -> bool:
    pos, _ = sim.object_pose(obj)
    tray_pos, tray_quat = sim.object_pose(tray)
    local = quat_to_matrix(tray_quat).T @ (pos - tray_pos)
    return bool(abs(local[0]) < TRAY[0] - margin and abs(local[1]) < TRAY[1] - margin
                and 0.0 < local[2] < TRAY[2] + 0.02)


def handle_position(sim: PhysicsBackend, drawer: str) -> np.ndarray:
    pos, quat = sim.object_pose(drawer)
    local = np.array([-DRAWER[0] - sim.joint_position(drawer) - DRAWER_HANDLE_OFFSET, 0.0, 0.0])
    return pos + quat_to_matrix(quat) @ local


def button_top(sim: PhysicsBackend, button: str) -> np.ndarray:
    pos, _ = sim.object_pose(button)
    depth = sim.joint_position(button)
    return pos + np.array([0.0, 0.0, 2 * BUTTON_BASE_HALF_HEIGHT + 2 * BUTTON[1] + depth])


def cube_spec(name: str) -> ObjectSpec:
    return ObjectSpec(name, "box", CUBE, mass=0.1, friction=1.0)


def _cube_pose(xy, rng) -> tuple[tuple[float, float, float], float]:
    return (float(xy[0]), float(xy[1]), CUBE_HALF), float(rng.uniform(-np.pi / 4, np.pi / 4))


# -- the tasks ----------------------------------------------------------------------------
class ReachTarget(Task):
    name = "ReachTarget"
    objects = (ObjectSpec("target", "sphere", (0.025,)), ObjectSpec("distractor", "sphere", (0.025,)))
    max_steps = 60
    template = "reach the {target} ball"
    named_objects = ("target",)

    def sample_layout(self, rng):
        placer = Placer(rng, self.name)
        rgba, words = self._colored(rng, ["target", "distractor"])
        poses = {n: ((*map(float, placer.place(0.05)), float(rng.uniform(0.08, 0.28))), 0.0) for n in ("target", "distractor")}
        return Layout(poses, rgba, words)

    def success(self, sim):
        return bool(np.linalg.norm(sim.ee_pose()[0] - sim.object_pose("target")[0]) < 0.03)


class PushCube(Task):
    name = "PushCube"
    objects = (cube_spec("cube"), ObjectSpec("goal", "marker", (0.05, 0.001)))
    max_steps = 150
    template = "push the {cube} cube onto the {goal} circle"
    named_objects = ("cube", "goal")
    goal_radius = 0.04

    def sample_layout(self, rng):
        placer = Placer(rng, self.name)
        rgba, words = self._colored(rng, ["cube", "goal"])
        cube = placer.place(0.03, x=(0.42, 0.56), y=(-0.14, 0.14))
        goal = placer.place(0.05, x=(0.36, 0.64), y=(-0.2, 0.2), clearance=-0.06, near=(cube, 0.1, 0.15))
        return Layout({"cube": _cube_pose(cube, rng), "goal": ((float(goal[0]), float(goal[1]), 0.001), 0.0)}, rgba, words)

    def success(self, sim):
        cube, goal = sim.object_pose("cube")[0], sim.object_pose("goal")[0]
        return bool(np.linalg.norm(cube[:2] - goal[:2]) < self.goal_radius and cube[2] < 0.03)


class PickCube(Task):
    name = "PickCube"
    objects = (cube_spec("cube"), cube_spec("distractor_0"), cube_spec("distractor_1"))
    max_steps = 100
    template = "pick up the {cube} cube"
    named_objects = ("cube",)
    stage_names = ("cube_grasped",)

    def sample_layout(self, rng):
        placer = Placer(rng, self.name)
        roles = ["cube", "distractor_0", "distractor_1"]
        rgba, words = self._colored(rng, roles)
        return Layout({r: _cube_pose(placer.place(0.035), rng) for r in roles}, rgba, words)

    def stages(self, sim):
        return {"cube_grasped": sim.grasped("cube")}

    def success(self, sim):
        return bool(sim.object_pose("cube")[0][2] > 0.1)


class PlaceInTray(Task):
    name = "PlaceInTray"
    objects = (cube_spec("cube"), cube_spec("distractor"), ObjectSpec("tray", "tray", TRAY))
    max_steps = 160
    template = "put the {cube} cube in the {tray} tray"
    named_objects = ("cube", "tray")
    stage_names = ("cube_grasped", "cube_in_tray")

    def sample_layout(self, rng):
        placer = Placer(rng, self.name)
        rgba, words = self._colored(rng, ["cube", "distractor", "tray"])
        tray = placer.place(0.1, x=(0.42, 0.58))
        poses = {"tray": ((float(tray[0]), float(tray[1]), 0.0), 0.0)}
        poses.update({r: _cube_pose(placer.place(0.035), rng) for r in ("cube", "distractor")})
        return Layout(poses, rgba, words)

    def stages(self, sim):
        return {"cube_grasped": sim.grasped("cube"), "cube_in_tray": in_tray(sim, "cube", "tray")}

    def success(self, sim):
        return in_tray(sim, "cube", "tray") and not sim.grasped("cube")


class StackCube(Task):
    name = "StackCube"
    objects = (cube_spec("cube"), cube_spec("base"), cube_spec("distractor"))
    max_steps = 160
    template = "stack the {cube} cube on the {base} cube"
    named_objects = ("cube", "base")
    stage_names = ("cube_grasped",)

    def sample_layout(self, rng):
        placer = Placer(rng, self.name)
        roles = ["cube", "base", "distractor"]
        rgba, words = self._colored(rng, roles)
        return Layout({r: _cube_pose(placer.place(0.035), rng) for r in roles}, rgba, words)

    def stages(self, sim):
        return {"cube_grasped": sim.grasped("cube")}

    def success(self, sim):
        top, base = sim.object_pose("cube")[0], sim.object_pose("base")[0]
        stacked = np.linalg.norm(top[:2] - base[:2]) < 0.02 and abs(top[2] - base[2] - 2 * CUBE_HALF) < 0.008
        return bool(stacked and not sim.grasped("cube"))


class _DrawerTask(Task):
    objects = (ObjectSpec("drawer", "drawer", DRAWER),)
    opening_range = (0.0, 0.0)
    named_objects = ("drawer",)

    def sample_layout(self, rng):
        pos = (float(rng.uniform(0.64, 0.7)), float(rng.uniform(-0.12, 0.12)), DRAWER[2])
        joints = {"drawer": float(rng.uniform(*self.opening_range))}
        return Layout({"drawer": (pos, 0.0)}, {"drawer": FIXTURE_GRAY}, {}, joints)


class OpenDrawer(_DrawerTask):
    name = "OpenDrawer"
    max_steps = 120
    template = "open the drawer"
    opening_range = (0.0, 0.02)

    def success(self, sim):
        return sim.joint_position("drawer") > 0.6 * DRAWER_TRAVEL


class CloseDrawer(_DrawerTask):
    name = "CloseDrawer"
    max_steps = 120
    template = "close the drawer"
    opening_range = (0.11, 0.15)

    def success(self, sim):
        return sim.joint_position("drawer") < 0.015


class PressButton(Task):
    name = "PressButton"
    objects = (ObjectSpec("button", "button", BUTTON), ObjectSpec("distractor", "button", BUTTON))
    max_steps = 80
    template = "press the {button} button"
    named_objects = ("button",)
    stage_names = ("button_pressed",)

    def sample_layout(self, rng):
        placer = Placer(rng, self.name)
        rgba, words = self._colored(rng, ["button", "distractor"])
        return Layout({r: ((*map(float, placer.place(0.04, clearance=0.06)), 0.0), 0.0) for r in ("button", "distractor")},
                      rgba, words)

    def stages(self, sim):
        return {"button_pressed": "button" in self.latched}

    def success(self, sim):
        return "button" in self.latched and "distractor" not in self.latched


class SortByColor(Task):
    name = "SortByColor"
    objects = (cube_spec("cube_a"), cube_spec("cube_b"), ObjectSpec("tray_a", "tray", TRAY), ObjectSpec("tray_b", "tray", TRAY))
    max_steps = 320
    template = "put the {a} cube in the {a} tray and the {b} cube in the {b} tray"
    named_objects = ("cube_a", "tray_a", "cube_b", "tray_b")
    stage_names = ("cube_a_grasped", "cube_a_in_tray", "cube_b_grasped", "cube_b_in_tray")
    clause_named_objects = (("cube_a", "tray_a"), ("cube_b", "tray_b"))

    def sample_layout(self, rng):
        placer = Placer(rng, self.name)
        names = list(rng.permutation(list(COLORS)))[:2]
        words = {"a": names[0], "b": names[1]}
        rgba = {"cube_a": COLORS[names[0]], "tray_a": COLORS[names[0]], "cube_b": COLORS[names[1]], "tray_b": COLORS[names[1]]}
        side = 1.0 if rng.random() < 0.5 else -1.0  # which tray is on the left
        poses = {}
        for tray, sign in (("tray_a", side), ("tray_b", -side)):
            xy = placer.place(0.1, x=(0.5, 0.6), y=(0.13 * sign - 0.03, 0.13 * sign + 0.03), clearance=0.0)
            poses[tray] = ((float(xy[0]), float(xy[1]), 0.0), 0.0)
        for cube in ("cube_a", "cube_b"):
            poses[cube] = _cube_pose(placer.place(0.035, x=(0.34, 0.44), y=(-0.2, 0.2)), rng)
        return Layout(poses, rgba, words)

    def stages(self, sim):
        return {"cube_a_grasped": sim.grasped("cube_a"), "cube_a_in_tray": in_tray(sim, "cube_a", "tray_a"),
                "cube_b_grasped": sim.grasped("cube_b"), "cube_b_in_tray": in_tray(sim, "cube_b", "tray_b")}

    def clause_done(self, sim, clause):
        return in_tray(sim, "cube_a", "tray_a") and not sim.grasped("cube_a")  # let go in its tray

    def success(self, sim):
        return (in_tray(sim, "cube_a", "tray_a") and in_tray(sim, "cube_b", "tray_b")
                and not sim.grasped("cube_a") and not sim.grasped("cube_b"))


class ButtonThenTray(Task):
    """Two steps, LIBERO-long style: the predicate is the AND of both goals."""

    name = "ButtonThenTray"
    objects = (ObjectSpec("button", "button", BUTTON), cube_spec("cube"), cube_spec("distractor"), ObjectSpec("tray", "tray", TRAY))
    max_steps = 260
    template = "press the {button} button, then put the {cube} cube in the tray"
    named_objects = ("button", "cube", "tray")
    stage_names = ("button_pressed", "cube_grasped", "cube_in_tray")
    clause_named_objects = (("button",), ("cube", "tray"))

    def sample_layout(self, rng):
        placer = Placer(rng, self.name)
        rgba, words = self._colored(rng, ["button", "cube", "distractor"])
        rgba["tray"] = FIXTURE_GRAY
        tray = placer.place(0.1, x=(0.45, 0.58))
        poses = {"tray": ((float(tray[0]), float(tray[1]), 0.0), 0.0),
                 "button": ((*map(float, placer.place(0.04, clearance=0.04)), 0.0), 0.0)}
        poses.update({r: _cube_pose(placer.place(0.035), rng) for r in ("cube", "distractor")})
        return Layout(poses, rgba, words)

    def stages(self, sim):
        return {"button_pressed": "button" in self.latched, "cube_grasped": sim.grasped("cube"),
                "cube_in_tray": in_tray(sim, "cube", "tray")}

    def clause_done(self, sim, clause):
        return "button" in self.latched

    def success(self, sim):
        return "button" in self.latched and in_tray(sim, "cube", "tray") and not sim.grasped("cube")


TASKS: dict[str, type[Task]] = {t.name: t for t in (ReachTarget, PushCube, PickCube, PlaceInTray, StackCube, OpenDrawer,
                                                    CloseDrawer, PressButton, SortByColor, ButtonThenTray)}


def make_task(name: str) -> Task:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r}; valid tasks: {', '.join(TASKS)}")
    return TASKS[name]()
