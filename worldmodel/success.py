"""Success detector: P(the action taken from this frame completes the task), from frame tokens.

Trained on the sim suite's own labels: in the platform's RLDS episodes, step t has reward 1
exactly when action t reached the task's success predicate. The detector sees what the
world model imagines (the frame's tokens) plus the (normalized) action, so `ImaginedEnv` can
judge success without pixels or privileged state. Positives are rare (one per successful
episode), so the loss weights them by the class ratio and the reported figure is balanced
accuracy alongside plain accuracy.
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
    action_dim: int = 7
    embed_dim: int = 32
    channels: int = 64
    threshold: float = 0.5


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
        self.head = nn.Sequential(nn.Linear(c + cfg.action_dim, c), nn.SiLU(), nn.Linear(c, 1))

    def forward(self, tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        """tokens (B, g, g) or (B, g*g), normalized actions (B, A) → logits (B,)."""
        g = self.config.grid
        x = self.embed(tokens.reshape(-1, g, g).long()).permute(0, 3, 1, 2)
        x = self.conv(x).mean((2, 3))
        return self.head(torch.cat([x, actions.float()], -1)).squeeze(-1)

    @torch.no_grad()
    def predict(self, tokens: torch.Tensor, actions: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self(tokens, actions)) > self.config.threshold

    def loss(self, tokens, actions, labels, pos_weight: float = 1.0):
        logits = self(tokens, actions)
        loss = F.binary_cross_entropy_with_logits(logits, labels.float(),
                                                  pos_weight=torch.tensor(pos_weight, device=logits.device))
        return loss, {"loss": loss.item()}


@torch.no_grad()
def calibrate_threshold(detector: SuccessDetector, tokens: np.ndarray, actions: np.ndarray, labels: np.ndarray,
                        max_false_positive_rate: float, batch: int = 512) -> float:
    """Set (and return) the decision threshold so that at most `max_false_positive_rate` of the negative
    steps fire (never below 0.5).

    An imagined episode succeeds when any of its steps fires, so over T steps a per-step false-positive
    rate p gives about 1 - (1 - p)^T false successes: the class-balanced training loss alone (threshold
    0.5) makes long failing episodes look successful, and ranks policies backwards.
    """
    scores = np.concatenate([torch.sigmoid(detector(torch.from_numpy(tokens[i:i + batch]),
                                                    torch.from_numpy(actions[i:i + batch]))).numpy()
                             for i in range(0, len(tokens), batch)])
    negatives = scores[~labels.astype(bool)]
    threshold = 0.5
    if len(negatives):
        threshold = max(0.5, float(np.quantile(negatives, 1.0 - max_false_positive_rate)))
    detector.config.threshold = min(threshold, 1.0 - 1e-6)
    return detector.config.threshold


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
