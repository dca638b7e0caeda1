"""`python -m embodied.eval ... imagine=true worldmodel=RUN/worldmodel`: a policy judged in imagination.

Every episode first runs in the simulator as usual (same suite, seeds, randomization), recording
its initial frame and state and the policy's actions. The world model then starts from that same
initial frame (and state) and replays the same actions open-loop, all episodes in one batch; the success detector judges each imagined frame
(the first one it fires on ends the imagined episode as a success). Frames are decoded as the
detector's training replays were (`detector.config.rollout_method/rollout_steps`) unless told
otherwise. This works for every policy, including the scripted expert, whose actions need the
simulator's privileged state. (A policy that acts on images can also be run closed-loop in
imagination with `worldmodel.env.ImaginedEnv`.)

Writes, in the output dir:
* `results.json`, `results.md`, `success_rates.png`, `episodes.jsonl`: the imagined outcomes in
  the platform's results schema (policy named "<policy> (imagined)"); each episode line also
  carries `sim_success` and `sim_length`;
* `sim/`: the same files for the simulator's outcomes;
* `agreement.json`: per-task imagined vs simulated success rates and episode-level agreement;
* `videos/<task>_ep<k>_imagined_vs_sim.mp4`: side by side, simulated (left) and imagined
  (right) frames from the same initial state under the same actions.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from worldmodel.model import WorldModel


def resize_frames(frames: np.ndarray, size: int) -> np.ndarray:
    """uint8 (..., H, W, 3) → (..., size, size, 3) (area interpolation)."""
    frames = np.asarray(frames)
    if frames.shape[-3:-1] == (size, size):
        return frames
    x = torch.from_numpy(frames.reshape(-1, *frames.shape[-3:]).copy()).permute(0, 3, 1, 2).float()
    x = F.interpolate(x, size=(size, size), mode="area").round().clamp(0, 255).to(torch.uint8)
    return x.permute(0, 2, 3, 1).numpy().reshape(*frames.shape[:-3], size, size, 3)


def rollout_decoding(world: WorldModel, method: str | None, steps: int | None) -> tuple[str, int]:
    """The decoding to imagine with: as given, else as the success detector's training rollouts were decoded."""
    detector = world.detector.config if world.detector is not None else None
    method = method or (detector.rollout_method if detector else "maskgit")
    steps = int(steps) if steps is not None else (detector.rollout_steps if detector else 8)
    return method, steps


@torch.no_grad()
def imagine_replays(world: WorldModel, records: list[dict], method: str | None = None, steps: int | None = None,
                    seed: int = 0, pixel_anchor: bool = True, show_progress: bool = False) -> list[dict]:
    """Each simulated episode's actions replayed open-loop from its first frame (and state), batched
    (`worldmodel.rollouts.imagine_episodes`, the detector's own training protocol). An imagined
    episode succeeds at the first frame the detector fires on. Records with `frames` (the ones
    filmed in the simulator) get their imagined frames too, for side-by-side videos."""
    from worldmodel.data import Episode
    from worldmodel.env import render_anchored
    from worldmodel.rollouts import imagine_episodes
    from worldmodel.success import episode_scores

    method, steps = rollout_decoding(world, method, steps)
    frames = resize_frames(np.stack([r["initial_frame"] for r in records]), world.image_size)
    first_tokens = world.tokenizer.encode(frames).reshape(len(records), 1, -1).cpu().numpy()
    episodes = []
    for r, frame, first in zip(records, frames, first_tokens):
        states = world.normalize_states(np.asarray(r["initial_state"])[None]) if world.uses_states else None
        actions = np.asarray(r["actions"], np.float32)
        episodes.append(Episode("replay", frame[None], actions, world.normalize_actions(actions),
                                np.zeros(len(actions), np.float32), "", first, None, states))
    tokens, states = imagine_episodes(world.dynamics, episodes, method, steps, seed, show_progress=show_progress)
    scores = episode_scores(world.detector, tokens, states, [first[0] for first in first_tokens])
    out = []
    for r, episode, ep_tokens, ep_scores in zip(records, episodes, tokens, scores):
        fired = np.flatnonzero(ep_scores > world.detector.config.threshold)
        length = int(fired[0]) + 1 if fired.size else len(ep_scores)
        frames = None
        if r.get("frames") is not None:
            kept = torch.from_numpy(ep_tokens[:length].astype(np.int64))
            first = episode.images[0]
            rendered = (render_anchored(world, kept, torch.from_numpy(episode.tokens[:1].astype(np.int64)), first)
                        if pixel_anchor else world.decode(kept))
            frames = [first, *rendered]
        out.append({"success": bool(fired.size), "length": length, "frames": frames})
    return out


