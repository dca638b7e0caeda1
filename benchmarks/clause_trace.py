"""Where a policy prompted clause by clause goes after it moves on to the next clause.

    python benchmarks/clause_trace.py --policy runs/X/final --task SortByColor --episodes 10
    python benchmarks/clause_trace.py --policy runs/X/final --clause-release-opening 0   # without the release signal

Runs the suite's first initial states of a multi-step task in one env and prints, per episode: the step the
policy moved to the next clause, the stages reached by then, how close the arm came to its start pose after
it (the experts go back there between clauses), what it grasped after it, and the outcome.
"""
from __future__ import annotations

import argparse
import types

import numpy as np

from embodied.evaluation import make_eval_policy
from envs.env import TabletopEnv
from envs.suites import get_suite


def trace(policy_dir: str, task: str, episodes: int, backend: str = "mujoco",
          clause_release_opening: float | None = None) -> list[dict]:
    policy = make_eval_policy(policy_dir, clause_release_opening=clause_release_opening)
    config = policy.policy.config
    env = TabletopEnv(task, backend=backend, image_size=config.observation_image_size,
                      wrist_camera=bool(getattr(config, "wrist_image", False)), randomization="default")
    boxes = [o.name for o in env.task.objects if o.kind == "box"]
    one = types.SimpleNamespace(num_envs=1)
    rows = []
    for seed in get_suite("tabletop10").episode_seeds(task, episodes):
        obs, info = env.reset(seed=seed)
        policy.reset([0])
        start = env.sim.ee_pose()[0].copy()
        switch, at_switch, after, grasped, said, last_said = None, None, [], [], None, 0.0
        for step in range(env.max_episode_steps):
            batch = {k: np.asarray(v)[None] if k != "instruction" else np.array([v]) for k, v in obs.items()}
            action = policy.act(batch, one)[0]
            obs, _, terminated, truncated, info = env.step(action)
            if switch is None and policy.actions.clause(0) > 0:
                switch, at_switch = step, {k: bool(v) for k, v in info["stages"].items()}
                said = last_said  # the clause-done head's last probability before it (0 without the head)
            last_said = policy.actions.clause_done_probability(0)
            if switch is not None:
                after.append(float(np.linalg.norm(env.sim.ee_pose()[0] - start)))
                grasped += [n for n in boxes if env.sim.grasped(n) and n not in grasped]
            if terminated or truncated:
                break
        rows.append({"seed": seed, "switch": switch, "stages_at_switch": at_switch, "done_probability": said,
                     "closest_to_start_cm": None if not after else round(100 * min(after), 1),
                     "grasped_after": grasped, "stages": info["stages"],
                     "success": bool(info["success"]), "steps": step + 1})
    env.close()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True)
    parser.add_argument("--task", default="SortByColor", choices=["SortByColor", "ButtonThenTray"])
    parser.add_argument("--episodes", type=int, default=10)
    parser.add_argument("--backend", default="mujoco")
    parser.add_argument("--clause-release-opening", type=float, default=None,
                        help="override the checkpoint's clause_release_opening (0: off)")
    args = parser.parse_args()
    rows = trace(args.policy, args.task, args.episodes, args.backend, args.clause_release_opening)
    print("| seed | switch step | done probability before it | stages at the switch | closest to start after (cm) "
          "| grasped after | stages at the end | success |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        done = ", ".join(k for k, v in (r["stages_at_switch"] or {}).items() if v) or "-"
        end = ", ".join(k for k, v in r["stages"].items() if v) or "-"
        said = "-" if r["done_probability"] is None else f"{r['done_probability']:.2f}"
        print(f"| {r['seed']} | {r['switch']} | {said} | {done} | {r['closest_to_start_cm']} | {', '.join(r['grasped_after']) or '-'} "
              f"| {end} | {r['success']} |")
    switched = [r for r in rows if r["switch"] is not None]
    home = [r for r in switched if r["closest_to_start_cm"] < 3.0]
    print(f"\n{len(switched)}/{len(rows)} moved on to the next clause; {len(home)} of them came within 3 cm of the "
          f"start pose; {sum(r['success'] for r in rows)} succeeded")


if __name__ == "__main__":
    main()
