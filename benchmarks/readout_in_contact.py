"""Can the frozen towers place the cube precisely while it is pushed? The object readout, refit on episode frames.

    python benchmarks/readout_in_contact.py --train-episodes 300 --heldout-episodes 30
    python benchmarks/readout_in_contact.py --other-tasks 30 --task-episodes ReachTarget=1000 SortByColor=300 \
        --push-share 0.5 --still-layouts 2000 --feature-dtype float16 --steps 12000 --lr 2e-3 --threads 1 \
        --save runs/readout  # tabletop10-tiny-wrist-episodes
    python benchmarks/readout_in_contact.py ... --cache data/readout_cache  # render once, refit several times
    python benchmarks/readout_in_contact.py --other-tasks 30 --task-episodes ReachTarget=1000 --push-share 0.5 \
        --compare tabletop10-tiny-wrist-episodes

The shipped readout was trained on still layouts (policies/pretrained/tabletop10-tiny-wrist), and places
PushCube's cube to about 1.9 cm while the expert pushes it, against 1.2 cm in the first frame
(push_failures.py --expert-driven). From state, a push clone needs the cube to about 0.5 cm
(push_state_bc.py --position-noise). This asks whether the towers' features hold that precision:
- it renders the scripted expert's PushCube episodes (DART 1 cm, as the default collects them): training
  episodes from the collection's seed stream (1: the layouts of the policy's own demonstrations, which the
  refit then places far better than new ones, SortByColor 1.9 against 5.6 cm; that pays, see `--seed-stream`),
  held-out ones from the suite's evaluation states (0);
  `--other-tasks N` adds N training and N/3 held-out episodes of every other task of the suite, so that the
  readout's other objects are refit too (its layers are shared between the objects); `--task-episodes`
  gives one task another count, and `--push-share` draws each batch half (say) from push's frames and the
  rest from the other tasks in equal shares;
- it keeps each frame's tower features (frozen, computed once), robot state, and the simulator's position
  of every object in the scene (the slots vision pretraining trains);
- it refits a copy of the policy's readout on the training frames;
- it reports the held-out x-y errors (cm) before and after: PushCube's cube over every frame and over the
  contact frames (fingers below 4 cm and within 7 cm of the cube, where the push steers by the cube), its
  goal, and the other tasks' objects; then per task, x-y and 3-D, with any readouts named by `--compare`.

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
STILL = "still layouts"  # vision pretraining's kind of frame, rehearsed by --still-layouts


def render_episodes(policy, tasks: dict[str, list[int]], image_size: int, action_noise: float,
                    rng, feature_dtype=np.float32) -> dict[str, np.ndarray]:
    """The expert's episodes of each task from its seeds: per frame the towers' features (front, wrist), the
    state, every slot's true position (readout units) and whether it is in the scene, the PushCube cube and
    goal slots (-1 elsewhere), and whether the fingers are low and near PushCube's cube."""
    import torch
    from tqdm.auto import tqdm

    from embodied.vision_pretraining import CENTRE, SCALE
    from envs.env import TabletopEnv
    from envs.layouts import object_positions, object_slots

    rows = {k: [] for k in ("front", "wrist", "state", "target", "present", "push_slots", "contact", "task", "first")}
    progress = tqdm(total=sum(len(s) for s in tasks.values()), desc="render", unit="episode")
    for task, seeds in tasks.items():
        env = TabletopEnv(task, image_size=image_size, wrist_camera=True)
        try:
            for seed in seeds:
                obs, _ = env.reset(seed=int(seed))
                slots = object_slots(env)
                images = {"front": [], "wrist": []}
                for _ in range(env.max_episode_steps):
                    positions, present = object_positions(env)
                    images["front"].append(obs["image"])
                    images["wrist"].append(obs["wrist_image"])
                    rows["state"].append(obs["state"])
                    rows["target"].append((positions - CENTRE) / SCALE)
                    rows["present"].append(present)
                    rows["push_slots"].append([slots["cube"], slots["goal"]] if task == PUSH else [-1, -1])
                    rows["contact"].append(task == PUSH and in_contact(env))
                    rows["task"].append(task)
                    rows["first"].append(not images["front"][1:])
                    action = env.expert_action()
                    action[:3] += rng.normal(0.0, action_noise, 3)
                    obs, _, success, _, _ = env.step(action)
                    if success:
                        break
                for camera, features in zip(("front", "wrist"), encode(policy, images["front"], images["wrist"],
                                                                           feature_dtype)):
                    rows[camera].append(features)
                progress.update()
        finally:
            env.close()
    progress.close()
    data = {k: np.concatenate(rows.pop(k)) for k in ("front", "wrist")}
    data.update({k: np.asarray(v) for k, v in rows.items()})
    data["target"] = data["target"].astype(np.float32)
    return data


