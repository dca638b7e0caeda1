"""Can the frozen towers place the cube precisely while it is pushed? The object readout, refit on episode frames.

    python benchmarks/readout_in_contact.py --policy runs/default/final --train-episodes 300 --heldout-episodes 30
    python benchmarks/readout_in_contact.py --policy runs/default/final --other-tasks 30 --save runs/readout_refit

The shipped readout was trained on still layouts (policies/pretrained/tabletop10-tiny-wrist), and places
PushCube's cube to about 1.9 cm while the expert pushes it, against 1.2 cm in the first frame
(push_failures.py --expert-driven). From state, a push clone needs the cube to about 0.5 cm
(push_state_bc.py --position-noise). This asks whether the towers' features hold that precision:
- it renders the scripted expert's PushCube episodes (DART 1 cm, as the default collects them): training
  episodes from the collection's seed stream (1), held-out ones from the suite's evaluation states (0);
  `--other-tasks N` adds N training and N/3 held-out episodes of every other task of the suite, so that the
  readout's other objects are refit too (its layers are shared between the objects);
- it keeps each frame's tower features (frozen, computed once), robot state, and the simulator's position
  of every object in the scene (the slots vision pretraining trains);
- it refits a copy of the policy's readout on the training frames;
- it reports the held-out x-y errors (cm) before and after: PushCube's cube over every frame and over the
  contact frames (fingers below 4 cm and within 7 cm of the cube, where the push steers by the cube), its
  goal, and the other tasks' objects.

`--save DIR` writes a vision pretraining (`vision_pretraining.checkpoint=DIR` for `embodied.train`): the
pretraining the policy was trained from (`--pretraining`), with the refit readout in place of its own.
"""
from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from push_failures import in_contact  # noqa: E402

PUSH = "PushCube"


def render_episodes(policy, tasks: dict[str, list[int]], image_size: int, action_noise: float,
                    rng) -> dict[str, np.ndarray]:
    """The expert's episodes of each task from its seeds: per frame the towers' features (front, wrist), the
    state, every slot's true position (readout units) and whether it is in the scene, the PushCube cube and
    goal slots (-1 elsewhere), and whether the fingers are low and near PushCube's cube."""
    import torch

    from embodied.vision_pretraining import CENTRE, SCALE
    from envs.env import TabletopEnv
    from envs.layouts import object_positions, object_slots

    rows = {k: [] for k in ("front", "wrist", "state", "target", "present", "push_slots", "contact")}
    for task, seeds in tasks.items():
        env = TabletopEnv(task, image_size=image_size, wrist_camera=True)
        try:
            for seed in seeds:
                obs, _ = env.reset(seed=int(seed))
                slots = object_slots(env)
                for _ in range(env.max_episode_steps):
                    positions, present = object_positions(env)
                    rows["front"].append(obs["image"])
                    rows["wrist"].append(obs["wrist_image"])
                    rows["state"].append(obs["state"])
                    rows["target"].append((positions - CENTRE) / SCALE)
                    rows["present"].append(present)
                    rows["push_slots"].append([slots["cube"], slots["goal"]] if task == PUSH else [-1, -1])
                    rows["contact"].append(task == PUSH and in_contact(env))
                    action = env.expert_action()
                    action[:3] += rng.normal(0.0, action_noise, 3)
                    obs, _, success, _, _ = env.step(action)
                    if success:
                        break
        finally:
            env.close()
    data = {k: np.asarray(v) for k, v in rows.items()}
    data["target"] = data["target"].astype(np.float32)
    features = {"front": [], "wrist": []}
    with torch.no_grad():
        for i in range(0, len(data["state"]), 128):
            inputs = {key: policy.processor.pixel_values(torch.as_tensor(data[camera][i:i + 128]), device=policy.device)
                      for key, camera in (("pixel_values", "front"), ("wrist_pixel_values", "wrist"))}
            front, wrist = policy.encode_images(inputs)
            features["front"].append(front.float())
            features["wrist"].append(wrist.float())
    data["front"] = torch.cat(features["front"]).numpy()
    data["wrist"] = torch.cat(features["wrist"]).numpy()
    return data


def predict(readout, data, idx):
    import torch

    return readout(torch.from_numpy(data["front"][idx]), torch.from_numpy(data["wrist"][idx]),
                   torch.from_numpy(data["state"][idx]).float())


def errors_cm(readout, data) -> dict[str, float]:
    """Mean x-y error (cm): PushCube's cube over every frame and in contact, its goal, the other tasks' objects."""
    import torch

    from embodied.vision_pretraining import SCALE

    with torch.no_grad():
        located = np.concatenate([predict(readout, data, np.arange(i, min(i + 256, len(data["state"])))).numpy()
                                  for i in range(0, len(data["state"]), 256)])
    xy = 100 * SCALE * np.linalg.norm(located[..., :2] - data["target"][..., :2], axis=-1)  # (frames, slots)
    push = data["push_slots"][:, 0] >= 0
    rows = np.flatnonzero(push)
    cube, goal = xy[rows, data["push_slots"][push, 0]], xy[rows, data["push_slots"][push, 1]]
    contact = data["contact"][push]
    others = xy[~push][data["present"][~push]]
    return {"cube_all_cm": float(cube.mean()), "cube_contact_cm": float(cube[contact].mean()),
            "goal_all_cm": float(goal.mean()), "other_tasks_cm": float(others.mean()) if len(others) else None,
            "contact_frames": int(contact.sum()), "push_frames": int(push.sum()), "frames": len(xy)}


