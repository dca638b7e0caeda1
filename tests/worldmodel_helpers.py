"""Shared pieces of the world-model tests: the tiny tokenizer config, real rendered sim episodes and a
quickly trained tokenizer (the fixtures `sim_episodes` and `trained_tokenizer` in conftest.py)."""
from __future__ import annotations

import numpy as np
import torch

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
