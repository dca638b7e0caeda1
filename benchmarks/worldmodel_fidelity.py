"""World-model fidelity and controllability on held-out episodes.

    python benchmarks/worldmodel_fidelity.py --worldmodel RUN/worldmodel --data HELDOUT_BUILDER_DIR [--spec embodied]

For every window of 1 real context frame + 16 real future frames (a new window every 4 frames of
each held-out episode), the world model imagines frames 1..16 under the true actions and under
uniformly random actions (within the action bounds). Reported at horizons 1, 4 and 16:
PSNR/SSIM of the imagined frames (plain tokenizer decode, and residual-anchored decode) against the
copy-last-frame baseline (predict the context frame forever), and Genie's controllability
ΔPSNR = PSNR(true actions) − PSNR(random actions). PSNR is computed from the mean squared error
over all windows at that horizon (a per-frame mean would be dominated by the windows where the
scene does not change at all and the baseline's PSNR is unbounded); SSIM is the per-frame mean.
For a world model that imagines the robot state, the imagined TCP position's error (cm, mean over
windows) and gripper opening's error are reported too, against holding the context frame's state.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

HORIZONS = (1, 4, 16)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worldmodel", required=True)
    parser.add_argument("--data", required=True, help="held-out RLDS dataset (builder dir, name or mixture)")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--spec", default=None)
    parser.add_argument("--steps", type=int, default=8, help="MaskGIT steps")
    parser.add_argument("--max-windows", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from worldmodel.data import load_episodes
    from worldmodel.metrics import pooled_psnr, ssim
    from worldmodel.model import WorldModel
    from worldmodel.rollouts import episode_windows, imagine_clips

    world = WorldModel.from_pretrained(args.worldmodel)
    episodes, _, _ = load_episodes(args.data, args.data_dir, args.split, world.image_size, args.spec,
                                   statistics=world.statistics, show_progress=False)
    horizon = max(HORIZONS)
    win = episode_windows(episodes, 1, horizon, stride=4, max_windows=args.max_windows)
    rng = np.random.default_rng(args.seed)
    from envs.env import ACTION_HIGH, ACTION_LOW

    random_actions = rng.uniform(ACTION_LOW, ACTION_HIGH, size=win.actions.shape).astype(np.float32)
    started = time.time()
    true = imagine_clips(world, win.images, win.actions, 1, horizon, steps=args.steps, seed=args.seed,
                         states=win.states)
    rand = imagine_clips(world, win.images, random_actions, 1, horizon, steps=args.steps, seed=args.seed,
                         states=win.states)
    target = win.images[:, 1:]
    copy_last = np.repeat(win.images[:, :1], horizon, 1)
    rows = {}
    for h in HORIZONS:
        i = h - 1
        row = {"copy_last_psnr": pooled_psnr(copy_last[:, i], target[:, i]),
               "copy_last_ssim": float(ssim(copy_last[:, i], target[:, i]).mean())}
        for mode in ("plain", "anchored"):
            row[f"{mode}_psnr"] = pooled_psnr(true[mode][:, i], target[:, i])
            row[f"{mode}_ssim"] = float(ssim(true[mode][:, i], target[:, i]).mean())
            row[f"{mode}_random_psnr"] = pooled_psnr(rand[mode][:, i], target[:, i])
            row[f"{mode}_delta_psnr"] = row[f"{mode}_psnr"] - row[f"{mode}_random_psnr"]
        if "states" in true:
            real, held = win.states[:, 1:][:, i], win.states[:, 0]
            row["tcp_error_cm"] = float(np.linalg.norm(true["states"][:, i, :3] - real[:, :3], axis=-1).mean() * 100)
            row["tcp_error_hold_cm"] = float(np.linalg.norm(held[:, :3] - real[:, :3], axis=-1).mean() * 100)
            row["gripper_error"] = float(np.abs(true["states"][:, i, 7] - real[:, 7]).mean())
            row["gripper_error_hold"] = float(np.abs(held[:, 7] - real[:, 7]).mean())
        rows[h] = row
    result = {"windows": int(len(win.images)), "episodes": len(episodes), "maskgit_steps": args.steps,
              "horizons": rows, "seconds": round(time.time() - started, 1)}
    print(f"{len(win.images)} windows from {len(episodes)} held-out episodes, MaskGIT {args.steps} steps")
    print("| horizon | copy-last PSNR / SSIM | model PSNR / SSIM (plain) | model PSNR / SSIM (anchored) "
          "| ΔPSNR true−random (plain / anchored) |")
    print("|---|---|---|---|---|")
    for h, r in rows.items():
        print(f"| {h} | {r['copy_last_psnr']:.2f} / {r['copy_last_ssim']:.3f} | {r['plain_psnr']:.2f} / "
              f"{r['plain_ssim']:.3f} | {r['anchored_psnr']:.2f} / {r['anchored_ssim']:.3f} | "
              f"{r['plain_delta_psnr']:+.2f} / {r['anchored_delta_psnr']:+.2f} |")
    if "tcp_error_cm" in rows[HORIZONS[0]]:
        print("| horizon | imagined TCP error (cm) | holding the first state | gripper error (0-1) | holding |")
        print("|---|---|---|---|---|")
        for h, r in rows.items():
            print(f"| {h} | {r['tcp_error_cm']:.2f} | {r['tcp_error_hold_cm']:.2f} | {r['gripper_error']:.3f} | "
                  f"{r['gripper_error_hold']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
