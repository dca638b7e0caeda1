"""Candidate PushCube experts, measured against the suite's own (`envs/experts.py:push_cube`).

    python benchmarks/push_state_bc.py --expert push_experts:lane_feedback
    python benchmarks/push_state_bc.py --expert push_experts:lane_feedback_fixed_wrist
    python benchmarks/push_state_bc.py --expert push_experts:cage
    python benchmarks/push_state_bc.py --expert push_experts:axis_legs
    python benchmarks/push_state_bc.py  # the suite's own script

lane_feedback and cage succeed on 50 of the suite's 50 PushCube initial states on MuJoCo and PyBullet, with
and without randomization; lane_feedback_fixed_wrist on 49 of 50 (MuJoCo, default randomization). None
replaced the suite's script (benchmarks/RESULTS.md, "Which push expert can be cloned" and "The wrist's
turn"): lane_feedback clones best from privileged state but its pixel clone lands on the cube instead of
behind it; cage's pixel clone cages the cube but never turns the wrist. The suite's script turned the wrist
across the push too, until holding it at yaw 0 doubled how well it clones from state. axis_legs (50 of 50
on MuJoCo, default randomization, in 85.5 steps against the suite's 43.5) clones from state better than
the suite's script (39% against 26% from 90 demonstrations), but its pixel clone pushes 1 of 30
(benchmarks/RESULTS.md, "Push: past the goal's edge, along the table's axes, …").
"""
from __future__ import annotations

from typing import Iterator

import numpy as np

from envs.experts import CLOSED, CUBE_HALF, OPEN, Action, Motion, _pos, _wrap

PUSH_HEIGHT, CLEAR_HEIGHT = 0.02, 0.09  # tool centre while pushing (fingertips at the cube's mid-height); while moving around
CONTACT = CUBE_HALF + 0.015  # tool centre behind the cube's centre while in contact
BEHIND = CUBE_HALF + 0.045  # where the tool comes down behind the cube
LANE = 0.015  # lateral half-width of the lane behind the cube in which the tool pushes
CAGE_LEAD = 0.02  # caging: the tool centre ends this far past the goal (the trailing finger is behind the cube)


def lane_feedback(sim, m, task) -> Iterator[Action]:
    """State feedback, no phases: each action follows from where the tool is relative to the cube and the
    cube-to-goal line. In the lane behind the cube: low, push along the line; above the lane: straight
    down; low beside or in front of the cube: straight up; anywhere else: to above the lane's start."""
    while True:
        cube, goal = _pos(sim, "cube")[:2], _pos(sim, "goal")[:2]
        ee = sim.ee_pose()[0]
        to_goal = goal - cube
        line = to_goal / (np.linalg.norm(to_goal) + 1e-9)
        rel = ee[:2] - cube
        along, lateral = float(rel @ line), float(rel @ np.array([-line[1], line[0]]))
        yaw = _wrap(float(np.arctan2(line[1], line[0])), np.pi)  # fingers side by side across the push
        in_lane = abs(lateral) < LANE and -BEHIND - 0.025 < along < -CUBE_HALF - 0.005
        if in_lane and ee[2] < PUSH_HEIGHT + 0.012:
            target = cube + line * (min(0.02, float(np.linalg.norm(to_goal))) - CONTACT)
            yield m.action(np.array([*target, PUSH_HEIGHT]), yaw, CLOSED, max_step=0.015)[0]
        elif in_lane:
            target = cube + line * min(along, -CONTACT - 0.01)
            yield m.action(np.array([*target, PUSH_HEIGHT]), yaw, CLOSED, max_step=0.02)[0]
        elif ee[2] < CLEAR_HEIGHT - 0.03 and np.linalg.norm(rel) < 0.09:
            yield m.action(np.array([ee[0], ee[1], CLEAR_HEIGHT]), yaw, CLOSED)[0]
        else:
            yield m.action(np.array([*(cube - line * BEHIND), CLEAR_HEIGHT]), yaw, CLOSED)[0]


