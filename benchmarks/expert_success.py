"""Scripted-expert success on the tabletop10 suite, per task, engine and randomization.

    python benchmarks/expert_success.py --backend mujoco pybullet --episodes 50 --randomization none default

Targets: >= 95% per task without randomization, >= 90% under the default randomization.
Images are rendered small (they don't affect the expert, which reads simulator state).
"""
from __future__ import annotations

import argparse
import json
import tempfile
import time

from embodied.evaluation import EvalConfig, ScriptedPolicy, evaluate
from envs.rendering import configure_mujoco_gl


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", default=["mujoco", "pybullet"])
    parser.add_argument("--randomization", nargs="+", default=["none", "default"])
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--tasks", nargs="*", default=None)
    parser.add_argument("--num-envs", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--json", default=None, help="also write all results to this file")
    args = parser.parse_args()
    configure_mujoco_gl()

    table, everything = {}, {}
    for backend in args.backend:
        for randomization in args.randomization:
            cfg = EvalConfig(backend=backend, episodes_per_task=args.episodes, tasks=args.tasks, num_envs=args.num_envs,
                             randomization=randomization, image_size=args.image_size, videos_per_task=0)
            start = time.time()
            with tempfile.TemporaryDirectory() as out:
                results = evaluate(ScriptedPolicy(), cfg, out)
            key = f"{backend}/{randomization}"
            everything[key] = results
            table[key] = {t: r["success_rate"] for t, r in results["tasks"].items()}
            table[key]["overall"] = results["overall"]["success_rate"]
            print(f"{key}: overall {results['overall']['success_rate']:.1%} in {time.time() - start:.0f}s", flush=True)

    keys = list(table)
    tasks = list(next(iter(table.values())))
    print("\n| task | " + " | ".join(keys) + " |")
    print("|---|" + "---|" * len(keys))
    for task in tasks:
        print(f"| {task} | " + " | ".join(f"{table[k][task]:.0%}" for k in keys) + " |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=2)


if __name__ == "__main__":
    main()
