"""Does a trained policy use its camera? Its actions on recorded frames, with the true images and with shuffled ones.

    python benchmarks/policy_image_use.py --policy runs/default/final --data data/rlds/embodied_tabletop10_mujoco

For every task, frames are taken from the last `--episodes` recorded episodes (every `--stride`-th
step). The policy's first predicted action is compared with the recorded one (Pearson r per
translation axis); then the same frames are run again with their images permuted among the task's
frames, state and instruction kept. A policy that uses what it sees loses accuracy when the images
are shuffled; one whose r does not move reads only its state and instruction: it is blind, and no
amount of closed-loop execution will find an object whose position varies per episode. A policy
that reads the wrist camera gets each frame's wrist image too, shuffled with its front image.

For a policy with a keyframe head (`policy.keyframe_loss_weight > 0`) it also reports the head's
error on the next keyframe's position (median, cm), with true and shuffled images, against the
distance from the current position (standing still). Run it on the training data and on episodes
collected from other seeds: a head that beats shuffled images only on the training layouts has
memorized them rather than learnt to localize.
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def task_of(instruction: str, patterns: dict[str, re.Pattern]) -> str:
    for task, pattern in patterns.items():
        if pattern.fullmatch(instruction):
            return task
    return "other"


def template_patterns() -> dict[str, re.Pattern]:
    """The suite's instruction templates as regular expressions (colour fields match any word)."""
    from envs.tasks import TASKS

    patterns = {}
    for name, cls in TASKS.items():
        parts = re.split(r"\{[a-z_0-9]+\}", cls.template)
        patterns[name] = re.compile(r"\w+".join(re.escape(p) for p in parts))
    return patterns


def pearson(a: np.ndarray, b: np.ndarray) -> float:
    if a.std() < 1e-9 or b.std() < 1e-9:
        return 0.0  # a constant prediction carries no information
    return float(np.corrcoef(a, b)[0, 1])


def measure(policy, frames: list[dict], seed: int = 0, batch: int = 64) -> dict:
    labels = np.stack([f["action"] for f in frames])
    instructions = [f["instruction"] for f in frames]

    def observation(views, frame):
        return {**views, "state": frame["state"]}

    def predict(images):
        obs = [observation(views, f) for views, f in zip(images, frames)]
        return np.concatenate([np.asarray(policy.predict_actions(obs[i:i + batch], instructions[i:i + batch]))
                               .reshape(len(obs[i:i + batch]), -1, labels.shape[-1])[:, 0]
                               for i in range(0, len(obs), batch)])

    def keyframe_errors_cm(images):
        obs = [observation(views, f) for views, f in zip(images, frames)]
        predicted = np.concatenate([policy.predict_keyframe_states(obs[i:i + batch], instructions[i:i + batch])
                                    for i in range(0, len(obs), batch)])
        return np.linalg.norm(predicted[:, :3] - np.stack([f["keyframe"] for f in frames]), axis=1) * 100

    # a frame's camera views (front, and wrist when recorded) are shuffled together
    images = [{key: f[key] for key in ("image", "wrist_image") if key in f} for f in frames]
    real = predict(images)
    order = np.random.default_rng(seed).permutation(len(frames))
    shuffled_images = [images[j] for j in order]
    shuffled = predict(shuffled_images)
    out = {"frames": len(frames),
           "r_true_images": [pearson(real[:, d], labels[:, d]) for d in range(3)],
           "r_shuffled_images": [pearson(shuffled[:, d], labels[:, d]) for d in range(3)],
           "mean_abs_change_mm": (np.abs(real - shuffled)[:, :3].mean(0) * 1000).tolist(),
           "label_spread_mm": (np.abs(labels[:, :3] - labels[:, :3].mean(0)).mean(0) * 1000).tolist()}
    if getattr(policy, "keyframe_head", None) is not None:
        standing_still = np.linalg.norm(np.stack([f["state"][:3] - f["keyframe"] for f in frames]), axis=1) * 100
        out["keyframe_error_cm"] = {"true_images": float(np.median(keyframe_errors_cm(images))),
                                    "shuffled_images": float(np.median(keyframe_errors_cm(shuffled_images))),
                                    "standing_still": float(np.median(standing_still))}
    return out


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="a checkpoint directory")
    parser.add_argument("--data", required=True, help="an RLDS builder directory (or dataset name with --data-dir)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--episodes", type=int, default=40, help="per task, the last ones in the file")
    parser.add_argument("--stride", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    import policies
    from embodied.data import RLDSSource
    from embodied.data.transforms import next_keyframe_states

    torch.set_num_threads(args.threads)
    policy = policies.load_pretrained(args.policy)
    patterns = template_patterns()
    by_task: dict[str, list[list[dict]]] = {}
    wrist = bool(getattr(policy.config, "wrist_image", False))
    for episode in RLDSSource(args.data, args.data_dir, split="train[:100%]", wrist_image=wrist).episodes():
        keyframes = np.asarray(next_keyframe_states(episode["state"], episode["action"]))[:, :3]
        frames = [{"image": episode["image"][t], "state": episode["state"][t], "action": episode["action"][t],
                   "instruction": episode["instruction"][t], "keyframe": keyframes[t],
                   **({"wrist_image": episode["wrist_image"][t]} if wrist else {})}
                  for t in range(0, len(episode["action"]), args.stride)]
        by_task.setdefault(task_of(episode["instruction"][0], patterns), []).append(frames)
    report = {"policy": args.policy, "data": args.data, "tasks": {}}
    keyframe = getattr(policy, "keyframe_head", None) is not None
    print("| task | frames | r true images (x, y, z) | r shuffled images (x, y, z) | mean change of x, y, z (mm) |"
          " label spread (mm) |" + (" keyframe error (cm): true images / shuffled / standing still |" if keyframe else ""))
    print("|---|---|---|---|---|---|" + ("---|" if keyframe else ""))
    for task, episodes in by_task.items():
        frames = [f for episode in episodes[-args.episodes:] for f in episode]
        r = report["tasks"][task] = measure(policy, frames)
        fmt = lambda values, digits=2: ", ".join(f"{v:.{digits}f}" for v in values)  # noqa: E731
        k = r.get("keyframe_error_cm")
        print(f"| {task} | {r['frames']} | {fmt(r['r_true_images'])} | {fmt(r['r_shuffled_images'])} | "
              f"{fmt(r['mean_abs_change_mm'], 1)} | {fmt(r['label_spread_mm'], 1)} |"
              + (f" {k['true_images']:.1f} / {k['shuffled_images']:.1f} / {k['standing_still']:.1f} |" if k else ""),
              flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
