"""Batched imagined rollouts on recorded episodes, for benchmarks and evaluation.

`imagine_clips` takes real windows of held-out episodes, gives the world model the first
`context` frames, feeds it an action sequence (the true one, or any other) and returns the
imagined frames next to the real ones, rendered both plainly (tokenizer decode) and anchored
(residual decoding on the last real frame; see `worldmodel.env`).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch

from worldmodel.model import WorldModel


@dataclass
class Windows:
    images: np.ndarray  # (B, context + horizon, S, S, 3) uint8, real
    actions: np.ndarray  # (B, context + horizon - 1, 7) raw
    episode: np.ndarray  # (B,) episode index
    start: np.ndarray  # (B,) first frame index


def episode_windows(episodes, context: int, horizon: int, stride: int = 4, max_windows: int | None = None) -> Windows:
    """Every window of context + horizon frames (starts every `stride` frames) of the episodes."""
    imgs, acts, eps, starts = [], [], [], []
    span = context + horizon
    for e, ep in enumerate(episodes):
        for s in range(0, len(ep) - span + 1, stride):
            imgs.append(ep.images[s:s + span])
            acts.append(ep.actions[s:s + span - 1])
            eps.append(e)
            starts.append(s)
    if not imgs:
        raise ValueError(f"no held-out episode has the {span} frames needed (context {context} + horizon {horizon})")
    if max_windows is not None:
        keep = np.linspace(0, len(imgs) - 1, min(max_windows, len(imgs))).round().astype(int)
        imgs, acts = [imgs[i] for i in keep], [acts[i] for i in keep]
        eps, starts = [eps[i] for i in keep], [starts[i] for i in keep]
    return Windows(np.stack(imgs), np.stack(acts).astype(np.float32), np.array(eps), np.array(starts))


@torch.no_grad()
def imagine_clips(world: WorldModel, images: np.ndarray, actions: np.ndarray, context: int, horizon: int,
                  method: str = "maskgit", steps: int = 8, temperature: float = 1.0, sample_temperature: float = 0.0,
                  seed: int = 0, batch_size: int = 16) -> dict[str, np.ndarray]:
    """Imagined frames (B, horizon, S, S, 3): "plain" and "anchored", plus the decode time in seconds."""
    from worldmodel.env import render_anchored

    plain, anchored, tokens_out = [], [], []
    seconds = 0.0
    for b in range(0, len(images), batch_size):
        ctx = images[b:b + batch_size, :context]
        acts = actions[b:b + batch_size]
        rollout = world.rollout(ctx, acts[:, : context - 1] if context > 1 else None, method, steps, temperature,
                                sample_temperature, seed=seed + b)
        anchor_tokens = rollout.frames[-1]
        step_tokens = []
        started = time.perf_counter()
        for h in range(horizon):
            a = torch.from_numpy(world.normalize_actions(acts[:, context - 1 + h]))
            step_tokens.append(rollout.step(a))
        seconds += time.perf_counter() - started
        tok = torch.stack(step_tokens, 1)  # (b, H, N)
        tokens_out.append(tok.cpu().numpy())
        plain.append(world.decode(tok))
        flat = tok.reshape(-1, tok.shape[-1])
        anchor_t = anchor_tokens.repeat_interleave(horizon, 0)
        anchor_i = np.repeat(ctx[:, -1], horizon, 0)
        anchored.append(render_anchored(world, flat, anchor_t, anchor_i).reshape(*tok.shape[:2], *ctx.shape[-3:]))
    return {"plain": np.concatenate(plain), "anchored": np.concatenate(anchored),
            "tokens": np.concatenate(tokens_out), "seconds": seconds}