def refit(readout, data, steps: int, lr: float, batch: int, seed: int):
    import torch

    torch.manual_seed(seed)
    readout = copy.deepcopy(readout).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(readout.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr * 0.1)
    rng = np.random.default_rng(seed)
    target = torch.from_numpy(data["target"])
    present = torch.from_numpy(data["present"]).float()
    for _ in range(steps):
        idx = rng.integers(0, len(data["state"]), batch)
        # the pretraining's loss: squared distance over the objects in the scene
        loss = (((predict(readout, data, idx) - target[idx]) ** 2).sum(-1) * present[idx]).sum() / present[idx].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return readout.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="a checkpoint with object tokens and the wrist camera")
    parser.add_argument("--train-episodes", type=int, default=300)
    parser.add_argument("--heldout-episodes", type=int, default=30)
    parser.add_argument("--action-noise", type=float, default=0.01, help="DART std (m), as the default collects")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--other-tasks", type=int, default=0,
                        help="training episodes of every other task too (a third as many held out)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--pretraining", default="tabletop10-tiny-wrist",
                        help="the vision pretraining the policy was trained from (its readout must be the policy's)")
    parser.add_argument("--save", help="write that pretraining with the refit readout to this directory")
    parser.add_argument("--out", help="JSON results")
    args = parser.parse_args()

    import torch

    from embodied.vision_pretraining import REPORT_FILE, WEIGHTS_FILE, _read_weights, resolve_checkpoint
    from envs.suites import get_suite
    from policies import load_pretrained

    torch.set_num_threads(args.threads)
    policy = load_pretrained(args.policy).eval()
    if policy.object_readout is None or not policy.config.wrist_image:
        raise SystemExit(f"{args.policy}: needs a policy with an object readout and the wrist camera")
    pretraining = resolve_checkpoint(args.pretraining)
    saved, metadata = _read_weights(pretraining)
    for key, value in policy.object_readout.state_dict().items():
        if not torch.equal(saved[f"object_readout.{key}"].to(value.dtype), value):
            raise SystemExit(f"{args.policy}: its readout is not {pretraining}'s (object_readout.{key} differs); "
                             f"pass the pretraining it was trained from with --pretraining")
    suite = get_suite("tabletop10")
    others = [t for t in suite.tasks if t != PUSH] if args.other_tasks else []

    def seeds(n_push: int, n_other: int, stream: int) -> dict[str, list[int]]:
        return {PUSH: suite.episode_seeds(PUSH, n_push, seed=stream),
                **{t: suite.episode_seeds(t, n_other, seed=stream) for t in others}}

    t0 = time.time()
    size = policy.config.observation_image_size
    train = render_episodes(policy, seeds(args.train_episodes, args.other_tasks, 1), size, args.action_noise,
                            np.random.default_rng(1))
    heldout = render_episodes(policy, seeds(args.heldout_episodes, max(1, args.other_tasks // 3), 0), size,
                              args.action_noise, np.random.default_rng(2))
    print(f"rendered {len(train['state'])} training and {len(heldout['state'])} held-out frames "
          f"({train['contact'].sum()} and {heldout['contact'].sum()} of PushCube's in contact) in {time.time() - t0:.0f} s")
    before = {"train": errors_cm(policy.object_readout, train), "heldout": errors_cm(policy.object_readout, heldout)}
    t0 = time.time()
    refitted = refit(policy.object_readout, train, args.steps, args.lr, args.batch, seed=0)
    after = {"train": errors_cm(refitted, train), "heldout": errors_cm(refitted, heldout)}
    print(f"refit {args.steps} steps in {time.time() - t0:.0f} s\n")
    print("| readout | frames | push cube, all frames (cm) | push cube, in contact (cm) | push goal (cm) | "
          "other tasks' objects (cm) |\n|---|---|---|---|---|---|")
    for name, result in (("as trained", before), ("refit on episode frames", after)):
        for split in ("train", "heldout"):
            r = result[split]
            other = "-" if r["other_tasks_cm"] is None else f"{r['other_tasks_cm']:.2f}"
            print(f"| {name} | {split} | {r['cube_all_cm']:.2f} | {r['cube_contact_cm']:.2f} | {r['goal_all_cm']:.2f} "
                  f"| {other} |")
    if args.save:
        from safetensors.torch import save_file

        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        weights = {**saved, **{f"object_readout.{k}": v.detach().cpu().contiguous()
                               for k, v in refitted.state_dict().items()}}
        save_file(weights, out / WEIGHTS_FILE, metadata=metadata)
        (out / REPORT_FILE).write_text(json.dumps(
            {"refit_from": str(pretraining), "refit": vars(args), "errors_before": before, "errors_after": after}, indent=2))
        print(f"wrote {out} (vision_pretraining.checkpoint={out})")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "shipped": before, "refit": after}, indent=2))


if __name__ == "__main__":
    main()
