"""Success detector: P(the task is complete in this frame), from the frame's tokens (and, for a world
model that imagines the robot state, that imagined state: where the gripper is and how far it is
closed).

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
        self.conv = nn.Sequential(nn.Conv2d(cfg.embed_dim, c, 3, padding=1), nn.SiLU(),
                                  nn.Conv2d(c, c, 3, stride=2, padding=1), nn.SiLU(),
                                  nn.Conv2d(c, c, 3, padding=1), nn.SiLU())
        if cfg.state_dim:
            self.state_proj = nn.Sequential(nn.Linear(cfg.state_dim, c), nn.SiLU())
        self.head = nn.Sequential(nn.Linear(c * (2 if cfg.state_dim else 1), c), nn.SiLU(), nn.Linear(c, 1))

    def forward(self, tokens: torch.Tensor, states: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, g, g) or (B, g*g) (and states (B, S) when the detector reads them) → logits (B,)."""
        g = self.config.grid
        x = self.embed(tokens.reshape(-1, g, g).long()).permute(0, 3, 1, 2)
        features = self.conv(x).mean((2, 3))
        if self.config.state_dim:
            if states is None or states.shape[-1] != self.config.state_dim:
                raise ValueError(f"this success detector reads the robot state (state_dim={self.config.state_dim}); "
                                 f"got {None if states is None else tuple(states.shape)}")
            features = torch.cat([features, self.state_proj(states.float())], -1)
        return self.head(features).squeeze(-1)

    @torch.no_grad()
    def scores(self, tokens: torch.Tensor | np.ndarray, states: torch.Tensor | np.ndarray | None = None,
               batch: int = 1024) -> np.ndarray:
        """P(task complete) of each frame (N, g*g) (with its state (N, S)), in batches."""
        tokens = torch.as_tensor(tokens)
        states = None if states is None or not self.config.state_dim else torch.as_tensor(states)
        device = self.head[-1].weight.device
        out = [torch.sigmoid(self(tokens[i:i + batch].to(device),
                                  None if states is None else states[i:i + batch].to(device))).cpu().numpy()
               for i in range(0, len(tokens), batch)]
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    @torch.no_grad()
    def predict(self, tokens: torch.Tensor, states: torch.Tensor | None = None) -> torch.Tensor:
        return torch.sigmoid(self(tokens, states if self.config.state_dim else None)) > self.config.threshold

    def loss(self, tokens, labels, pos_weight: float = 1.0, states=None):
        logits = self(tokens, states)
        loss = F.binary_cross_entropy_with_logits(logits, labels.float(),
                                                  pos_weight=torch.tensor(pos_weight, device=logits.device))
        return loss, {"loss": loss.item()}


def episode_scores(detector: SuccessDetector, episode_tokens: list[np.ndarray],
                   episode_states: list[np.ndarray] | None = None) -> list[np.ndarray]:
    """The detector's score of every frame, one array per episode (scored in one batched pass)."""
    if not episode_tokens:
        return []
    states = np.concatenate(episode_states) if detector.config.state_dim else None
    scores = detector.scores(np.concatenate(episode_tokens), states)
    return np.split(scores, np.cumsum([len(t) for t in episode_tokens])[:-1])


def calibrate_episode_threshold(detector: SuccessDetector, episode_tokens: list[np.ndarray],
                                successes: np.ndarray, episode_states: list[np.ndarray] | None = None) -> float:
    """Set (and return) the threshold that best separates successful from failed episodes.

    An episode counts as a success when any of its frames scores above the threshold, so the
    decision depends only on each episode's highest score; the threshold maximizes balanced
    accuracy over the given episodes (midway between neighbouring scores; 0.5 if they are all
    of one class).
    """
    successes = np.asarray(successes, bool)
    if len(episode_tokens) != len(successes):
        raise ValueError(f"{len(episode_tokens)} episodes but {len(successes)} success labels")
    best = np.array([s.max() if len(s) else 0.0 for s in episode_scores(detector, episode_tokens, episode_states)])
    threshold = 0.5
    if successes.any() and (~successes).any():
        candidates = np.unique(best)
        cuts = np.concatenate([[candidates[0] - 1e-6], (candidates[:-1] + candidates[1:]) / 2])
        balanced = [(best[successes] > c).mean() + (best[~successes] <= c).mean() for c in cuts]
        threshold = float(cuts[int(np.argmax(balanced))])
    detector.config.threshold = float(np.clip(threshold, 1e-6, 1.0 - 1e-6))
    return detector.config.threshold


def episode_metrics(detector: SuccessDetector, episode_tokens: list[np.ndarray], episode_labels: list[np.ndarray],
                    episode_states: list[np.ndarray] | None = None) -> dict[str, float]:
    """Per-frame and per-episode figures of a detector on imagined episodes (labels: reward > 0 per frame)."""
    if not episode_tokens:
        return {}
    fires = [s > detector.config.threshold for s in episode_scores(detector, episode_tokens, episode_states)]
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
