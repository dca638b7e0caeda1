"""How learnable are the expert's actions from a few demonstrations, given where the objects truly are?

    python benchmarks/action_learnability.py [--policy RUN/final] --train-episodes 60 --heldout-episodes 15

Collects fresh scripted-expert episodes of every `tabletop10` task on MuJoCo (DART noise of 1 cm on
the executed motion, as the default's collection), recording on every step the simulator's
privileged object positions (`envs.layouts.object_positions`) and which of them the instruction
names (`envs.layouts.named_slots`) beside the image, state, instruction and the expert's action. An
MLP (2 x 256) is fit on the first episodes of each task and scored on the rest (Pearson r of the
translation x, y, z), from these inputs:
- the robot state and the instruction (task, colour words);
- those plus every object's true position (absolute and relative to the tool centre point): the
  learner must still work out which of them the instruction names;
- those plus only the named objects' true positions, in the instruction's order (grounding solved);
- with `--policy` (a checkpoint with `policy.object_slots`): every object as its readout locates it;
  and, if it also has `policy.named_objects`, the named objects as its grounding picks them from the
  located ones (what its named-object tokens carry).
It also reports the readout's error on these episode frames, where the arm is near or holding the
objects (vision pretraining measures it on rendered layouts). A policy with `wrist_image` gets the
episodes' wrist images too.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from object_readout_probe import fit_and_score  # noqa: E402


def expert_episodes(args) -> dict[str, np.ndarray]:
    from envs.env import TabletopEnv
    from envs.layouts import named_slots, object_positions
    from envs.rendering import configure_mujoco_gl

    configure_mujoco_gl()
    task, seeds, image_size, noise, wrist = args
    env = TabletopEnv(task, backend="mujoco", image_size=image_size, wrist_camera=wrist)
    rows = {k: [] for k in ("image", "state", "positions", "present", "named", "action", "instruction", "episode")}
    if wrist:
        rows["wrist_image"] = []
    try:
        for seed in seeds:
            obs, _ = env.reset(seed=seed)
            rng = np.random.default_rng(seed)
            for _ in range(env.max_episode_steps):
                label = env.expert_action()
                positions, present = object_positions(env)
                for key, value in (("image", obs["image"]), ("state", obs["state"]), ("positions", positions),
                                   ("present", present), ("named", named_slots(env)), ("action", label[:3]), ("instruction", env.instruction),
                                   ("episode", seed)):
                    rows[key].append(value)
                if wrist:
                    rows["wrist_image"].append(obs["wrist_image"])
                executed = label.copy()
                executed[:3] += rng.normal(0.0, noise, 3)
                obs, _, terminated, truncated, _ = env.step(executed)
                if terminated or truncated:
                    break
    finally:
        env.close()
    return {k: np.array(v) for k, v in rows.items()}


def named_features(positions: np.ndarray, named: np.ndarray, tcp: np.ndarray) -> np.ndarray:
    """(N, MAX_NAMED * 7): each named object's position, the same from the gripper, and whether none is
    named, in readout units; the form `policies.openvla.named_object_features` gives the policy."""
    chosen = np.take_along_axis(positions, np.maximum(named, 0)[:, :, None], axis=1)
    none = (named < 0)[:, :, None].astype(np.float32)
    chosen = chosen * (1 - none)
    return np.concatenate([chosen, chosen - tcp * (1 - none), none], axis=-1).reshape(len(named), -1)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", default=None, help="a checkpoint with object tokens (policy.object_slots > 0)")
    parser.add_argument("--train-episodes", type=int, default=60, help="per task")
    parser.add_argument("--heldout-episodes", type=int, default=15, help="per task")
    parser.add_argument("--noise", type=float, default=0.01, help="DART noise on the executed motion (m)")
    parser.add_argument("--image-size", type=int, default=112, help="camera images (without --policy)")
    parser.add_argument("--steps", type=int, default=4000)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--json", default=None)
    args = parser.parse_args(argv)

    import torch

    import policies
    from embodied.vision_pretraining import CENTRE, SCALE
    from envs.tasks import COLORS, TASKS
    from policies.openvla import named_object_features

    policy = None
    if args.policy:
        policy = policies.load_pretrained(args.policy).eval()
        if policy.object_readout is None:
            raise SystemExit(f"{args.policy} has no object readout (policy.object_slots=0)")
    grounding = getattr(policy, "grounding", None)
    image_size = int(policy.config.observation_image_size) if policy is not None else args.image_size
    tasks, colours = list(TASKS), list(COLORS)
    per_task = args.train_episodes + args.heldout_episodes
    wrist = bool(getattr(getattr(policy, "config", None), "wrist_image", False))
    jobs = [(task, list(range(100 + 1000 * i, 100 + 1000 * i + per_task)), image_size, args.noise, wrist)
            for i, task in enumerate(tasks)]
    with ProcessPoolExecutor(max_workers=args.workers) as pool:
        episodes = dict(zip(tasks, pool.map(expert_episodes, jobs)))
    torch.set_num_threads(os.cpu_count() or 1)

    splits = {"train": {}, "heldout": {}}
    for k, task in enumerate(tasks):
        data = episodes[task]
        seeds = sorted(set(data["episode"].tolist()))
        for split, chosen in (("train", seeds[:args.train_episodes]), ("heldout", seeds[args.train_episodes:])):
            keep = np.isin(data["episode"], chosen)
            n = int(keep.sum())
            words = np.zeros((n, 2 * len(colours)), dtype=np.float32)
            for row, instruction in enumerate(data["instruction"][keep]):
                for i, word in enumerate([w for w in instruction.split() if w in colours][:2]):
                    words[row, i * len(colours) + colours.index(word)] = 1
            tcp = ((data["state"][keep][:, :3] - CENTRE) / SCALE)[:, None]
            true = (data["positions"][keep] - CENTRE) / SCALE
            part = {"state": data["state"][keep], "action": data["action"][keep], "words": words,
                    "task": np.tile(np.eye(len(tasks))[k], (n, 1)), "task_id": np.full(n, k),
                    "true": np.concatenate([true, true - tcp], 1).reshape(n, -1),
                    "present": data["present"][keep].astype(np.float32),
                    "true_named": named_features(true, data["named"][keep], tcp)}
            if policy is not None:
                images, states = data["image"][keep], data["state"][keep]
                wrist_images = data["wrist_image"][keep] if wrist else None
                with torch.no_grad():
                    located = np.concatenate([
                        policy.locate_objects(images[i:i + 128], states[i:i + 128],
                                              None if wrist_images is None else wrist_images[i:i + 128]).numpy()
                        for i in range(0, n, 128)])
                part["located"] = np.concatenate([located, located - tcp], 1).reshape(n, -1)
                part["located_error_cm"] = np.linalg.norm(located - true, axis=-1) * SCALE * 100
                if grounding is not None:
                    ids, mask = policy.processor.prompt_inputs(list(data["instruction"][keep]))
                    with torch.no_grad():
                        logits = grounding(ids, mask)
                    part["located_named"] = named_object_features(
                        logits, torch.from_numpy(located), torch.from_numpy(data["state"][keep][:, :3])).reshape(n, -1).numpy()
                    part["named_right"] = (logits.argmax(-1).numpy() == np.where(data["named"][keep] < 0, located.shape[1],
                                                                                 data["named"][keep])).all(1)
            for key, value in part.items():
                splits[split].setdefault(key, []).append(value)
    train, heldout = ({k: np.concatenate(v) for k, v in s.items()} for s in (splits["train"], splits["heldout"]))
    train["task_names"] = heldout["task_names"] = np.array(tasks)

    base = ["state", "task", "words"]
    columns = {"state_and_instruction": ("state + instruction", base),
               "with_true_objects": ("+ true objects", base + ["true", "present"]),
               "with_true_named_objects": ("+ true named objects", base + ["true_named"])}
    report = {"policy": args.policy, "train_frames": len(train["action"]), "heldout_frames": len(heldout["action"])}
    if policy is not None:
        present = heldout["present"]
        slot_error = (heldout["located_error_cm"] * present).sum(0) / np.maximum(present.sum(0), 1)
        report["readout_error_cm_on_episode_frames"] = {
            "per_slot": slot_error.round(2).tolist(), "all": float((heldout["located_error_cm"] * present).sum() / present.sum())}
        columns["with_located_objects"] = ("+ located objects", base + ["located"])
        if grounding is not None:
            report["grounding_right_fraction"] = float(heldout["named_right"].mean())
            columns["with_located_named_objects"] = ("+ located named objects", base + ["located_named"])
    for key, (_, inputs) in columns.items():
        report[key] = fit_and_score(train, heldout, inputs, args.steps, 0)
    readout = report.get("readout_error_cm_on_episode_frames")
    print(f"{report['train_frames']} training frames ({args.train_episodes} episodes per task), "
          f"{report['heldout_frames']} held-out frames"
          + (f"; readout error on held-out episode frames {readout['all']:.1f} cm" if readout else "")
          + (f"; grounding right on {100 * report['grounding_right_fraction']:.1f}% of frames" if grounding is not None else "")
          + "; held-out r (x, y, z):")
    print("| task | " + " | ".join(title for title, _ in columns.values()) + " |")
    print("|---" * (len(columns) + 1) + "|")
    fmt = lambda values: ", ".join(f"{v:.2f}" for v in values)  # noqa: E731
    for task in tasks:
        print(f"| {task} | " + " | ".join(fmt(report[key][task]) for key in columns) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return report


if __name__ == "__main__":
    main()
