"""How well a trained policy fits rare motions on its own demonstration frames.

Two kinds of frames, each a few per episode:
- `turning`: the expert turns the wrist (|yaw| > `--min-label` rad; yaw is clipped to 0.25 rad a step) in
  a grasp or push. Compared: the yaw.
- `lifting`: the gripper is closed and the expert lifts (dz > `--min-label` m; 3 cm a step) after a grasp.
  Compared: dz.

This reads the first episodes of the named tasks from an RLDS dataset (by default the one the policy was
trained on), asks the policy for its chunk at every such frame, and compares the first action's value with
the label: mean labelled and predicted magnitude, the fraction of frames with the right sign, and their
correlation. A policy that ignores the motion predicts ~0 with signs at chance.

    python benchmarks/action_fit.py --policy runs/default/final --data-dir data/rlds --tasks PickCube PushCube
    python benchmarks/action_fit.py --policy runs/default/final --frames lifting --min-label 0.01 --tasks PickCube PlaceInTray
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


FRAMES = {"turning": 5, "lifting": 2}  # the compared action dimension: yaw, dz


def selected(actions: np.ndarray, frames: str, min_label: float) -> np.ndarray:
    """Indices of an episode's frames of the kind asked for."""
    if frames == "turning":
        return np.flatnonzero(np.abs(actions[:, 5]) > min_label)
    return np.flatnonzero((actions[:, 6] < 0.5) & (actions[:, 2] > min_label))


def labelled_frames(source, tasks: list[str], episodes: int, frames: str, min_label: float, image_size: int):
    """Per task: observations and labels (the compared dimension) of the selected frames of its first
    `episodes` episodes."""
    # trajectories carry the instruction, not the task: it is matched against each task's template
    patterns = template_patterns()
    unknown = [task for task in tasks if task not in patterns]
    if unknown:
        raise SystemExit(f"unknown task(s) {unknown}; known: {', '.join(patterns)}")
    found = {task: {"observations": [], "label": [], "episodes": 0, "frames": 0} for task in tasks}
    for episode in source.episodes(image_size):
        entry = found.get(task_of(episode["instruction"][0], patterns))
        if entry is None or entry["episodes"] >= episodes:
            if all(e["episodes"] >= episodes for e in found.values()):
                break
            continue
        entry["episodes"] += 1
        actions = np.asarray(episode["action"])
        entry["frames"] += len(actions)
        for t in selected(actions, frames, min_label):
            obs = {"image": episode["image"][t], "state": episode["state"][t], "instruction": episode["instruction"][t]}
            if "wrist_image" in episode:
                obs["wrist_image"] = episode["wrist_image"][t]
            entry["observations"].append(obs)
            entry["label"].append(float(actions[t, FRAMES[frames]]))
    return found


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="a checkpoint directory (save_pretrained)")
    parser.add_argument("--data-dir", default="data/rlds")
    parser.add_argument("--dataset", default="embodied_tabletop10_mujoco")
    parser.add_argument("--tasks", nargs="+", default=["PickCube", "PushCube"])
    parser.add_argument("--episodes", type=int, default=15, help="first episodes per task")
    parser.add_argument("--frames", choices=list(FRAMES), default="turning")
    parser.add_argument("--min-label", type=float, default=0.05,
                        help="frames whose label exceeds it: |yaw| in rad (turning), dz in m (lifting)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--out", default=None, help="a JSON file for the figures")
    args = parser.parse_args(argv)

    import policies
    from embodied.data.reader import RLDSSource

    policy = policies.load_pretrained(args.policy).eval()
    source = RLDSSource(args.dataset, args.data_dir, wrist_image=bool(policy.config.wrist_image))
    frames = labelled_frames(source, args.tasks, args.episodes, args.frames, args.min_label,
                             int(policy.config.observation_image_size))
    dim = FRAMES[args.frames]
    report = {"policy": os.fspath(args.policy), "dataset": str(source.builder_dir), "frames": args.frames,
              "min_label": args.min_label}
    unit = "rad" if args.frames == "turning" else "m"
    print(f"| task | episodes | {args.frames} frames | label ({unit}, mean abs) | predicted (mean abs) | right sign | correlation |")
    print("|---|---|---|---|---|---|---|")
    for task, entry in frames.items():
        if not entry["label"]:
            raise SystemExit(f"no {args.frames} frame (label over {args.min_label}) in the first {args.episodes} "
                             f"episodes of {task} in {source.builder_dir}")
        predicted = []
        obs = entry["observations"]
        for i in range(0, len(obs), args.batch):
            batch = obs[i:i + args.batch]
            predicted.append(policy.predict_actions(batch, [o["instruction"] for o in batch])[:, 0, dim])
        pred, label = np.concatenate(predicted), np.asarray(entry["label"])
        row = {"episodes": entry["episodes"], "frames": entry["frames"], "selected_frames": len(label),
               "label_abs": float(np.abs(label).mean()), "predicted_abs": float(np.abs(pred).mean()),
               "right_sign": float(np.mean(np.sign(pred) == np.sign(label))),
               "correlation": pearson(pred, label)}
        report[task] = row
        print(f"| {task} | {row['episodes']} | {row['selected_frames']} of {row['frames']} | {row['label_abs']:.3f} | "
              f"{row['predicted_abs']:.3f} | {row['right_sign']:.0%} | {row['correlation']:.2f} |")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