def evaluate_in_imagination(policy, cfg, output_dir: str | os.PathLike, world_model: str | os.PathLike | WorldModel,
                            method: str | None = None, steps: int | None = None, policy_name: str | None = None,
                            show_progress: bool = True) -> dict:
    """Run `policy` in the simulator and judge the same episodes in imagination; the imagined results."""
    return evaluate_in_imaginations(policy, cfg, [output_dir], [world_model], method, steps, policy_name,
                                    show_progress)[0]


def evaluate_in_imaginations(policy, cfg, output_dirs: list, world_models: list, method: str | None = None,
                             steps: int | None = None, policy_name: str | None = None,
                             show_progress: bool = True) -> list[dict]:
    """One simulated run of `policy`, judged by each world model in turn (e.g. several training seeds), each
    into its own output dir; the imagined results, in order."""
    from dataclasses import replace

    from embodied.evaluation import run_suite

    if len(output_dirs) != len(world_models):
        raise ValueError(f"{len(world_models)} world models but {len(output_dirs)} output dirs")
    worlds = [w if isinstance(w, WorldModel) else WorldModel.from_pretrained(w) for w in world_models]
    for world, source in zip(worlds, world_models):
        if world.detector is None:
            raise ValueError(f"world model {source} has no success detector; imagine=true needs one")
    sim_cfg = replace(cfg, record_actions=True)
    tasks, records = run_suite(policy, sim_cfg, show_progress)
    return [judge_in_imagination(records, tasks, sim_cfg, world, source, Path(out), method, steps,
                                 policy_name or policy.name, show_progress)
            for world, source, out in zip(worlds, world_models, output_dirs)]


def judge_in_imagination(records: list[dict], tasks, sim_cfg, world: WorldModel, source, output_dir: Path,
                         method: str | None, steps: int | None, name: str, show_progress: bool) -> dict:
    """The simulated episodes `records` replayed and judged in `world`; writes the output dir's files."""
    from embodied.evaluation import build_results, write_outputs, write_video

    method, steps = rollout_decoding(world, method, steps)
    imagined = []
    videos = []
    for r, out in zip(records, imagine_replays(world, records, method, steps, seed=sim_cfg.seed,
                                               show_progress=show_progress)):
        imagined.append({**{k: v for k, v in r.items() if k not in ("frames", "initial_frame", "initial_state",
                                                                    "actions")},
                         "success": out["success"], "length": out["length"], "sim_success": r["success"],
                         "sim_length": r["length"]})
        if out["frames"] is not None:
            videos.append((r, out["frames"]))
    write_outputs(build_results(records, tasks, sim_cfg, name), records, output_dir / "sim")
    results = build_results(imagined, tasks, sim_cfg, f"{name} (imagined)")
    results["imagination"] = {"worldmodel": str(source) if not isinstance(source, WorldModel) else None,
                              "method": method, "steps": steps, "mode": "open-loop replay of the simulated actions"}
    write_outputs(results, imagined, output_dir)
    for r, frames in videos:
        sim_frames = resize_frames(np.stack(r["frames"]), world.image_size)
        n = max(len(sim_frames), len(frames))
        pad = lambda seq: list(seq) + [seq[-1]] * (n - len(seq))  # noqa: E731 (hold the last frame)
        side = [np.concatenate([a, b], 1) for a, b in zip(pad(list(sim_frames)), pad(frames))]
        write_video(output_dir / "videos" / f"{r['task']}_ep{r['episode']:03d}_imagined_vs_sim.mp4", side)
    agreement = {"tasks": {}, "episodes_agreeing": float(np.mean([i["success"] == i["sim_success"] for i in imagined]))}
    for task in tasks:
        rows = [i for i in imagined if i["task"] == task]
        agreeing = [i["success"] == i["sim_success"] for i in rows]
        agreement["tasks"][task] = {"imagined_success_rate": float(np.mean([i["success"] for i in rows])),
                                    "sim_success_rate": float(np.mean([i["sim_success"] for i in rows])),
                                    "episodes_agreeing": float(np.mean(agreeing))}
    (output_dir / "agreement.json").write_text(json.dumps(agreement, indent=2))
    return results