def cage(sim, m, task) -> Iterator[Action]:
    """The open fingers come down around the cube with their axis along the push, and the trailing finger
    pushes it onto the goal: every move is to a visible place (above the cube, around it, over the goal);
    only the wrist's turn depends on where the goal is from the cube."""
    yield from m.grip(OPEN, steps=2)
    for _ in range(3):
        cube, goal = _pos(sim, "cube")[:2], _pos(sim, "goal")[:2]
        line = (goal - cube) / (np.linalg.norm(goal - cube) + 1e-9)
        # the open fingers (8 cm apart) clear the cube's 5.7 cm diagonal at any yaw of the cube
        yaw = _wrap(float(np.arctan2(line[1], line[0])) + np.pi / 2, np.pi)
        yield from m.goto(lambda: np.array([*_pos(sim, "cube")[:2], 0.1]), yaw, tol=0.01)
        yield from m.goto(lambda: np.array([*_pos(sim, "cube")[:2], PUSH_HEIGHT]), yaw, tol=0.008, max_step=0.02)
        target = goal + line * CAGE_LEAD
        for _ in range(60):
            if np.linalg.norm(goal - _pos(sim, "cube")[:2]) < 0.012 or np.linalg.norm(sim.ee_pose()[0][:2] - target) < 0.005:
                break
            yield m.action(np.array([*target, PUSH_HEIGHT]), yaw, OPEN, max_step=0.015)[0]
        if np.linalg.norm(_pos(sim, "cube")[:2] - goal) < 0.02:
            break
        yield from m.lift(0.1)
    yield from m.lift(0.1)


class FixedWristMotion(Motion):
    """The same moves with the wrist held at yaw 0, whatever yaw the script asks for."""

    def action(self, pos, yaw, gripper, max_step=None):
        return super().action(pos, 0.0, gripper, max_step)

    def goto(self, target, yaw=None, **kwargs):
        return super().goto(target, 0.0, **kwargs)


def fixed_wrist(script):
    """`script` run with the wrist never turned: the clone then has no rotation to learn."""

    def run(sim, m, task) -> Iterator[Action]:
        held = FixedWristMotion(sim, m.max_step, m.max_rot)
        yield from script(sim, held, task)
        m.gripper = held.gripper  # the expert holds the last pose with the script's gripper

    run.__name__ = f"{script.__name__}_fixed_wrist"
    return run


lane_feedback_fixed_wrist = fixed_wrist(lane_feedback)


AXIS_DONE = 0.006  # a leg ends once the cube is this close to the goal along the leg's axis


def axis_legs(sim, m, task) -> Iterator[Action]:
    """Two straight legs along the table's axes, wrist at yaw 0: along x until the cube is level with the goal
    in x, then along y. Each leg's direction is +-x or +-y, and which leg comes next follows from the cube's
    offset to the goal alone, so no step depends on the angle of the line from the cube to the goal."""
    yield from m.grip(CLOSED, steps=3)
    for _ in range(6):
        offset = _pos(sim, "goal")[:2] - _pos(sim, "cube")[:2]
        if np.linalg.norm(offset) < 0.02:
            break
        axis = 0 if abs(offset[0]) > 2.5 * AXIS_DONE else 1
        if abs(offset[axis]) < AXIS_DONE:
            break
        direction = np.zeros(2)
        direction[axis] = np.sign(offset[axis])
        behind = _pos(sim, "cube")[:2] - direction * BEHIND
        yield from m.goto(np.array([*behind, 0.1]), 0.0, tol=0.01)
        yield from m.goto(np.array([*behind, PUSH_HEIGHT + 0.005]), 0.0, tol=0.008, max_step=0.02)
        for _ in range(60):
            cube, goal = _pos(sim, "cube")[:2], _pos(sim, "goal")[:2]
            remaining = float((goal - cube) @ direction)
            ee = sim.ee_pose()[0][:2]
            across = 1 - axis
            if remaining < AXIS_DONE or abs(ee[across] - cube[across]) > 0.02 or (cube - ee) @ direction < 0:
                break  # leg done, or the cube slid off the pusher
            target = cube + direction * (min(0.02, remaining) - CONTACT)
            target[across] = cube[across]
            yield m.action(np.array([*target, PUSH_HEIGHT + 0.005]), 0.0, CLOSED, max_step=0.015)[0]
        yield from m.lift(0.1)
    yield from m.lift(0.1)
