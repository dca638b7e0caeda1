"""Why PushCube fails: what the cube did, and where the policy's object readout put the cube and the goal.

    python benchmarks/push_failures.py --policy runs/default/final --episodes 30

For a policy with object tokens (`policy.object_slots`), run on the suite's first PushCube initial states
(the evaluation's seeds). Per episode: how far the cube moved against how far it had to go, the angle
between its displacement and the cube-to-goal line, its final distance to the goal (success: < 4 cm), the
readout's error on the cube and on the goal (x-y, cm) at the first frame and over the last 30 steps, and
the mean commanded translation over the last 30 steps (a stalled arm commands ~0). Printed as a table, with
the means over successes and failures and the failures counted by how they end (the arm stalled, the cube
near the goal, the cube hardly moved), and written as JSON with --out.

Two oracles test what the readout's errors cost, without training anything: --first-frame-goal makes the
policy's readout keep the goal where it located it in the episode's first frame (object memory: the goal
never moves), --true-positions gives the policy the simulator's positions of the cube and the goal instead.
A policy trained on the readout's positions has learned how far to trust them, so the second oracle bounds
from below what a precise readout would give (benchmarks/push_state_bc.py --position-noise measures that
from state). --expert-driven lets the scripted expert push instead, to measure the readout along the
demonstrations' own states; `cube_error_contact_cm` is its error while the fingers are low and near the
cube (below 4 cm, within 7 cm of its centre), where the push's steering reads it.
"""
from __future__ import annotations

import argparse
import json
import sys
from contextlib import nullcontext
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

CONTACT_HEIGHT_M, CONTACT_RANGE_M = 0.04, 0.07  # the fingers low and near the cube: the push's steering
TAIL = 30  # steps at the end of an episode that the "last" columns average over
# how failures are counted (RESULTS.md's push tables): the arm stalled, the cube stopped near the goal, or it
# hardly moved
STALLED_CM, NEAR_GOAL_CM, UNMOVED_CM = 0.5, 6.0, 2.0


def in_contact(env) -> bool:
    """The fingers below CONTACT_HEIGHT_M and within CONTACT_RANGE_M of the cube's centre (x-y)."""
    tool, cube = env.sim.ee_pose()[0], env.sim.object_pose("cube")[0][:2]
    return bool(tool[2] < CONTACT_HEIGHT_M and np.linalg.norm(tool[:2] - cube) < CONTACT_RANGE_M)


class ReadoutOverride:
    """While entered, a readout's output (B, slots, 3) passes through `edit` before the policy reads it."""

    def __init__(self, readout, edit):
        self.readout, self.edit = readout, edit

    def __enter__(self):
        self.readout.forward = lambda *args, **kwargs: self.edit(
            type(self.readout).forward(self.readout, *args, **kwargs).clone())

    def __exit__(self, *exc):
        del self.readout.forward


def first_frame_memory(readout, slot: int) -> ReadoutOverride:
    """The oracle for object memory: `slot` stays where the readout located it on its first call."""
    first = []

    def edit(out):
        if not first:
            first.append(out[:, slot].clone())
        out[:, slot] = first[0]
        return out

    return ReadoutOverride(readout, edit)


def simulator_positions(readout, env, slots: dict[str, int]) -> ReadoutOverride:
    """The oracle for localization: the simulator's positions (readout units) of the objects given."""
    import torch

    from embodied.vision_pretraining import CENTRE, SCALE

    def edit(out):
        for role, slot in slots.items():
            out[:, slot] = torch.as_tensor((env.sim.object_pose(role)[0] - CENTRE) / SCALE, dtype=out.dtype)
        return out

    return ReadoutOverride(readout, edit)


