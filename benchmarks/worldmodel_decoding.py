"""Decoding speed and quality: discrete diffusion (MaskGIT) vs autoregressive, same model, same run.

    python benchmarks/worldmodel_decoding.py --worldmodel RUN/worldmodel --data HELDOUT_BUILDER_DIR [--spec embodied]

On windows of held-out episodes (1 real context frame, `--horizon` imagined frames under the
true actions), the same dynamics model decodes every frame token by token in raster order
(autoregressive: one forward pass per token, past frames cached) and with MaskGIT at each step
count of `--steps` (cosine schedule, confidence + Gumbel noise). Reported: imagined frames per
second (decode time only, batch of `--batch` rollouts; the median of `--repeats` timed runs, since one
pass of the fast decoders lasts a fraction of a second), the speed-up over autoregressive, and
PSNR (of the pooled mean squared error) against the real frames (plain tokenizer decode and
anchored), with its difference to the autoregressive PSNR: the speed/quality curve.
"""
from __future__ import annotations

import argparse
import json

import numpy as np
import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worldmodel", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--split", default="train")
    parser.add_argument("--spec", default=None)
    parser.add_argument("--steps", default="1,2,4,8,16")
    parser.add_argument("--horizon", type=int, default=4)
    parser.add_argument("--max-windows", type=int, default=32)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=5, help="timed runs per decoder (the median is reported)")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from worldmodel.data import load_episodes
    from worldmodel.metrics import pooled_psnr
    from worldmodel.model import WorldModel
    from worldmodel.rollouts import episode_windows, imagine_clips

    world = WorldModel.from_pretrained(args.worldmodel)
    episodes, _, _ = load_episodes(args.data, args.data_dir, args.split, world.image_size, args.spec,
                                   statistics=world.statistics, show_progress=False)
    win = episode_windows(episodes, 1, args.horizon, stride=4, max_windows=args.max_windows)
    target = win.images[:, 1:]
    frames = len(win.images) * args.horizon
    n_tokens = world.dynamics.config.num_tokens
    runs = [("autoregressive", None)] + [("maskgit", int(k)) for k in args.steps.split(",")]
    rows = []
    if args.repeats < 1:
        parser.error(f"--repeats must be >= 1, got {args.repeats}")
    for method, steps in runs:
        timings = []
        for _ in range(args.repeats):  # same seed: the same frames each time, only the clock differs
            out = imagine_clips(world, win.images, win.actions, 1, args.horizon, method=method, steps=steps or 1,
                                seed=args.seed, batch_size=args.batch, states=win.states)
            timings.append(out["seconds"])
        seconds = float(np.median(timings))
        rows.append({"method": method, "steps": steps if steps else n_tokens, "seconds": seconds,
                     "frames_per_second": frames / seconds,
                     "psnr_plain": pooled_psnr(out["plain"], target),
                     "psnr_anchored": pooled_psnr(out["anchored"], target)})
    ar = rows[0]
    for r in rows:
        r["speedup"] = r["frames_per_second"] / ar["frames_per_second"]
        r["psnr_loss_plain"] = ar["psnr_plain"] - r["psnr_plain"]
        r["psnr_loss_anchored"] = ar["psnr_anchored"] - r["psnr_anchored"]
    print(f"{len(win.images)} windows x {args.horizon} imagined frames, {n_tokens} tokens per frame, "
          f"batch {args.batch}, {args.threads} thread(s), median of {args.repeats} timed runs")
    print("| decoding | forward passes / frame | frames/s | speed-up vs AR | PSNR plain (loss vs AR) "
          "| PSNR anchored (loss vs AR) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        name = "autoregressive (raster)" if r["method"] == "autoregressive" else f"MaskGIT {r['steps']} steps"
        passes = r["steps"] + 1  # + the clean pass that caches the frame for the next one
        print(f"| {name} | {passes} | {r['frames_per_second']:.2f} | {r['speedup']:.1f}x | {r['psnr_plain']:.2f} "
              f"({r['psnr_loss_plain']:+.2f}) | {r['psnr_anchored']:.2f} ({r['psnr_loss_anchored']:+.2f}) |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"windows": int(len(win.images)), "horizon": args.horizon, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
