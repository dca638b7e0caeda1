"""Does the pixel policy push like the state clone once it reads exact positions? Training on the true cube and goal.

    python benchmarks/push_privileged.py --policy runs/default/final --episodes 90 --steps 1500

From state, a clone of 90 PushCube demonstrations pushes 58% with exact positions and 29% with a 1 cm error
per axis (push_state_bc.py --position-noise); the default's object readout errs by about 1.9 cm in contact
(push_failures.py --expert-driven), and refitting it on episode frames did not lift the pixel policy's push
(readout_in_contact.py). This separates the readout from the rest of the pixel policy (towers' patches, LLM,
action head, re-planning):
- it renders the scripted expert's PushCube demonstrations as the default collects them (DART: 1 cm noise on
  the executed translation, the expert's labels; successful episodes only; the collection's seeds, stream 1;
  the policy's image size and cameras; images through the JPEG round trip of the RLDS shards), with the
  simulator's cube and goal positions at every frame;
- it continues the policy's training on them once per arm, in the same loop, with the same batches and the
  settings of a push-only continuation with `embodied.train init_from=` (AdamW lr 3e-4, 20 warm-up steps,
  cosine to 0.1, batch 32, 8-action chunks padded with "hold", the policy's own action statistics):
  - `readout`: the policy reads its object readout's positions, as the default does;
  - `true`: the readout's cube and goal slots hold the simulator's positions, in training and in evaluation
    (privileged: a measurement, not a policy to ship);
  - `readout-blind` and `true-blind`: as `readout` and `true`, with no image patch in the LLM's input (the
    projector's output zeroed, in training and in evaluation; the object readout still reads the images):
    the policy acts on the robot state, the instruction and the object tokens alone, the state clone's inputs
    (less the cube's yaw, which the clone does not need: push_state_bc.py --without-yaw), and the readout's
    readings of the slots whose objects are not in the scene;
  - `true-grey`: as `true`, with every camera image grey, in training and in evaluation: the readout, too,
    sees nothing, so every token but the robot state and the true cube and goal is constant;
- it evaluates each arm on the suite's first `--eval-episodes` PushCube evaluation states every
  `--eval-every` steps (push_failures.run_episode: success, the cube's path, the readout's errors), and
  its loss, in evaluation mode, on `--heldout` demonstrations from those states against as many training
  frames (how far it over-fits);
- `--scratch` trains a new policy instead (the checkpoint run's config.yaml and vision pretraining), with
  `--policy-set KEY=VALUE` changes to its policy config (e.g. `image_patches=false slot_tokens=false`).

If `true` pushes like the state clone, the work left is a readout precise in the policy's own states; if it
pushes like `readout`, the limit is in the rest of the pixel policy.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from contextlib import ExitStack, contextmanager
from dataclasses import fields
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from push_failures import ReadoutOverride, run_episode  # noqa: E402

PUSH = "PushCube"
ARMS = ("readout", "true", "readout-blind", "true-blind", "true-grey")
GREY = 128  # every pixel of the true-grey arm's images, in both cameras


def privileged(arm: str) -> bool:
    return arm.startswith("true")


@contextmanager
def arm_context(policy, arm: str, current: dict | None = None):
    """What an arm changes in the policy while entered: the true cube and goal (from `current`, a batch's; in
    `run_episode`, the simulator's), and for a blind arm no image patch in the LLM's input (the projector's
    output zeroed; the towers and the object readout still see the images)."""
    with ExitStack() as stack:
        if privileged(arm) and current is not None:
            stack.enter_context(positions_from_batch(policy.object_readout, current))
        if arm.endswith("-blind"):
            stack.enter_context(ZeroOutput(policy.projector))
        yield


def grey(arm: str) -> bool:
    return arm.endswith("-grey")


class GreyEnv:
    """The env with every camera image grey (the true-grey arm's evaluation)."""

    def __init__(self, env):
        self.env = env

    def __getattr__(self, name):
        return getattr(self.env, name)

    @staticmethod
    def _grey(obs: dict) -> dict:
        return {k: np.full_like(v, GREY) if k in ("image", "wrist_image") else v for k, v in obs.items()}

    def reset(self, **kwargs):
        obs, info = self.env.reset(**kwargs)
        return self._grey(obs), info

    def step(self, action):
        obs, *rest = self.env.step(action)
        return (self._grey(obs), *rest)


class ZeroOutput:
    """While entered, a module's output is zeros of the same shape (no gradient reaches it)."""

    def __init__(self, module):
        self.module = module

    def __enter__(self):
        self.module.forward = lambda *args, **kwargs: type(self.module).forward(self.module, *args, **kwargs).detach() * 0

    def __exit__(self, *exc):
        del self.module.forward


def render_demonstrations(policy, suite: str, episodes: int, action_noise: float, seed: int,
                          stream: int = 1) -> list[dict]:
    """The expert's successful PushCube episodes from a seed stream (1: the collection's): per step the observation
    (front and wrist images, state), the expert's action, the instruction, and the cube's and goal's positions
    (readout units) with their slots."""
    from embodied.vision_pretraining import CENTRE, SCALE
    from envs.env import ACTION_HIGH, ACTION_LOW, TabletopEnv
    from envs.layouts import object_slots
    from envs.suites import get_suite

    noise = np.random.default_rng(seed)
    env = TabletopEnv(PUSH, image_size=policy.config.observation_image_size, wrist_camera=policy.config.wrist_image)
    demos, tried = [], 0
    try:
        for episode_seed in get_suite(suite).episode_seeds(PUSH, 3 * episodes, seed=stream):
            if len(demos) == episodes:
                break
            tried += 1
            obs, _ = env.reset(seed=int(episode_seed))
            slots = object_slots(env)
            rows = {k: [] for k in ("image", "wrist_image", "state", "action", "cube", "goal")}
            success = False
            for _ in range(env.max_episode_steps):
                rows["image"].append(obs["image"])
                if policy.config.wrist_image:
                    rows["wrist_image"].append(obs["wrist_image"])
                rows["state"].append(obs["state"])
                for role in ("cube", "goal"):
                    rows[role].append((env.sim.object_pose(role)[0] - CENTRE) / SCALE)
                label = np.clip(env.expert_action(), ACTION_LOW, ACTION_HIGH).astype(np.float32)
                executed = label.copy()
                executed[:3] += noise.normal(0.0, action_noise, 3)
                rows["action"].append(label)
                obs, _, success, truncated, _ = env.step(np.clip(executed, ACTION_LOW, ACTION_HIGH))
                if success or truncated:
                    break
            if success:
                demo = {k: np.asarray(v, dtype=np.float32 if k in ("state", "action", "cube", "goal") else np.uint8)
                        for k, v in rows.items() if v}
                demo["instruction"] = env.instruction
                demo["slots"] = np.array([slots["cube"], slots["goal"]])
                demos.append(demo)
            print(f"\rrendered {len(demos)}/{episodes} demonstrations from seed stream {stream} ({tried} tried)",
                  end="", flush=True)
    finally:
        env.close()
    print()
    if len(demos) < episodes:
        raise SystemExit(f"only {len(demos)} of {episodes} demonstrations succeeded in {tried} seeds")
    return demos


def as_read(demo: dict, statistics: dict, chunk: int) -> dict:
    """One demonstration as the reader gives it to training: images through the shards' JPEG (tfds encodes at
    quality 95), normalized action chunks and their mask (chunk_padding hold). TensorFlow runs in a child
    process: once imported, MuJoCo's OSMesa renderer segfaults in this one."""
    import tensorflow as tf

    from embodied.data.statistics import NormalizationMode
    from embodied.data.transforms import chunk_actions, normalize_tf

    demo = dict(demo)
    for key in ("image", "wrist_image"):
        if key in demo:
            demo[key] = np.stack([tf.io.decode_jpeg(tf.io.encode_jpeg(image, quality=95)).numpy() for image in demo[key]])
    length = len(demo["action"])
    actions, mask = chunk_actions(tf.constant(demo["action"]), chunk, "hold", True,
                                  tf.constant([demo["instruction"]] * length))
    demo["action"] = normalize_tf(actions, statistics["action"], NormalizationMode.BOUNDS_Q99).numpy()
    demo["action_mask"] = mask.numpy()
    return demo


def training_frames(demos: list[dict], statistics: dict, chunk: int) -> dict[str, np.ndarray]:
    """Every frame of the demonstrations, as the reader gives them (`as_read`)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from functools import partial

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as child:
        demos = list(child.map(partial(as_read, statistics=statistics, chunk=chunk), demos))
    frames = {k: [] for k in ("image", "wrist_image", "state", "action", "action_mask", "cube", "goal", "slots",
                              "instruction")}
    for demo in demos:
        length = len(demo["action"])
        for key in ("image", "wrist_image", "state", "action", "action_mask", "cube", "goal"):
            if key in demo:
                frames[key].append(demo[key])
        frames["slots"].append(np.repeat(demo["slots"][None], length, axis=0))
        frames["instruction"].extend([demo["instruction"]] * length)
    return {k: np.asarray(v) if k == "instruction" else np.concatenate(v) for k, v in frames.items() if len(v)}


def positions_from_batch(readout, current: dict) -> ReadoutOverride:
    """The `true` arm in training: each sample's cube and goal slots get its frame's simulator positions."""
    def edit(out):
        rows = np.arange(len(out))
        for k, role in enumerate(("cube", "goal")):
            out[rows, current["slots"][:, k]] = current[role].to(out.dtype)
        return out

    return ReadoutOverride(readout, edit)


def evaluate(policy, suite: str, episodes: int, arm: str) -> dict:
    import torch

    from envs.env import TabletopEnv
    from envs.suites import get_suite

    policy.eval()
    env = TabletopEnv(PUSH, image_size=policy.config.observation_image_size, wrist_camera=policy.config.wrist_image)
    try:
        with torch.no_grad():
            with arm_context(policy, arm):  # run_episode gives the true positions itself
                rows = [run_episode(policy, GreyEnv(env) if grey(arm) else env, seed, true_positions=privileged(arm))
                        for seed in get_suite(suite).episode_seeds(PUSH, episodes, seed=0)]
    finally:
        env.close()
    policy.train()
    contact = [r["cube_error_contact_cm"] for r in rows if r["cube_error_contact_cm"] is not None]
    return {"success": float(np.mean([r["success"] for r in rows])), "episodes": len(rows),
            "readout_cube_error_contact_cm": float(np.mean(contact)) if contact else None, "rows": rows}


def fresh_policy(checkpoint: str, settings: list[str]):
    """A new policy as the checkpoint's run built it (its run directory's config.yaml, its action statistics),
    with the same vision pretraining loaded (towers, readout and grounding) and nothing else trained; `settings`
    (KEY=VALUE) change its policy config (e.g. image_patches=false)."""
    import torch
    import yaml
    from omegaconf import OmegaConf

    from embodied.train import build_policy, pretrained_vision_source
    from embodied.vision_pretraining import load_pretrained_vision

    config = Path(checkpoint).resolve().parent / "config.yaml"
    if not config.is_file():
        raise SystemExit(f"--scratch builds the policy from its run's config, but {config} does not exist")
    cfg = OmegaConf.load(config)
    cfg.init_from = None
    for setting in settings:  # KEY=VALUE under the run's policy config (a run older than the key lacks it)
        key, _, value = setting.partition("=")
        OmegaConf.update(cfg, f"policy.{key}", yaml.safe_load(value), force_add=True)
    statistics = json.loads((Path(checkpoint) / "dataset_statistics.json").read_text())
    policy = build_policy(cfg, statistics, torch.device("cpu"))
    source = pretrained_vision_source(cfg, policy)
    if source is None:
        raise SystemExit(f"{config}: the run trained its own vision pretraining; --scratch needs a finished one")
    load_pretrained_vision(policy, source, announce=False)
    return policy


def mean_loss(policy, frames: dict, arm: str, rows: np.ndarray | None = None, batch: int = 64) -> float:
    """The mean loss in evaluation mode over `rows` of `frames` (all of them by default)."""
    import torch

    current: dict = {}
    policy.eval()
    total, count = 0.0, 0
    with torch.no_grad(), arm_context(policy, arm, current):
        rows = np.arange(len(frames["action"])) if rows is None else rows
        for start in range(0, len(rows), batch):
            idx = rows[start:start + batch]
            current.update(true_positions(frames, idx))
            loss, _ = policy(as_batch(frames, idx, grey(arm)))
            total, count = total + loss.item() * len(idx), count + len(idx)
    policy.train()
    return total / count


def true_positions(frames: dict, idx: np.ndarray) -> dict:
    """The frames' simulator cube and goal positions and their slots, as positions_from_batch reads them."""
    import torch

    return {"cube": torch.from_numpy(frames["cube"][idx]), "goal": torch.from_numpy(frames["goal"][idx]),
            "slots": frames["slots"][idx]}


def as_batch(frames: dict, idx: np.ndarray, grey_images: bool = False) -> dict:
    import torch

    batch = {"instruction": frames["instruction"][idx].tolist(), "action": torch.from_numpy(frames["action"][idx]),
             "action_mask": torch.from_numpy(frames["action_mask"][idx]), "state": torch.from_numpy(frames["state"][idx])}
    for camera in ("image", "wrist_image"):
        if camera in frames:
            images = torch.from_numpy(frames[camera][idx])
            batch[camera] = torch.full_like(images, GREY) if grey_images else images
    return batch


def train_arm(args, arm: str, frames: dict, heldout: dict | None) -> list[dict]:
    import torch

    from embodied.train import warmup_schedule
    from policies import load_pretrained

    torch.manual_seed(args.seed)
    policy = (fresh_policy(args.policy, args.policy_set) if args.scratch else load_pretrained(args.policy)).train()
    if policy.object_readout is None:
        raise SystemExit(f"{args.policy}: the policy has no object readout (policy.object_slots=0)")
    trainable = [p for p in policy.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0)
    scheduler = warmup_schedule(optimizer, "cosine", args.warmup, args.steps, 0.1)
    print(f"[{arm}] {sum(p.numel() for p in trainable) / 1e6:.2f}M parameters trained on {len(frames['action'])} "
          f"frames", flush=True)
    current: dict = {}
    order = np.random.default_rng(args.seed)  # the same batches in both arms
    probe_rows = None if heldout is None else np.random.default_rng(args.seed + 1).choice(
        len(frames["action"]), min(len(frames["action"]), len(heldout["action"])), replace=False)
    history, losses, start = [], [], time.perf_counter()
    for step in range(1, args.steps + 1):
        idx = order.integers(0, len(frames["action"]), args.batch)
        batch = as_batch(frames, idx, grey(arm))
        current.update(true_positions(frames, idx))
        with arm_context(policy, arm, current):
            loss, _ = policy(batch)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(loss.item())
        if step % 50 == 0:
            print(f"\r[{arm}] step {step}/{args.steps} loss {np.mean(losses[-50:]):.4f} "
                  f"({step / (time.perf_counter() - start):.2f} steps/s)", end="", flush=True)
        if step % args.eval_every == 0 or step == args.steps:
            print()
            result = evaluate(policy, args.suite, args.eval_episodes, arm)
            result.update(step=step, loss=float(np.mean(losses[-50:])))
            if heldout is not None:  # both in evaluation mode, on as many frames
                result.update(heldout_loss=mean_loss(policy, heldout, arm),
                              training_frames_loss=mean_loss(policy, frames, arm, probe_rows))
            history.append(result)
            print(f"[{arm}] step {step}: push {100 * result['success']:.0f}% of {result['episodes']}, loss on "
                  f"training frames {result.get('training_frames_loss', float('nan')):.4f} and held-out ones "
                  f"{result.get('heldout_loss', float('nan')):.4f}, readout cube "
                  f"error in contact {result['readout_cube_error_contact_cm'] or float('nan'):.1f} cm", flush=True)
    return history


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--policy", required=True, help="a checkpoint with object tokens to continue from")
    parser.add_argument("--episodes", type=int, default=90, help="PushCube demonstrations")
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--action-noise", type=float, default=0.01, help="DART std (m), as the default collects")
    parser.add_argument("--eval-episodes", type=int, default=30)
    parser.add_argument("--eval-every", type=int, default=750)
    parser.add_argument("--heldout", type=int, default=30,
                        help="demonstrations from the evaluation's initial states for a held-out loss (0: none)")
    parser.add_argument("--scratch", action="store_true",
                        help="train a new policy (the checkpoint's run config and vision pretraining) instead")
    parser.add_argument("--policy-set", action="append", default=[], metavar="KEY=VALUE",
                        help="with --scratch: a change to the run's policy config (repeatable)")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--suite", default="tabletop10")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", help="write the figures as JSON here")
    args = parser.parse_args()
    if args.policy_set and not args.scratch:
        parser.error("--policy-set changes the config a new policy is built from: it needs --scratch")
    from policies.openvla import VLAConfig

    unknown = [s for s in args.policy_set if s.partition("=")[0] not in {f.name for f in fields(VLAConfig)}]
    if unknown:
        parser.error(f"--policy-set {unknown[0]}: the policy config has no such key")

    import torch

    from policies import load_pretrained

    torch.set_num_threads(args.threads)
    probe = load_pretrained(args.policy)
    statistics = next(iter(probe.processor.statistics.values()))
    start = time.perf_counter()
    frames = training_frames(render_demonstrations(probe, args.suite, args.episodes, args.action_noise, args.seed),
                             statistics, probe.config.action_chunk)
    heldout = None
    if args.heldout:
        heldout = training_frames(render_demonstrations(probe, args.suite, args.heldout, args.action_noise,
                                                        args.seed + 1, stream=0),
                                  statistics, probe.config.action_chunk)
    print(f"{len(frames['action'])} training frames, {0 if heldout is None else len(heldout['action'])} held out, "
          f"in {time.perf_counter() - start:.0f} s")
    del probe
    results = {}
    for arm in args.arms:
        results[arm] = train_arm(args, arm, frames, heldout)
        if args.out:  # after each arm, so that a long run keeps what it finished
            Path(args.out).write_text(json.dumps({"args": vars(args), "results": results}, indent=2))
    print("\n| arm | " + " | ".join(f"step {h['step']}" for h in results[args.arms[0]]) + " |\n|"
          + "---|" * (len(results[args.arms[0]]) + 1))
    for arm, history in results.items():
        print(f"| {arm} | " + " | ".join(f"{100 * h['success']:.0f}%" for h in history) + " |")


if __name__ == "__main__":
    main()
