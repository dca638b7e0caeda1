"""Can PushCube's demonstrations be cloned at all? Behaviour cloning from privileged state, no vision.

    python benchmarks/push_state_bc.py --episodes 90 --seeds 3
    python benchmarks/push_state_bc.py --expert push_experts:lane_feedback --episodes 300 --seeds 3

Collects the scripted expert's PushCube demonstrations as the default does (DART: the executed translation
gets Gaussian noise, the label stays the expert's answer to the perturbed state; successful episodes only),
but records the simulator's state instead of images: the tool pose and gripper (the policy's proprio), the
cube's position and yaw, and the goal's position. A small MLP learns the expert's next `--chunk` actions
from that state (L1 on actions scaled to [-1, 1] by their 1st and 99th percentiles, as the default's head;
predictions clipped to that range, as decoded tokens are), and is evaluated on the suite's first `--eval`
PushCube initial states, re-planning after `--execute` actions as the default does. Nothing is rendered
after a reset: a run takes about a minute per training seed.

If this clone pushes well, the pixel policy's failure is in getting from pixels and words to the same
function; if it does not, the demonstrations themselves are hard to clone. `--expert module:function`
swaps in another PushCube script (benchmarks/push_experts.py holds two); `--expert-check` first runs the
expert itself, without noise, on the suite's first 50 initial states.

`--position-noise` asks what an imprecise object readout costs: the clone reads the cube's and/or the goal's
x-y with an error of that std (m), in training and in evaluation, either one offset per episode (`--noise-kind
episode`, as a readout's bias on one layout) or a fresh one every step (`step`). `--clean-eval` evaluates
with the true positions: the true-positions oracle of push_failures.py, for a clone trained on noisy ones.
`--without-yaw` hides the cube's yaw from the clone, as the pixel policy's object tokens do (positions only).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TASK = "PushCube"


CUBE_XY, CUBE_YAW, GOAL_XY = slice(8, 10), slice(11, 13), slice(13, 15)  # where features() puts them


class PositionNoise:
    """An error on the cube's and/or goal's x-y as the clone reads them: one offset per episode (`episode`) or
    a fresh one every step (`step`). `enabled` switches it off (clean evaluation). `yaw=False` hides the
    cube's yaw (read as 0), as the pixel policy's object tokens carry positions only."""

    def __init__(self, std: float = 0.0, kind: str = "episode", objects: str = "both", seed: int = 5,
                 yaw: bool = True):
        if kind not in ("episode", "step"):
            raise ValueError(f"noise kind must be episode or step, got {kind!r}")
        if objects not in ("cube", "goal", "both"):
            raise ValueError(f"noisy objects must be cube, goal or both, got {objects!r}")
        self.std, self.kind, self.objects, self.enabled, self.yaw = std, kind, objects, std > 0, yaw
        self.rng = np.random.default_rng(seed)
        self.offset = np.zeros(4)

    def begin_episode(self) -> None:
        if self.enabled:
            self.offset = self.rng.normal(0.0, self.std, 4)

    def __call__(self, feats: np.ndarray) -> np.ndarray:
        feats = feats.copy()
        if not self.yaw:
            feats[CUBE_YAW] = 0.0
        if not self.enabled:
            return feats
        error = self.offset if self.kind == "episode" else self.rng.normal(0.0, self.std, 4)
        if self.objects in ("cube", "both"):
            feats[CUBE_XY] += error[:2]
        if self.objects in ("goal", "both"):
            feats[GOAL_XY] += error[2:]
        return feats


def features(env, noise: PositionNoise | None = None) -> np.ndarray:
    """Proprio (8) + cube position (3) + cube yaw as cos/sin of 4x yaw (a cube looks the same every 90°) + goal xy."""
    from envs.scene import quat_to_matrix

    cube_pos, cube_quat = env.sim.object_pose("cube")
    rot = quat_to_matrix(cube_quat)
    yaw = np.arctan2(rot[1, 0], rot[0, 0])
    goal = env.sim.object_pose("goal")[0][:2]
    feats = np.concatenate([env.state(), cube_pos, [np.cos(4 * yaw), np.sin(4 * yaw)], goal]).astype(np.float32)
    return feats if noise is None else noise(feats).astype(np.float32)


def collect(env, seeds, noise: float, rng, overrun: int = 0, position_noise: PositionNoise | None = None) -> list[dict]:
    """`overrun`: steps the expert keeps going after the first success (recorded as part of the episode);
    `position_noise`: the error on the object positions recorded (the expert acts on the true ones)."""
    from envs.env import ACTION_HIGH, ACTION_LOW

    episodes = []
    for seed in seeds:
        env.reset(seed=int(seed))
        if position_noise is not None:
            position_noise.begin_episode()
        obs, acts, success, left = [], [], False, None
        for _ in range(env.max_episode_steps + overrun):
            label = np.clip(env.expert_action().astype(np.float32), ACTION_LOW, ACTION_HIGH)
            obs.append(features(env, position_noise))
            acts.append(label)
            executed = label.copy()
            executed[:3] += rng.normal(0.0, noise, 3)
            done = env.step_physics(executed)
            if done and left is None:
                success, left = True, overrun
            if left is not None:
                if left == 0:
                    break
                left -= 1
        episodes.append({"obs": np.stack(obs), "actions": np.stack(acts), "success": success})
    return episodes


def chunk_dataset(episodes, chunk: int, padding: str = "hold"):
    """(state, next `chunk` labels, label mask) triples. Past a successful episode's end: `hold` trains the
    arm to stand still (the default's padding), `mask` leaves those labels out of the loss (the trainer's
    `repeat`), `drop` keeps only chunks that end inside the episode."""
    xs, ys, masks = [], [], []
    for ep in episodes:
        if not ep["success"]:
            continue
        a = ep["actions"]
        hold = a[-1].copy()
        hold[:6] = 0.0
        padded = np.concatenate([a, np.repeat(hold[None], chunk, 0)])
        for t in range(len(a) - (chunk - 1 if padding == "drop" else 0)):
            xs.append(ep["obs"][t])
            ys.append(padded[t:t + chunk])
            inside = np.arange(t, t + chunk) < len(a)
            masks.append(inside if padding == "mask" else np.ones(chunk, bool))
    return np.stack(xs), np.stack(ys), np.stack(masks)


def train(x, y, mask, steps: int, width: int, seed: int):
    import torch
    from torch import nn

    torch.manual_seed(seed)
    x_mean, x_std = x.mean(0), x.std(0) + 1e-6
    y_lo, y_hi = np.quantile(y.reshape(-1, 7), 0.01, 0), np.quantile(y.reshape(-1, 7), 0.99, 0)
    y_hi = np.where(y_hi - y_lo < 1e-6, y_lo + 1.0, y_hi)
    xn = torch.tensor((x - x_mean) / x_std)
    yn = torch.tensor(np.clip(2 * (y - y_lo) / (y_hi - y_lo) - 1, -1, 1), dtype=torch.float32).flatten(1)
    weight = torch.tensor(np.repeat(mask, 7, axis=1), dtype=torch.float32)
    net = nn.Sequential(nn.Linear(x.shape[1], width), nn.GELU(), nn.Linear(width, width), nn.GELU(),
                        nn.Linear(width, width), nn.GELU(), nn.Linear(width, yn.shape[1]))
    opt = torch.optim.AdamW(net.parameters(), lr=1e-3, weight_decay=1e-4)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, steps, eta_min=1e-4)
    g = torch.Generator().manual_seed(seed)
    for step in range(steps):
        idx = torch.randint(0, len(xn), (256,), generator=g)
        loss = ((net(xn[idx]) - yn[idx]).abs() * weight[idx]).sum() / weight[idx].sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    chunk = y.shape[1]

    def act(obs: np.ndarray) -> np.ndarray:
        with torch.no_grad():
            out = net(torch.tensor((obs - x_mean) / x_std)[None])[0].numpy().reshape(chunk, 7)
        return (np.clip(out, -1, 1) + 1) / 2 * (y_hi - y_lo) + y_lo  # bounded, as decoded tokens are

    return act, float(loss.detach())


def evaluate(env, act, seeds, execute: int, position_noise: PositionNoise | None = None) -> list[bool]:
    results = []
    for seed in seeds:
        env.reset(seed=int(seed))
        if position_noise is not None:
            position_noise.begin_episode()
        success, t = False, 0
        while t < env.max_episode_steps and not success:
            chunk = act(features(env, position_noise))
            for a in chunk[:execute]:
                success = env.step_physics(a)
                t += 1
                if success or t >= env.max_episode_steps:
                    break
        results.append(success)
    return results


def main() -> None:
    from envs.env import TabletopEnv
    from envs.suites import get_suite

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--episodes", type=int, default=90, help="demonstrations (suite seed stream 1, as collection)")
    p.add_argument("--eval", type=int, default=30, help="the suite's first N PushCube initial states")
    p.add_argument("--noise", type=float, default=0.01, help="DART noise std on the executed translation (m)")
    p.add_argument("--chunk", type=int, default=8)
    p.add_argument("--execute", type=int, default=4, help="actions executed per predicted chunk")
    p.add_argument("--overrun", type=int, default=0, help="expert steps recorded after the first success")
    p.add_argument("--padding", choices=["hold", "mask", "drop"], default="hold")
    p.add_argument("--steps", type=int, default=6000)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--seeds", type=int, default=1, help="training seeds (each a fresh MLP on the same data)")
    p.add_argument("--backend", default="mujoco")
    p.add_argument("--expert", default=None, help="module:function of another PushCube script (a candidate)")
    p.add_argument("--expert-check", action="store_true", help="run the expert alone on the suite's first 50 states first")
    p.add_argument("--position-noise", type=float, default=0.0, help="std (m) of the error on the read object x-y")
    p.add_argument("--noise-kind", choices=["episode", "step"], default="episode",
                   help="one offset per episode (a readout's bias) or a fresh one every step")
    p.add_argument("--noisy", choices=["cube", "goal", "both"], default="both", help="which positions are read with error")
    p.add_argument("--without-yaw", action="store_true", help="the clone does not read the cube's yaw")
    p.add_argument("--clean-eval", action="store_true", help="evaluate with the true positions (trained on noisy ones)")
    p.add_argument("--out", default=None, help="JSON results")
    args = p.parse_args()

    import torch
    torch.set_num_threads(1)
    if args.expert:
        import importlib

        from envs import experts
        module, name = args.expert.split(":")
        experts.SCRIPTS[TASK] = getattr(importlib.import_module(module), name)
    env = TabletopEnv(TASK, backend=args.backend, image_size=32)
    suite = get_suite("tabletop10")
    if args.expert_check:
        checked = collect(env, suite.episode_seeds(TASK, 50, seed=0), 0.0, np.random.default_rng(0))
        print(f"expert alone: {sum(e['success'] for e in checked)}/50 of the suite's PushCube initial states "
              f"({args.backend}, default randomization), {np.mean([len(e['actions']) for e in checked]):.1f} steps")
    t0 = time.time()
    position_noise = PositionNoise(args.position_noise, args.noise_kind, args.noisy, yaw=not args.without_yaw)
    episodes = collect(env, suite.episode_seeds(TASK, args.episodes, seed=1), args.noise, np.random.default_rng(1),
                       args.overrun, position_noise)
    position_noise.enabled = args.position_noise > 0 and not args.clean_eval
    kept = sum(e["success"] for e in episodes)
    x, y, mask = chunk_dataset(episodes, args.chunk, args.padding)
    print(f"collected {len(episodes)} episodes ({kept} successful, {len(x)} steps kept) in {time.time() - t0:.0f} s")
    rows = []
    for s in range(args.seeds):
        t0 = time.time()
        act, loss = train(x, y, mask, args.steps, args.width, seed=s)
        train_s = time.time() - t0
        results = evaluate(env, act, suite.episode_seeds(TASK, args.eval, seed=0), args.execute, position_noise)
        rate = float(np.mean(results))
        rows.append({"seed": s, "success": rate, "successes": int(sum(results)), "final_loss": loss, "train_s": train_s})
        print(f"seed {s}: PushCube {sum(results)}/{len(results)} = {100 * rate:.1f}%  (final L1 {loss:.4f}, "
              f"train {train_s:.0f} s)")
    env.close()
    if args.out:
        Path(args.out).write_text(json.dumps({"args": vars(args), "demonstrations_kept": kept, "runs": rows}, indent=2))


if __name__ == "__main__":
    main()
