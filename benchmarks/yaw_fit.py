"""How well a trained policy predicts the wrist's turn (yaw) on demonstration frames.

The scripted experts turn the wrist in a few frames of each grasp or push (the yaw action is clipped to
0.25 rad a step), so turning frames are rare. This reads the first episodes of the named tasks from an RLDS
dataset (by default the one the policy was trained on), asks the policy for its chunk at every frame where
the expert turns by more than `--min-turn` rad, and compares the first action's yaw with the label: mean
labelled and predicted turn, the fraction of frames with the right sign, and their correlation. A policy
that ignores the turn predicts ~0 with signs at chance.

    python benchmarks/yaw_fit.py --policy runs/default/final --data-dir data/rlds --tasks PickCube PushCube
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from policy_image_use import pearson, task_of, template_patterns  # noqa: E402


def yaw_frames(source, tasks: list[str], episodes: int, min_turn: float, image_size: int):
    """Per task: observations and labelled yaw of the turning frames of its first `episodes` episodes."""
    # trajectories carry the instruction, not the task: it is matched against each task's template
    patterns = template_patterns()
    unknown = [task for task in tasks if task not in patterns]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {', '.join(patterns)}")
    found = {task: {"observations": [], "yaw": [], "episodes": 0, "frames": 0} for task in tasks}
    for episode in source.episodes(image_size):
        entry = found.get(task_of(episode["instruction"][0], patterns))
        if entry is None or entry["episodes"] >= episodes:
            if all(e["episodes"] >= episodes for e in found.values()):
                break
            continue
        entry["episodes"] += 1
        yaw = np.asarray(episode["action"])[:, 5]
        entry["frames"] += len(yaw)
        for t in np.flatnonzero(np.abs(yaw) > min_turn):
            obs = {"image": episode["image"][t], "state": episode["state"][t], "instruction": episode["instruction"][t]}
            if "wrist_image" in episode:
                obs["wrist_image"] = episode["wrist_image"][t]
            entry["observations"].append(obs)
            entry["yaw"].append(float(yaw[t]))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="a checkpoint directory (save_pretrained)")
    parser.add_argument("--data-dir", default="data/rlds")
    parser.add_argument("--dataset", default="embodied_tabletop10_mujoco")
    parser.add_argument("--tasks", nargs="+", default=["PickCube", "PushCube"])
    parser.add_argument("--episodes", type=int, default=15, help="first episodes per task")
    parser.add_argument("--min-turn", type=float, default=0.05, help="rad: frames whose labelled yaw exceeds it")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default=None, help="a JSON file for the figures")
    args = parser.parse_args(argv)

    import policies
    from embodied.data.reader import RLDSSource

    policy = policies.load_pretrained(args.policy).eval()
    source = RLDSSource(args.dataset, args.data_dir, wrist_image=bool(policy.config.wrist_image))
    frames = yaw_frames(source, args.tasks, args.episodes, args.min_turn, int(policy.config.observation_image_size))
    report = {"policy": os.fspath(args.policy), "dataset": str(source.builder_dir), "min_turn": args.min_turn}
    print(f"| task | episodes | turning frames | labelled turn (rad, mean abs) | predicted (mean abs) | right sign | correlation |")
    print("|---|---|---|---|---|---|---|")
    for task, entry in frames.items():
        if not entry["yaw"]:
            raise SystemExit(f"no frame of {task} turns by more than {args.min_turn} rad in the first "
                             f"{args.episodes} episodes of {source.builder_dir}")
        predicted = []
        obs = entry["observations"]
        for i in range(0, len(obs), args.batch):
            batch = obs[i:i + args.batch]
            predicted.append(policy.predict_actions(batch, [o["instruction"] for o in batch])[:, 0, 5])
        pred, label = np.concatenate(predicted), np.asarray(entry["yaw"])
        row = {"episodes": entry["episodes"], "frames": entry["frames"], "turning_frames": len(label),
               "label_abs": float(np.abs(label).mean()), "predicted_abs": float(np.abs(pred).mean()),
               "right_sign": float(np.mean(np.sign(pred) == np.sign(label))),
               "correlation": pearson(pred, label)}
        report[task] = row
        print(f"| {task} | {row['episodes']} | {row['turning_frames']} of {row['frames']} | {row['label_abs']:.3f} | "
              f"{row['predicted_abs']:.3f} | {row['right_sign']:.0%} | {row['correlation']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
