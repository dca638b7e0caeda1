"""Success detector: P(the task is complete in this frame), from the frame's tokens (and, for a world
model that imagines the robot state, that imagined state: where the gripper is and how far it is
closed). With `reference_frame` it also reads the tokens of the episode's first, real frame, where the
scene (the target, the button, the cube) is seen as it is, not as the world model redraws it.

It judges what the world model imagines, so it is trained on imagined frames, not real ones:
every training episode is replayed open-loop in the world model from its first real frame with
its own actions (the evaluation protocol, `imagine_episodes`), and the imagined frame after
action t is labelled with the sim suite's reward for action t (1 exactly when that action
reached the task's success predicate). Real frames could not serve: an RLDS episode ends with
the action that succeeds, so the successful state itself is never recorded.

An imagined episode succeeds at the first frame whose score passes the threshold. Since that is a
decision over a whole episode (a per-step false-positive rate p over T steps makes ~pT false
successes), the threshold is chosen at the episode level, on episodes held out from the
detector's training (`calibrate_episode_threshold`).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from worldmodel.pretrained import PretrainedMixin


@dataclass
class SuccessDetectorConfig:
    codebook_size: int = 1000
    grid: int = 16
    embed_dim: int = 32
    channels: int = 64
    threshold: float = 0.5
    state_dim: int = 0  # > 0: also reads the imagined (normalized) robot state of the frame
    reference_frame: bool = False  # also reads the episode's first real frame, stacked on the frame's channels
    # each cell also reads its coordinates, their products with the imagined state (so that a linear layer can
    # compare the cell with where the gripper is in the image) and the state, and the cells are max- as well as
    # mean-pooled: convolutions pooled over the grid cannot tell where anything is, so without this the
    # detector cannot compare where the gripper is with where the target is
    spatial_state: bool = False
    # how the imagined frames it was trained on were decoded; judge rollouts decoded the same way
    rollout_method: str = "maskgit"
    rollout_steps: int = 4


class SuccessDetector(PretrainedMixin, nn.Module):
    config_class = SuccessDetectorConfig
    model_type = "embodied-success-detector"

    def __init__(self, config: SuccessDetectorConfig | None = None):
        super().__init__()
        self.config = cfg = config or SuccessDetectorConfig()
        self.embed = nn.Embedding(cfg.codebook_size, cfg.embed_dim)
        c = cfg.channels
        inputs = cfg.embed_dim * (2 if cfg.reference_frame else 1)
        if cfg.spatial_state:
            if not cfg.state_dim:
                raise ValueError("spatial_state=true needs a detector that reads the robot state (state_dim > 0)")
            inputs += 2 + 2 * cfg.state_dim + c  # the cell's coordinates, their products with the state, the state
        self.conv = nn.Sequential(nn.Conv2d(inputs, c, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(c, c, 3, stride=2, padding=1), nn.SiLU(),
                                  nn.Conv2d(c, c, 3, padding=1), nn.SiLU())
        if cfg.state_dim:
            self.state_proj = nn.Sequential(nn.Linear(cfg.state_dim, c), nn.SiLU())
        pooled = c * (2 if cfg.spatial_state else 1)
        self.head = nn.Sequential(nn.Linear(pooled + (c if cfg.state_dim else 0), c), nn.SiLU(), nn.Linear(c, 1))

    def forward(self, tokens: torch.Tensor, states: torch.Tensor | None = None,
                references: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, g, g) or (B, g*g) (and states (B, S), references (B, g*g): each frame's episode's first
        real frame, when the detector reads them) → logits (B,)."""
        g = self.config.grid
        x = self.embed(tokens.reshape(-1, g, g).long())
        if self.config.reference_frame:
            if references is None or references.numel() != tokens.numel():
                raise ValueError("this success detector reads each frame's reference frame (reference_frame=true): "
                                 f"give references of shape {tuple(tokens.shape)}, got "
                                 f"{None if references is None else tuple(references.shape)}")
            x = torch.cat([x, self.embed(references.reshape(-1, g, g).long())], -1)
        state = None
        if self.config.state_dim:
            if states is None or states.shape[-1] != self.config.state_dim:
                raise ValueError(f"this success detector reads the robot state (state_dim={self.config.state_dim}); "
                                 f"got {None if states is None else tuple(states.shape)}")
            states = states.float()
            state = self.state_proj(states)
        if self.config.spatial_state:
            axis = torch.linspace(-1, 1, g, device=x.device)
            xy = torch.stack(torch.meshgrid(axis, axis, indexing="ij"), -1)  # each cell's coordinates, in [-1, 1]
            products = (xy[None, :, :, :, None] * states[:, None, None, None, :]).flatten(3)
            x = torch.cat([x, xy.expand(len(x), g, g, 2), products, state[:, None, None, :].expand(-1, g, g, -1)], -1)
        maps = self.conv(x.permute(0, 3, 1, 2))
        features = maps.mean((2, 3))
        if self.config.spatial_state:
            features = torch.cat([features, maps.amax((2, 3))], -1)
        if state is not None:
            features = torch.cat([features, state], -1)
        return self.head(features).squeeze(-1)

    @torch.no_grad()
    def scores(self, tokens: torch.Tensor | np.ndarray, states: torch.Tensor | np.ndarray | None = None,
               references: torch.Tensor | np.ndarray | None = None, batch: int = 1024) -> np.ndarray:
        """P(task complete) of each frame (N, g*g) (with its state (N, S) and reference frame (N, g*g)), in
        batches."""
        tokens = torch.as_tensor(tokens)
        states = None if states is None or not self.config.state_dim else torch.as_tensor(states)
        references = None if references is None or not self.config.reference_frame else torch.as_tensor(references)
        device = self.head[-1].weight.device
        part = lambda x, i: None if x is None else x[i:i + batch].to(device)  # noqa: E731
        out = [torch.sigmoid(self(tokens[i:i + batch].to(device), part(states, i), part(references, i))).cpu().numpy()
               for i in range(0, len(tokens), batch)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    @torch.no_grad()
    def predict(self, tokens: torch.Tensor, states: torch.Tensor | None = None,
                references: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self(tokens, states if self.config.state_dim else None,
                                  references if self.config.reference_frame else None)) > self.config.threshold

    def loss(self, tokens, labels, pos_weight: float = 1.0, states=None, references=None):
        logits = self(tokens, states, references)
        loss = F.binary_cross_entropy_with_logits(logits, labels.float(),
                                                  pos_weight=torch.tensor(pos_weight, device=logits.device))
        return loss, {"loss": loss.item()}


def frame_references(episode_references: list[np.ndarray], episode_tokens: list[np.ndarray]) -> np.ndarray:
    """Each frame's reference (its episode's first real frame's tokens), (N, g*g) for the N frames."""
    return np.concatenate([np.repeat(np.asarray(r).reshape(1, -1), len(t), 0)
                           for r, t in zip(episode_references, episode_tokens)])


def episode_scores(detector: SuccessDetector, episode_tokens: list[np.ndarray],
                   episode_states: list[np.ndarray] | None = None,
                   episode_references: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """The detector's score of every frame, one array per episode (scored in one batched pass).

    `episode_references`: each episode's first real frame's tokens (g*g,), for a detector that reads them."""
    if not episode_tokens:
        return []
    states = np.concatenate(episode_states) if detector.config.state_dim else None
    references = None
    if detector.config.reference_frame:
        if episode_references is None or len(episode_references) != len(episode_tokens):
            raise ValueError("this success detector reads each episode's first real frame: give episode_references, "
                             f"one per episode ({len(episode_tokens)})")
        references = frame_references(episode_references, episode_tokens)
    scores = detector.scores(np.concatenate(episode_tokens), states, references)
    return np.split(scores, np.cumsum([len(t) for t in episode_tokens])[:-1])


def calibrate_episode_threshold(detector: SuccessDetector, episode_tokens: list[np.ndarray],
                                successes: np.ndarray, episode_states: list[np.ndarray] | None = None,
                                episode_references: list[np.ndarray] | None = None) -> float:
    """Set (and return) the threshold that best separates successful from failed episodes.

    An episode counts as a success when any of its frames scores above the threshold, so the
    decision depends only on each episode's highest score; the threshold maximizes balanced
    accuracy over the given episodes (midway between neighbouring scores; 0.5 if they are all
    of one class).
    """
    successes = np.asarray(successes, bool)
    if len(episode_tokens) != len(successes):
        raise ValueError(f"{len(episode_tokens)} episodes but {len(successes)} success labels")
    best = np.array([s.max() if len(s) else 0.0
                     for s in episode_scores(detector, episode_tokens, episode_states, episode_references)])
    threshold = 0.5
    if successes.any() and (~successes).any():
        candidates = np.unique(best)
        cuts = np.concatenate([[candidates[0] - 1e-6], (candidates[:-1] + candidates[1:]) / 2])
        balanced = [(best[successes] > c).mean() + (best[~successes] <= c).mean() for c in cuts]
        threshold = float(cuts[int(np.argmax(balanced))])
    detector.config.threshold = float(np.clip(threshold, 1e-6, 1.0 - 1e-6))
    return detector.config.threshold


def episode_metrics(detector: SuccessDetector, episode_tokens: list[np.ndarray], episode_labels: list[np.ndarray],
                    episode_states: list[np.ndarray] | None = None,
                    episode_references: list[np.ndarray] | None = None) -> dict[str, float]:
    """Per-frame and per-episode figures of a detector on imagined episodes (labels: reward > 0 per frame)."""
    if not episode_tokens:
        return {}
    fires = [s > detector.config.threshold
             for s in episode_scores(detector, episode_tokens, episode_states, episode_references)]
    frames = classification_metrics(np.concatenate(fires), np.concatenate(episode_labels))
    episodes = classification_metrics(np.array([f.any() for f in fires]), np.array([y.any() for y in episode_labels]))
    return {**{f"frame_{k}": v for k, v in frames.items()}, **{f"episode_{k}": v for k, v in episodes.items()}}


def classification_metrics(predicted: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    predicted, labels = np.asarray(predicted, bool), np.asarray(labels, bool)
    tp = int((predicted & labels).sum())
    tn = int((~predicted & ~labels).sum())
    fp = int((predicted & ~labels).sum())
    fn = int((~predicted & labels).sum())
    recall = tp / max(tp + fn, 1)
    specificity = tn / max(tn + fp, 1)
    return {"accuracy": (tp + tn) / max(len(labels), 1), "balanced_accuracy": (recall + specificity) / 2,
            "recall": recall, "precision": tp / max(tp + fp, 1), "positives": int(labels.sum()),
            "samples": int(len(labels))}