def encode(policy, front: list, wrist: list, dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """The towers' features of frames, kept as `dtype` (the images themselves are not kept: 75 KB a frame)."""
    import torch

    out = ([], [])
    with torch.no_grad():
        for i in range(0, len(front), 128):
            inputs = {key: policy.processor.pixel_values(torch.as_tensor(np.stack(images[i:i + 128])),
                                                         device=policy.device)
                      for key, images in (("pixel_values", front), ("wrist_pixel_values", wrist))}
            for kept, features in zip(out, policy.encode_images(inputs)):
                kept.append(features.float().cpu().numpy().astype(dtype, copy=False))
    return np.concatenate(out[0]), np.concatenate(out[1])


def render_still_layouts(policy, suite, count: int, image_size: int,
                         feature_dtype=np.float32) -> dict[str, np.ndarray]:
    """`count` layouts spread over the suite's tasks, as vision pretraining renders them (a reset, the arm moved up
    to 10 random 3 cm steps; its own seed stream), in render_episodes' layout, as the task STILL."""
    from tqdm.auto import tqdm

    from embodied.vision_pretraining import CENTRE, SCALE, SEED_SALT
    from envs.layouts import render_layouts

    per_task = -(-count // len(suite.tasks))
    parts = []
    for task in tqdm(suite.tasks, desc="still layouts", unit="task"):
        part = render_layouts(task, suite.episode_seeds(task, per_task, seed=SEED_SALT), image_size=image_size,
                              wrist_camera=True)
        front, wrist = encode(policy, list(part["images"]), list(part["wrist_images"]), feature_dtype)
        n = len(front)
        parts.append({"front": front, "wrist": wrist, "state": part["states"],
                      "target": ((part["positions"] - CENTRE) / SCALE).astype(np.float32), "present": part["present"],
                      "push_slots": np.full((n, 2), -1), "contact": np.zeros(n, bool), "task": np.array([STILL] * n),
                      "first": np.zeros(n, bool)})
    return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}


def cached(directory: str, rendering: dict, render) -> tuple[dict, dict]:
    """The rendered frames from `directory` if they were rendered with the same arguments (memory-mapped, so
    that several refits share one rendering), else rendered and written there first."""
    directory = Path(directory)
    manifest = directory / "rendering.json"
    if manifest.exists():
        made_with = json.loads(manifest.read_text())
        if made_with != rendering:
            raise SystemExit(f"--cache {directory}: rendered with {made_with}, not {rendering}; pass another directory")

        def load(path: Path) -> tuple[str, np.ndarray]:  # the features memory-mapped (read-only), the rest in memory
            key = path.name.split(".")[1]
            return key, np.load(path, mmap_mode="r" if key in ("front", "wrist") else None)

        splits = tuple(dict(map(load, directory.glob(f"{split}.*.npy"))) for split in ("train", "heldout"))
        print(f"read the rendered frames from {directory}")
        return splits
    splits = render()
    directory.mkdir(parents=True, exist_ok=True)
    for split, data in zip(("train", "heldout"), splits):
        for key, value in data.items():
            np.save(directory / f"{split}.{key}.npy", value)
    manifest.write_text(json.dumps(rendering, indent=2))  # last: a cache without it is incomplete
    return splits


def predict(readout, data, idx):
    import torch

    return readout(torch.from_numpy(data["front"][idx]).float(), torch.from_numpy(data["wrist"][idx]).float(),
                   torch.from_numpy(data["state"][idx]).float())


def errors_cm(readout, data) -> dict:
    """Mean x-y error (cm): PushCube's cube over every frame and in contact, its goal, the other tasks' objects,
    per task over the objects in its scene ([x-y, 3-D]: a reach ends within 3 cm of a ball in the air), in each
    episode's first frame (x-y: where the policy sets off for), and per task and slot (x-y)."""
    import torch

    from embodied.vision_pretraining import SCALE
    from envs.layouts import SLOTS

    with torch.no_grad():
        located = np.concatenate([predict(readout, data, np.arange(i, min(i + 256, len(data["state"])))).numpy()
                                  for i in range(0, len(data["state"]), 256)])
    xy = 100 * SCALE * np.linalg.norm(located[..., :2] - data["target"][..., :2], axis=-1)  # (frames, slots)
    push = data["push_slots"][:, 0] >= 0
    rows = np.flatnonzero(push)
    cube, goal = xy[rows, data["push_slots"][push, 0]], xy[rows, data["push_slots"][push, 1]]
    contact = data["contact"][push]
    others = xy[~push][data["present"][~push]]
    xyz = 100 * SCALE * np.linalg.norm(located - data["target"], axis=-1)
    per_task = {str(task): [float(error[data["task"] == task][data["present"][data["task"] == task]].mean())
                            for error in (xy, xyz)] for task in dict.fromkeys(data["task"])}
    slots = {str(task): {SLOTS[k]: float(xy[data["task"] == task, k][data["present"][data["task"] == task, k]].mean())
                         for k in range(len(SLOTS)) if data["present"][data["task"] == task, k].any()}
             for task in dict.fromkeys(data["task"])}
    first = {}
    for task in dict.fromkeys(data["task"]):
        frames = (data["task"] == task) & data["first"]
        if frames.any():
            first[str(task)] = float(xy[frames][data["present"][frames]].mean())
    return {"per_task_cm": per_task, "per_task_first_frame_xy_cm": first, "per_task_slot_xy_cm": slots,
            "cube_all_cm": float(cube.mean()), "cube_contact_cm": float(cube[contact].mean()),
            "goal_all_cm": float(goal.mean()), "other_tasks_cm": float(others.mean()) if len(others) else None,
            "contact_frames": int(contact.sum()), "push_frames": int(push.sum()), "frames": len(xy)}


def frame_sampler(data, push_share: float | None, rng, still_share: float = 0.0):
    """Draws a batch's frame indices: `still_share` of them from the still layouts (if any), the rest from the
    episodes' frames, uniformly, or `push_share` of them from PushCube's and the rest from the other tasks in
    equal shares, so that a task with short episodes (ReachTarget's 60 steps) is not outweighed by the long ones."""
    still = np.flatnonzero(data["task"] == STILL)
    episodes = np.flatnonzero(data["task"] != STILL)
    if push_share is None:
        def from_episodes(size: int) -> np.ndarray:
            return episodes[rng.integers(0, len(episodes), size)]
    else:
        pools = [np.flatnonzero(data["task"] == task) for task in dict.fromkeys(data["task"])
                 if task not in (PUSH, STILL)]
        push = np.flatnonzero(data["task"] == PUSH)
        if not len(push) or not pools:
            raise SystemExit("--push-share needs PushCube episodes and --other-tasks")

        def from_episodes(size: int) -> np.ndarray:
            from_push = rng.binomial(size, push_share)
            task = rng.integers(0, len(pools), size - from_push)
            return np.concatenate([rng.choice(push, from_push)] + [rng.choice(pools[t], int((task == t).sum()))
                                                                   for t in range(len(pools))])
    if not len(still):
        return from_episodes

    def draw(size: int) -> np.ndarray:
        n_still = rng.binomial(size, still_share)
        return np.concatenate([still[rng.integers(0, len(still), n_still)], from_episodes(size - n_still)])
    return draw


def refit(readout, data, steps: int, lr: float, batch: int, seed: int, push_share: float | None = None,
          still_share: float = 0.0):
    import torch
    from tqdm.auto import trange

    torch.manual_seed(seed)
    readout = copy.deepcopy(readout).train().requires_grad_(True)
    optimizer = torch.optim.AdamW(readout.parameters(), lr=lr, weight_decay=1e-4)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps, eta_min=lr * 0.1)
    draw = frame_sampler(data, push_share, np.random.default_rng(seed), still_share)
    target = torch.from_numpy(data["target"])
    present = torch.from_numpy(data["present"]).float()
    for _ in trange(steps, desc="refit", unit="step"):
        idx = draw(batch)
        # the pretraining's loss: squared distance over the objects in the scene
        loss = (((predict(readout, data, idx) - target[idx]) ** 2).sum(-1) * present[idx]).sum() / present[idx].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
    return readout.eval().requires_grad_(False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", help="a checkpoint with object tokens and the wrist camera (default: the tiny "
                                         "policy of the openvla recipe, built around --pretraining's parts)")
    parser.add_argument("--train-episodes", type=int, default=300)
    parser.add_argument("--heldout-episodes", type=int, default=30)
    parser.add_argument("--action-noise", type=float, default=0.01, help="DART std (m), as the default collects")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--other-tasks", type=int, default=0,
                        help="training episodes of every other task too (a third as many held out)")
    parser.add_argument("--task-episodes", nargs="*", default=[], metavar="TASK=N",
                        help="training episodes of another task than --other-tasks gives it (ReachTarget=1000: its "
                             "balls hang anywhere in the air, and 100 episodes are only 100 of its layouts)")
    parser.add_argument("--push-share", type=float,
                        help="the fraction of each batch drawn from PushCube's frames, the rest from the other tasks "
                             "in equal shares (default: uniform over all frames)")
    parser.add_argument("--still-layouts", type=int, default=0,
                        help="also rehearse this many of vision pretraining's still layouts (over the suite's tasks, "
                             "its seed stream): a readout refit on episodes alone forgets where the objects stand "
                             "before the arm moves (SortByColor's cubes in the first frame: 2.7 -> 7.2 cm)")
    parser.add_argument("--still-share", type=float, default=0.25,
                        help="with --still-layouts: the fraction of each batch drawn from them")
    parser.add_argument("--seed-stream", type=int, default=1,
                        help="episode-seed stream of the training episodes (default 1: the demonstrations' layouts; "
                             "0, the suite's evaluation states, is refused). A readout refit on a stream of its own "
                             "(2) places new layouts as well, but the policy trained on its noisier tokens scored "
                             "59.7%% against 71.3%% (benchmarks/RESULTS.md)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--feature-dtype", choices=["float32", "float16"], default="float32",
                        help="how the frames' tower features are kept: float16 halves the memory (about 22 GB at "
                             "2,110 episodes in float32), but the refit then differs from float32's")
    parser.add_argument("--pretraining", default="tabletop10-tiny-wrist",
                        help="the vision pretraining the policy was trained from (its readout must be the policy's)")
    parser.add_argument("--compare", nargs="*", default=[],
                        help="other vision pretrainings (directories or shipped names) whose readouts to report on "
                             "the same frames")
    parser.add_argument("--save", help="write that pretraining with the refit readout to this directory")
    parser.add_argument("--out", help="JSON results")
    parser.add_argument("--cache", help="keep the rendered frames in this directory, and read them from there when it "
                                        "holds the same rendering (several refits of one rendering)")
    args = parser.parse_args()

    import torch

    from embodied.vision_pretraining import REPORT_FILE, WEIGHTS_FILE, _read_weights, resolve_checkpoint
    from envs.suites import get_suite
    from policies import load_pretrained

    if args.push_share is not None and not 0.0 < args.push_share < 1.0:
        raise SystemExit(f"--push-share {args.push_share}: must lie strictly between 0 and 1")
    if args.still_layouts and not 0.0 < args.still_share < 1.0:
        raise SystemExit(f"--still-share {args.still_share}: must lie strictly between 0 and 1")
    if args.seed_stream == 0:
        raise SystemExit("--seed-stream 0: the suite's evaluation states, where the readout is judged and the policy "
                         "evaluated; refit on another stream (default 1, the demonstrations')")
    torch.set_num_threads(args.threads)
    pretraining = resolve_checkpoint(args.pretraining)
    if args.policy is None:
        from embodied.vision_pretraining import load_pretrained_vision
        from envs.layouts import MAX_NAMED, SLOTS
        from policies.openvla import OpenVLAPolicy

        size = int(_read_weights(pretraining)[1].get("observation_image_size", 112))
        policy = OpenVLAPolicy.from_size("tiny", observation_image_size=size, wrist_image=True, object_slots=len(SLOTS),
                                         named_objects=MAX_NAMED, use_proprio=True, train_vision=False)
        load_pretrained_vision(policy, pretraining, announce=False)
        policy.eval()
        args.policy = f"tiny, from {args.pretraining}"
    else:
        policy = load_pretrained(args.policy).eval()
    if policy.object_readout is None or not policy.config.wrist_image:
        raise SystemExit(f"{args.policy}: needs a policy with an object readout and the wrist camera")
    saved, metadata = _read_weights(pretraining)
    for key, value in policy.object_readout.state_dict().items():
        if not torch.equal(saved[f"object_readout.{key}"].to(value.dtype), value):
            raise SystemExit(f"{args.policy}: its readout is not {pretraining}'s (object_readout.{key} differs); "
                             f"pass the pretraining it was trained from with --pretraining")
    suite = get_suite("tabletop10")
    others = [t for t in suite.tasks if t != PUSH] if args.other_tasks else []
    episodes_of = {}
    for item in args.task_episodes:
        task, _, count = item.partition("=")
        if task not in others or not count.isdigit() or int(count) < 1:
            raise SystemExit(f"--task-episodes {item!r}: expected TASK=N with N >= 1 and TASK one of "
                             f"{', '.join(others) or '(none: pass --other-tasks)'}")
        episodes_of[task] = int(count)

    def seeds(n_push: int, n_other: int, stream: int, overrides: dict[str, int]) -> dict[str, list[int]]:
        return {PUSH: suite.episode_seeds(PUSH, n_push, seed=stream),
                **{t: suite.episode_seeds(t, overrides.get(t, n_other), seed=stream) for t in others}}

    t0 = time.time()
    size = policy.config.observation_image_size
    dtype = np.dtype(args.feature_dtype)

    def render() -> tuple[dict, dict]:
        train = render_episodes(policy, seeds(args.train_episodes, args.other_tasks, args.seed_stream, episodes_of),
                                size, args.action_noise, np.random.default_rng(1), dtype)
        if args.still_layouts:
            still = render_still_layouts(policy, suite, args.still_layouts, size, dtype)
            train = {k: np.concatenate([train[k], still[k]]) for k in train}
        heldout = render_episodes(policy, seeds(args.heldout_episodes, max(1, args.other_tasks // 3), 0, {}), size,
                                  args.action_noise, np.random.default_rng(2), dtype)
        return train, heldout

    rendering = {key: getattr(args, key) for key in ("policy", "pretraining", "train_episodes", "heldout_episodes",
                                                     "action_noise", "other_tasks", "task_episodes", "still_layouts",
                                                     "seed_stream", "feature_dtype")}
    train, heldout = cached(args.cache, rendering, render) if args.cache else render()
    print(f"{len(train['state'])} training and {len(heldout['state'])} held-out frames "
          f"({train['contact'].sum()} and {heldout['contact'].sum()} of PushCube's in contact) in {time.time() - t0:.0f} s")
    before = {"train": errors_cm(policy.object_readout, train), "heldout": errors_cm(policy.object_readout, heldout)}
    compared = {}
    for spec in args.compare:
        readout = copy.deepcopy(policy.object_readout)
        weights = _read_weights(resolve_checkpoint(spec))[0]
        readout.load_state_dict({k[len("object_readout."):]: v for k, v in weights.items()
                                 if k.startswith("object_readout.")})
        compared[spec] = {"heldout": errors_cm(readout, heldout)}
    t0 = time.time()
    refitted = refit(policy.object_readout, train, args.steps, args.lr, args.batch, seed=0, push_share=args.push_share,
                     still_share=args.still_share if args.still_layouts else 0.0)
    after = {"train": errors_cm(refitted, train), "heldout": errors_cm(refitted, heldout)}
    print(f"refit {args.steps} steps in {time.time() - t0:.0f} s\n")
    readouts = {"as trained": before, **{f"`{spec}`": r for spec, r in compared.items()},
                "refit on episode frames": after}
    print("| readout | frames | push cube, all frames (cm) | push cube, in contact (cm) | push goal (cm) | "
          "other tasks' objects (cm) |\n|---|---|---|---|---|---|")
    for name, result in readouts.items():
        for split in ("train", "heldout"):
            if split not in result:
                continue
            r = result[split]
            other = "-" if r["other_tasks_cm"] is None else f"{r['other_tasks_cm']:.2f}"
            print(f"| {name} | {split} | {r['cube_all_cm']:.2f} | {r['cube_contact_cm']:.2f} | {r['goal_all_cm']:.2f} "
                  f"| {other} |")
    tasks = list(before["heldout"]["per_task_cm"])
    print("\nHeld out, per task: mean x-y / 3-D error (cm) over the objects in its scene\n")
    print("| readout | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks))
    for name, result in readouts.items():
        print(f"| {name} | " + " | ".join("{:.2f} / {:.2f}".format(*result['heldout']['per_task_cm'][t]) for t in tasks) + " |")
    print("\nHeld out, per task: mean x-y error (cm) in each episode's first frame, before the arm moves\n")
    print("| readout | " + " | ".join(tasks) + " |\n|---|" + "---|" * len(tasks))
    for name, result in readouts.items():
        print(f"| {name} | " + " | ".join(f"{result['heldout']['per_task_first_frame_xy_cm'][t]:.2f}" for t in tasks)
              + " |")
    if args.save:
        from safetensors.torch import save_file

        out = Path(args.save)
        out.mkdir(parents=True, exist_ok=True)
        weights = {**saved, **{f"object_readout.{k}": v.detach().cpu().contiguous()
                               for k, v in refitted.state_dict().items()}}
        save_file(weights, out / WEIGHTS_FILE, metadata=metadata)
        (out / REPORT_FILE).write_text(json.dumps(
            {"refit_from": args.pretraining, "refit": vars(args), "errors_before": before, "errors_after": after}, indent=2))
        print(f"wrote {out} (vision_pretraining.checkpoint={out})")
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "shipped": before, "compared": compared,
                                              "refit": after}, indent=2))


if __name__ == "__main__":
    main()
