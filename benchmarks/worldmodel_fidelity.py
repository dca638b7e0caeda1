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
The tokenizer's temporal stability on the held-out episodes, as the dynamics model's training data is
tokenized (`encode_sequence`), is reported too: the share of token changes between consecutive frames
that happen in still patches (mean absolute pixel change < 1%; `worldmodel.metrics.token_flicker`),
and whether the imagined frames change where the real ones do: the IoU between the pixels that move
(mean absolute change > 10% from the context frame) in the real and in the anchored imagined frame,
under the true and under random actions. `--one-step` adds token-level figures one step ahead from one
real frame on every held-out transition: of the tokens that really change (real next frame encoded as
the training data is), the share the model predicts, and of the tokens it changes, the share that are
right, under the true and under random actions, against copying the last frame's tokens.
"""
from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch

HORIZONS = (1, 4, 16)


def one_step_tokens(world, episodes, steps: int, seed: int) -> dict[str, float]:
    """Next-frame tokens from one real frame, every transition, true vs random actions (see the docstring)."""
    from envs.env import ACTION_HIGH, ACTION_LOW
    from worldmodel.rollouts import episode_windows, imagine_clips

    win = episode_windows(episodes, 1, 1, stride=1)
    # the pair encoded as a sequence, as the dynamics model's training data was (held codes stay held)
    real = torch.stack([world.tokenizer.encode_sequence(w) for w in win.images]).reshape(len(win.images), 2, -1)
    real = real.cpu().numpy()
    changed = real[:, 1] != real[:, 0]
    rng = np.random.default_rng(seed)
    random_actions = rng.uniform(ACTION_LOW, ACTION_HIGH, size=win.actions.shape).astype(np.float32)
    out = {"transitions": len(real), "changed_share": float(changed.mean()),
           "copy_accuracy": float((real[:, 0] == real[:, 1]).mean())}
    for name, actions in (("true", win.actions), ("random", random_actions)):
        pred = imagine_clips(world, win.images, actions, 1, 1, steps=steps, seed=seed, states=win.states)["tokens"]
        pred = pred[:, 0]
        right, predicted_change = pred == real[:, 1], pred != real[:, 0]
        out[f"{name}_predicted_change_share"] = float(predicted_change.mean())
        out[f"{name}_changed_recall"] = float(right[changed].mean())
        out[f"{name}_change_precision"] = float(right[predicted_change].mean()) if predicted_change.any() else 0.0
        out[f"{name}_accuracy"] = float(right.mean())
    return out


def moved(before: np.ndarray, after: np.ndarray, threshold: float = 0.1) -> np.ndarray:
    """Pixels (B, S, S) whose mean absolute RGB change between two uint8 frames exceeds `threshold` (of 255)."""
    return np.abs(after.astype(np.float32) - before.astype(np.float32)).mean(-1) / 255 > threshold


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
    parser.add_argument("--one-step", action="store_true", help="also token-level figures one step ahead")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from worldmodel.data import load_episodes
    from worldmodel.metrics import pooled_psnr, ssim, token_flicker
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
        # does the imagined frame change where the real one does? pixels moved by > 10% from the context frame
        real_moved = moved(copy_last[:, i], target[:, i])
        for actions, frames in (("true", true), ("random", rand)):
            imagined_moved = moved(copy_last[:, i], frames["anchored"][:, i])
            union = max(int((real_moved | imagined_moved).sum()), 1)
            row[f"moved_iou_{actions}"] = float((real_moved & imagined_moved).sum() / union)
        row["moved_share_real"] = float(real_moved.mean())
        row["moved_share_imagined"] = float(moved(copy_last[:, i], true["anchored"][:, i]).mean())
        if "states" in true:
            real, held = win.states[:, 1:][:, i], win.states[:, 0]
            row["tcp_error_cm"] = float(np.linalg.norm(true["states"][:, i, :3] - real[:, :3], axis=-1).mean() * 100)
            row["tcp_error_hold_cm"] = float(np.linalg.norm(held[:, :3] - real[:, :3], axis=-1).mean() * 100)
            row["gripper_error"] = float(np.abs(true["states"][:, i, 7] - real[:, 7]).mean())
            row["gripper_error_hold"] = float(np.abs(held[:, 7] - real[:, 7]).mean())
        rows[h] = row
    tok = world.tokenizer
    flicker = token_flicker([(e.images, tok.encode_sequence(e.images).cpu().numpy()) for e in episodes],
                            tok.config.downsample)
    result = {"windows": int(len(win.images)), "episodes": len(episodes), "maskgit_steps": args.steps,
              "horizons": rows, "token_flicker": flicker, "hold_threshold": tok.config.hold_threshold}
    if args.one_step:
        result["one_step"] = one_step_tokens(world, episodes, args.steps, args.seed)
    result["seconds"] = round(time.time() - started, 1)
    print(f"{len(win.images)} windows from {len(episodes)} held-out episodes, MaskGIT {args.steps} steps")
    print(f"tokenizer (hold_threshold {tok.config.hold_threshold}): {flicker['still_share']:.1%} of token changes "
          f"in still patches (still patches change token {flicker['still_change_rate']:.1%} of the time, moving "
          f"{flicker['moving_change_rate']:.1%})")
    print("| horizon | copy-last PSNR / SSIM | model PSNR / SSIM (plain) | model PSNR / SSIM (anchored) "
          "| ΔPSNR true−random (plain / anchored) |")
    print("|---|---|---|---|---|")
    for h, r in rows.items():
        print(f"| {h} | {r['copy_last_psnr']:.2f} / {r['copy_last_ssim']:.3f} | {r['plain_psnr']:.2f} / "
              f"{r['plain_ssim']:.3f} | {r['anchored_psnr']:.2f} / {r['anchored_ssim']:.3f} | "
              f"{r['plain_delta_psnr']:+.2f} / {r['anchored_delta_psnr']:+.2f} |")
    print("| horizon | pixels moved (real / imagined, anchored) | IoU of moved pixels, true actions | random actions |")
    print("|---|---|---|---|")
    for h, r in rows.items():
        print(f"| {h} | {r['moved_share_real']:.1%} / {r['moved_share_imagined']:.1%} | {r['moved_iou_true']:.3f} | "
              f"{r['moved_iou_random']:.3f} |")
    if "tcp_error_cm" in rows[HORIZONS[0]]:
        print("| horizon | imagined TCP error (cm) | holding the first state | gripper error (0-1) | holding |")
        print("|---|---|---|---|---|")
        for h, r in rows.items():
            print(f"| {h} | {r['tcp_error_cm']:.2f} | {r['tcp_error_hold_cm']:.2f} | {r['gripper_error']:.3f} | "
                  f"{r['gripper_error_hold']:.3f} |")
    if args.one_step:
        o = result["one_step"]
        print(f"one step ahead, {o['transitions']} transitions: {o['changed_share']:.1%} of the tokens change; "
              f"copying the last frame's tokens: accuracy {o['copy_accuracy']:.3f}")
        print("| actions | tokens predicted to change | changed tokens predicted right | predicted changes right "
              "| token accuracy |")
        print("|---|---|---|---|---|")
        for name in ("true", "random"):
            print(f"| {name} | {o[f'{name}_predicted_change_share']:.1%} | {o[f'{name}_changed_recall']:.1%} | "
                  f"{o[f'{name}_change_precision']:.1%} | {o[f'{name}_accuracy']:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
