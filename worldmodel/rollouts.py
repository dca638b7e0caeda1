"""Batched imagined rollouts on recorded episodes, for benchmarks and evaluation.

`imagine_clips` takes real windows of held-out episodes, gives the world model the first
`context` frames, feeds it an action sequence (the true one, or any other) and returns the
imagined frames next to the real ones, rendered both plainly (tokenizer decode) and anchored
(residual decoding on the last real frame; see `worldmodel.env`). `imagine_episodes` replays
whole tokenized episodes open-loop from their first frames, batched (the success detector's
training data).
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
    states: np.ndarray | None  # (B, context + horizon, S) raw robot states, if the episodes have them
    episode: np.ndarray  # (B,) episode index
    start: np.ndarray  # (B,) first frame index


def episode_windows(episodes, context: int, horizon: int, stride: int = 4, max_windows: int | None = None) -> Windows:
    """Every window of context + horizon frames (starts every `stride` frames) of the episodes."""
    imgs, acts, states, eps, starts = [], [], [], [], []
    span = context + horizon
    for e, ep in enumerate(episodes):
        for s in range(0, len(ep) - span + 1, stride):
            imgs.append(ep.images[s:s + span])
            acts.append(ep.actions[s:s + span - 1])
            states.append(None if ep.states is None else ep.states[s:s + span])
            eps.append(e)
            starts.append(s)
    if not imgs:
        raise ValueError(f"no held-out episode has the {span} frames needed (context {context} + horizon {horizon})")
    if max_windows is not None:
        keep = np.linspace(0, len(imgs) - 1, min(max_windows, len(imgs))).round().astype(int)
        imgs, acts, states = [imgs[i] for i in keep], [acts[i] for i in keep], [states[i] for i in keep]
        eps, starts = [eps[i] for i in keep], [starts[i] for i in keep]
    states_out = None if any(x is None for x in states) else np.stack(states).astype(np.float32)
    return Windows(np.stack(imgs), np.stack(acts).astype(np.float32), states_out, np.array(eps), np.array(starts))


@torch.no_grad()
def imagine_clips(world: WorldModel, images: np.ndarray, actions: np.ndarray, context: int, horizon: int,
                  method: str = "maskgit", steps: int = 8, temperature: float = 1.0, sample_temperature: float = 0.0,
                  seed: int = 0, batch_size: int = 16, states: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Imagined frames (B, horizon, S, S, 3): "plain" and "anchored", plus the decode time in seconds.
    `states` (B, >= context, S): the real robot states, for a world model that imagines states; its
    imagined raw states (B, horizon, S) are then returned as "states"."""
    from worldmodel.env import render_anchored

    plain, anchored, tokens_out, states_out = [], [], [], []
    seconds = 0.0
    for b in range(0, len(images), batch_size):
        ctx = images[b:b + batch_size, :context]
        acts = actions[b:b + batch_size]
        ctx_states = None if states is None or not world.uses_states else states[b:b + batch_size, :context]
        rollout = world.rollout(ctx, acts[:, : context - 1] if context > 1 else None, method, steps, temperature,
                                sample_temperature, seed=seed + b, context_states=ctx_states)
        anchor_tokens = rollout.frames[-1]
        step_tokens = []
        started = time.perf_counter()
        step_states = []
        for h in range(horizon):
            a = torch.from_numpy(world.normalize_actions(acts[:, context - 1 + h]))
            step_tokens.append(rollout.step(a))
            if rollout.states:
                step_states.append(rollout.states[-1])
        seconds += time.perf_counter() - started
        if step_states:
            states_out.append(world.unnormalize_states(torch.stack(step_states, 1).cpu().numpy()))
        tok = torch.stack(step_tokens, 1)  # (b, H, N)
        tokens_out.append(tok.cpu().numpy())
        plain.append(world.decode(tok))
        flat = tok.reshape(-1, tok.shape[-1])
        anchor_t = anchor_tokens.repeat_interleave(horizon, 0)
        anchor_i = np.repeat(ctx[:, -1], horizon, 0)
        anchored.append(render_anchored(world, flat, anchor_t, anchor_i).reshape(*tok.shape[:2], *ctx.shape[-3:]))
    out = {"plain": np.concatenate(plain), "anchored": np.concatenate(anchored),
           "tokens": np.concatenate(tokens_out), "seconds": seconds}
    if states_out:
        out["states"] = np.concatenate(states_out)
    return out


@torch.no_grad()
def imagine_episodes(dynamics, episodes, method: str = "maskgit", steps: int = 4, seed: int = 0,
                     temperature: float = 1.0, batch_size: int = 64, actions: list[np.ndarray] | None = None,
                     show_progress: bool = False) -> tuple[list[np.ndarray], list[np.ndarray | None]]:
    """Open-loop imagination of tokenized episodes: from each one's first frame (and state), under its
    own normalized actions (or `actions`, one (T, 7) normalized array per episode), the imagined tokens
    after every action, (T, g*g) int16 per episode, and for a model that imagines states the imagined
    normalized states, (T, S) float32 per episode (else None). Episodes of similar length share a
    batch; a shorter one is padded with zero actions whose frames are dropped."""
    from tqdm.auto import tqdm

    from worldmodel.dynamics import Rollout

    if actions is not None and len(actions) != len(episodes):
        raise ValueError(f"{len(actions)} action sequences for {len(episodes)} episodes")
    if actions is None:
        actions = [e.actions_norm for e in episodes]
    sequences = [np.asarray(a, np.float32) for a in actions]
    for i, e in enumerate(episodes):
        if e.tokens is None:
            raise ValueError(f"episode {i} ({e.dataset}) is not tokenized; run the tokenizer over it first")
    use_states = bool(dynamics.config.state_dim)
    if use_states and any(e.states_norm is None for e in episodes):
        raise ValueError("the dynamics model imagines robot states but some episodes have none")
    out: list[np.ndarray | None] = [None] * len(episodes)
    out_states: list[np.ndarray | None] = [None] * len(episodes)
    order = np.argsort([len(s) for s in sequences], kind="stable")
    batches = [order[b:b + batch_size] for b in range(0, len(order), batch_size)]
    for n, batch in enumerate(tqdm(batches, desc="imagine episodes", unit="batch", disable=not show_progress,
                                   leave=False)):
        horizon = max(len(sequences[i]) for i in batch)
        acts = np.zeros((len(batch), horizon, sequences[batch[0]].shape[-1]), np.float32)
        for row, i in enumerate(batch):
            acts[row, :len(sequences[i])] = sequences[i]
        first = torch.from_numpy(np.stack([episodes[i].tokens[0].reshape(-1) for i in batch]).astype(np.int64))
        generator = torch.Generator(device=dynamics.device).manual_seed(seed + n)
        first_states = None
        if use_states:
            first_states = torch.from_numpy(np.stack([episodes[i].states_norm[0] for i in batch]))[:, None]
        rollout = Rollout(dynamics, first[:, None], None, method=method, steps=steps, temperature=temperature,
                          generator=generator, context_states=first_states)
        frames, states = [], []
        for t in range(horizon):
            frames.append(rollout.step(torch.from_numpy(acts[:, t])))
            if use_states:
                states.append(rollout.states[-1])
        frames = torch.stack(frames, 1).cpu().numpy().astype(np.int16)
        states = torch.stack(states, 1).cpu().numpy() if use_states else None
        for row, i in enumerate(batch):
            out[i] = frames[row, :len(sequences[i])]
            if use_states:
                out_states[i] = states[row, :len(sequences[i])]
    return out, out_states