def run_episode(policy, env, seed: int, first_frame_goal: bool = False, true_positions: bool = False,
                expert_driven: bool = False) -> dict:
    import torch

    from embodied.vision_pretraining import CENTRE, SCALE
    from envs.layouts import object_slots

    obs, _ = env.reset(seed=int(seed))
    policy.reset()
    slots = object_slots(env)
    if first_frame_goal and true_positions:
        raise ValueError("choose one oracle: first_frame_goal or true_positions")
    memory = (first_frame_memory(policy.object_readout, slots["goal"]) if first_frame_goal else
              simulator_positions(policy.object_readout, env, {r: slots[r] for r in ("cube", "goal")}) if true_positions
              else nullcontext())
    goal = env.sim.object_pose("goal")[0][:2].copy()
    start = env.sim.object_pose("cube")[0][:2].copy()
    cube_err, goal_err, moves, contact, success = [], [], [], [], False
    for _ in range(env.max_episode_steps):
        with torch.no_grad():  # what the readout sees now (the memory applies to the policy only)
            located = policy.locate_objects(obs["image"][None], obs["state"][None],
                                            obs["wrist_image"][None] if "wrist_image" in obs else None)
        located = located[0].numpy() * SCALE + CENTRE
        cube = env.sim.object_pose("cube")[0][:2]
        cube_err.append(100 * np.linalg.norm(located[slots["cube"], :2] - cube))
        goal_err.append(100 * np.linalg.norm(located[slots["goal"], :2] - goal))
        contact.append(in_contact(env))
        if expert_driven:
            action = env.expert_action()
        else:
            with memory:
                action = policy.select_action(obs)
        moves.append(100 * np.linalg.norm(action[:3]))
        obs, _, success, _, _ = env.step(action)
        if success:
            break
    end = env.sim.object_pose("cube")[0][:2]
    moved, wanted = end - start, goal - start
    cosine = moved @ wanted / (np.linalg.norm(moved) * np.linalg.norm(wanted) + 1e-9)
    return {"seed": int(seed), "success": bool(success), "steps": len(moves),
            "moved_cm": 100 * float(np.linalg.norm(moved)), "needed_cm": 100 * float(np.linalg.norm(wanted)),
            "angle_deg": float(np.degrees(np.arccos(np.clip(cosine, -1, 1)))) if np.linalg.norm(moved) > 0.005 else None,
            "final_cm": 100 * float(np.linalg.norm(end - goal)),
            "cube_error_first_cm": float(cube_err[0]), "goal_error_first_cm": float(goal_err[0]),
            "cube_error_last_cm": float(np.mean(cube_err[-TAIL:])), "goal_error_last_cm": float(np.mean(goal_err[-TAIL:])),
            "cube_error_contact_cm": float(np.mean(np.asarray(cube_err)[contact])) if any(contact) else None,
            "command_last_cm": float(np.mean(moves[-TAIL:]))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--policy", required=True, help="a checkpoint directory with object tokens")
    parser.add_argument("--episodes", type=int, default=30)
    parser.add_argument("--suite", default="tabletop10")
    parser.add_argument("--backend", default="mujoco")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--first-frame-goal", action="store_true",
                        help="the readout keeps the goal where it located it in the first frame")
    parser.add_argument("--true-positions", action="store_true",
                        help="the policy reads the simulator's cube and goal positions instead of the readout's")
    parser.add_argument("--expert-driven", action="store_true",
                        help="the scripted expert pushes (the readout is measured along demonstration states)")
    parser.add_argument("--out", help="write the rows and summary as JSON here")
    args = parser.parse_args()
    if args.expert_driven and (args.first_frame_goal or args.true_positions):
        raise SystemExit("--expert-driven measures the readout along the expert's pushes: the oracles change "
                         "only what the policy reads")

    import torch

    from envs.env import TabletopEnv
    from envs.suites import get_suite
    from policies import load_pretrained

    torch.set_num_threads(args.threads)
    policy = load_pretrained(args.policy).eval()
    if policy.object_readout is None:
        raise SystemExit(f"{args.policy}: the policy has no object readout (policy.object_slots=0)")
    env = TabletopEnv("PushCube", backend=args.backend, image_size=policy.config.observation_image_size,
                      wrist_camera=policy.config.wrist_image)
    seeds = get_suite(args.suite).episode_seeds("PushCube", args.episodes, seed=0)
    columns = ["success", "moved_cm", "needed_cm", "angle_deg", "final_cm", "cube_error_first_cm",
               "goal_error_first_cm", "cube_error_last_cm", "goal_error_last_cm", "cube_error_contact_cm",
               "command_last_cm"]
    print("| episode | " + " | ".join(columns) + " |\n|" + "---|" * (len(columns) + 1))
    rows = []
    try:
        for i, seed in enumerate(seeds):
            row = run_episode(policy, env, seed, args.first_frame_goal, args.true_positions, args.expert_driven)
            rows.append(row)
            cells = [("yes" if row[c] else "no") if c == "success" else ("-" if row[c] is None else f"{row[c]:.1f}")
                     for c in columns]
            print(f"| {i} | " + " | ".join(cells) + " |", flush=True)
    finally:
        env.close()
    failures = [r for r in rows if not r["success"]]
    summary = {}
    for outcome, chosen in (("success", [r for r in rows if r["success"]]), ("failure", failures)):
        summary[outcome] = {"episodes": len(chosen)}
        for c in columns[1:]:
            values = [r[c] for r in chosen if r[c] is not None]
            summary[outcome][c] = float(np.mean(values)) if values else None
    print("\n| outcome | episodes | " + " | ".join(columns[1:]) + " |\n|" + "---|" * (len(columns) + 1))
    for outcome, values in summary.items():
        cells = ["-" if values[c] is None else f"{values[c]:.1f}" for c in columns[1:]]
        print(f"| {outcome} | {values['episodes']} | " + " | ".join(cells) + " |")
    counts = {"stalled": sum(r["command_last_cm"] < STALLED_CM for r in failures),
              "near_goal": sum(r["final_cm"] < NEAR_GOAL_CM for r in failures),
              "cube_unmoved": sum(r["moved_cm"] < UNMOVED_CM for r in failures)}
    summary["failure_counts"] = counts
    print(f"\nof {len(failures)} failures: {counts['stalled']} stalled (< {STALLED_CM} cm commanded a step over the "
          f"last {TAIL}), {counts['near_goal']} ended within {NEAR_GOAL_CM:g} cm of the goal, "
          f"{counts['cube_unmoved']} moved the cube < {UNMOVED_CM:g} cm")
    if args.out:
        Path(args.out).write_text(json.dumps({"policy": args.policy, "first_frame_goal": args.first_frame_goal,
                                              "true_positions": args.true_positions, "expert_driven": args.expert_driven,
                                              "rows": rows, "summary": summary}, indent=2))


if __name__ == "__main__":
    main()
