"""Shared pieces of the world-model tests: the tiny tokenizer config, real rendered sim episodes and a
quickly trained tokenizer (the fixtures `sim_episodes` and `trained_tokenizer` in conftest.py)."""
from __future__ import annotations

import numpy as np
import torch

from worldmodel.dynamics import DynamicsConfig, DynamicsModel
from worldmodel.model import WorldModel
from worldmodel.success import SuccessDetector, SuccessDetectorConfig
from worldmodel.tokenizer import FrameTokenizer, TokenizerConfig

SIZE = 32
TOK = TokenizerConfig(image_size=SIZE, downsample=4, levels=(5, 4, 4), channels=8, res_blocks=1)
# what a dynamics or latent action model config records of the tokenizer (TOK) whose tokens it reads
TOK_FIELDS = dict(codebook_size=TOK.codebook_size, grid=TOK.grid, tokenizer_image_size=SIZE,
                  tokenizer_levels=TOK.levels)


def render_sim_episodes(task: str = "PressButton", seeds=range(3), steps: int = 10):
    """Short scripted-expert episodes of real PyBullet frames (SIZE×SIZE): [(images, actions, states)]."""
    import envs

    env = envs.make_env(task, backend="pybullet", image_size=SIZE)
    episodes = []
    try:
        for seed in seeds:
            obs, _ = env.reset(seed=seed)
            images, actions, states = [obs["image"]], [], [obs["state"]]
            for _ in range(steps):
                action = env.unwrapped.expert_action().astype(np.float32)
                obs, _, terminated, truncated, _ = env.step(action)
                actions.append(action)
                images.append(obs["image"])
                states.append(obs["state"])
                if terminated or truncated:
                    break
            episodes.append((np.stack(images), np.stack(actions), np.stack(states)))
    finally:
        env.close()
    return episodes


def train_tokenizer(frames: np.ndarray, steps: int = 120) -> FrameTokenizer:
    """The tiny tokenizer (TOK) fitted to the given frames, single-threaded."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        torch.manual_seed(0)
        tok = FrameTokenizer(TOK)
        opt = torch.optim.Adam(tok.parameters(), lr=3e-3)
        rng = np.random.default_rng(0)
        for _ in range(steps):
            loss, _ = tok.loss(frames[rng.integers(0, len(frames), 16)])
            opt.zero_grad()
            loss.backward()
            opt.step()
    finally:
        torch.set_num_threads(before)
    return tok.eval()


def dyn_config(**kw) -> DynamicsConfig:
    """The tiny dynamics config for TOK's tokens (4-frame context)."""
    return DynamicsConfig(**{**TOK_FIELDS, "max_frames": 4, "dim": 32, "depth": 1, "heads": 2, "mlp_ratio": 2.0, **kw})


def tiny_world(tokenizer=None, state_dim: int = 0, reference_frame: bool = False,
               spatial_state: bool = False) -> WorldModel:
    """A small untrained world model on the tiny tokenizer (TOK), with action and state statistics."""
    tok = tokenizer or FrameTokenizer(TOK)
    det = SuccessDetector(SuccessDetectorConfig(codebook_size=TOK.codebook_size, grid=TOK.grid, embed_dim=4,
                                                channels=8, state_dim=state_dim, reference_frame=reference_frame,
                                                spatial_state=spatial_state))
    stats = {"sim": {"action": {"q01": [-0.05] * 6 + [0.0], "q99": [0.05] * 6 + [1.0], "min": [-0.05] * 6 + [0.0],
                                "max": [0.05] * 6 + [1.0], "mean": [0.0] * 7, "std": [1.0] * 7,
                                "mask": [True] * 6 + [False]},
                     "proprio": {"mean": [0.5, 0.0, 0.2, 0, 0, 0, 0, 0.5], "std": [0.1] * 8, "q01": [-1] * 8,
                                 "q99": [1] * 8, "min": [-1] * 8, "max": [1] * 8}}}
    return WorldModel(tok, DynamicsModel(dyn_config(state_dim=state_dim)), det, stats)
