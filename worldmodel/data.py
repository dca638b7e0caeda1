"""Episodes for world-model training, read through the data engine (`embodied.data`).

The world model trains on whole clips, not shuffled frames, so episodes are read once with
`RLDSSource.episodes` (standardized to the platform's observation/action layout, images
resized), actions normalized with each dataset's q01/q99 statistics (BOUNDS_Q99, gripper
untouched), robot states with its mean/std (NORMAL: imagined states may leave the recorded range,
which q01/q99 bounds would clip), and kept in memory; laptop-sized datasets (a few thousand 64×64 frames) fit easily.
Per-step success labels come from the RLDS `reward` (> 0 on the step whose action completes
the task).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
from tqdm.auto import tqdm


@dataclass
class Episode:
    dataset: str
    images: np.ndarray  # (T, S, S, 3) uint8; image t is the one action t was taken from
    actions: np.ndarray  # (T, 7) float32, raw (environment units)
    actions_norm: np.ndarray  # (T, 7) float32, normalized with the dataset's statistics
    rewards: np.ndarray  # (T,) float32
    instruction: str
    tokens: np.ndarray | None = None  # (T, g, g) int16, filled once the tokenizer is trained
    states: np.ndarray | None = None  # (T, S) float32, raw: state t is the one image t shows
    states_norm: np.ndarray | None = None  # (T, S) float32, normalized (mean/std)

    def __len__(self) -> int:
        return len(self.actions)


def _rewards(source) -> list[np.ndarray]:
    """Per-episode rewards in the order `source.episodes()` yields (same records, same length filter)."""
    import tensorflow_datasets as tfds

    from embodied.data.reader import _iterate

    features, spec = source.features, source.spec

    def parse(record):
        return features.deserialize_example(record, decoders={"steps": tfds.decode.SkipDecoding()})["steps"]["reward"]

    rewards = [np.asarray(r, np.float32) for r in _iterate(source.records().map(parse), source.report)]
    return [r for r in rewards if len(r) >= spec.min_steps]


def load_episodes(datasets, data_dir: str | os.PathLike | None = None, split: str = "train", image_size: int = 64,
                  spec: str | None = None, statistics: dict | None = None, max_episodes: int | None = None,
                  show_progress: bool = True, fallback_statistics: dict | None = None,
                  shared_statistics: bool = False) -> tuple[list[Episode], dict[str, dict], dict[str, float]]:
    """(episodes, {dataset: statistics}, {dataset: sampling weight}) of a dataset, list or mixture.

    A dataset's statistics come from `statistics` (by name), else `fallback_statistics` (e.g. a world
    model's own, for held-out data it must see as it will at inference), else its own.
    `shared_statistics` then normalizes every dataset with the first one's (`data.shared_statistics`)."""
    from embodied.data import RLDSSource, normalize, share_first_statistics
    from embodied.data.mixtures import parse_datasets

    sources, stats_out, weights = [], {}, {}
    for name, weight in parse_datasets(datasets):
        source = RLDSSource(name, data_dir, split, spec=spec)
        sources.append(source)
        stats_out[source.name] = ((statistics or {}).get(source.name) or fallback_statistics
                                  or source.statistics(show_progress=show_progress))
        weights[source.name] = float(weight)
    if shared_statistics:
        stats_out = share_first_statistics(stats_out)
    episodes: list[Episode] = []
    for source in sources:
        stats = stats_out[source.name]
        rewards = _rewards(source)
        total = min(source.num_episodes, max_episodes or source.num_episodes)
        bar = tqdm(total=total, desc=f"read {source.name} ({split})", unit="ep", disable=not show_progress,
                   leave=False)
        for i, traj in enumerate(source.episodes(image_size=image_size)):
            if max_episodes is not None and i >= max_episodes:
                break
            actions = np.asarray(traj["action"], np.float32)
            if len(rewards[i]) != len(actions):
                raise ValueError(f"dataset {source.name!r} episode {i}: {len(rewards[i])} rewards for "
                                 f"{len(actions)} actions")
            states = np.asarray(traj["state"], np.float32)
            episodes.append(Episode(source.name, np.asarray(traj["image"], np.uint8), actions,
                                    normalize(actions, stats["action"], "bounds_q99"), rewards[i],
                                    traj["instruction"][0] if len(traj["instruction"]) else "", None, states,
                                    normalize(states, stats["proprio"], "normal")))
            bar.update(1)
        bar.close()
    if not episodes:
        raise ValueError(f"no episodes read from {datasets!r} (split {split!r})")
    return episodes, stats_out, weights


class ClipSampler:
    """Random clips of `length` consecutive frames (tokens + normalized actions), datasets by weight."""

    def __init__(self, episodes: list[Episode], length: int, weights: dict[str, float] | None = None):
        usable = [e for e in episodes if len(e) >= 2 and e.tokens is not None]
        if not usable:
            raise ValueError("no tokenized episode with at least 2 frames to sample clips from")
        self.length = length
        self.by_dataset: dict[str, list[Episode]] = {}
        for e in usable:
            self.by_dataset.setdefault(e.dataset, []).append(e)
        names = list(self.by_dataset)
        w = np.array([(weights or {}).get(n, 1.0) for n in names], np.float64)
        self.names, self.probs = names, w / w.sum()

    def sample(self, batch_size: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray | None]:
        """tokens (B, L, g*g) int64, actions (B, L, 7) and normalized states (B, L, S) float32 (None if the
        episodes have none); short episodes repeat their last frame."""
        tokens, actions, states = [], [], []
        for _ in range(batch_size):
            pool = self.by_dataset[self.names[rng.choice(len(self.names), p=self.probs)]]
            ep = pool[rng.integers(len(pool))]
            start = int(rng.integers(0, max(1, len(ep) - self.length + 1)))
            idx = np.minimum(np.arange(start, start + self.length), len(ep) - 1)
            tokens.append(ep.tokens[idx].reshape(self.length, -1))
            actions.append(ep.actions_norm[idx])
            states.append(None if ep.states_norm is None else ep.states_norm[idx])
        states_out = None if any(x is None for x in states) else np.stack(states).astype(np.float32)
        return np.stack(tokens).astype(np.int64), np.stack(actions).astype(np.float32), states_out


def all_frames(episodes: list[Episode]) -> np.ndarray:
    return np.concatenate([e.images for e in episodes])
