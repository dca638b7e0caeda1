"""Actions as LLM tokens, OpenVLA's scheme: 256 uniform bins over [-1, 1] on the last 256 vocabulary ids.

Normalized actions (BOUNDS_Q99, see `embodied.data.statistics`) are clipped to [-1, 1] and
binned with `np.digitize` against `np.linspace(-1, 1, 256)` edges (bin numbers 1..256). Bin b
becomes token id `vocab_size - b`, so the 256 action tokens overwrite the last 256 ids of the
text vocabulary. Decoding maps an id back to the centre of its bin (255 centres; the top bin,
reached only by exactly 1.0, shares the last centre), so the round-trip error is at most half
a bin width, 1/255.
"""
from __future__ import annotations

import numpy as np
import torch


class ActionTokenizer:
    def __init__(self, vocab_size: int, n_bins: int = 256, low: float = -1.0, high: float = 1.0):
        if vocab_size <= n_bins:
            raise ValueError(f"vocabulary of {vocab_size} ids cannot hold {n_bins} action tokens")
        self.vocab_size = int(vocab_size)
        self.n_bins = int(n_bins)
        self.low, self.high = float(low), float(high)
        self.bins = np.linspace(low, high, n_bins)
        self.bin_centers = ((self.bins[:-1] + self.bins[1:]) / 2.0).astype(np.float32)
        self._centers_t: torch.Tensor | None = None

    @property
    def first_id(self) -> int:
        """The smallest action token id; action ids are `first_id .. vocab_size - 1`."""
        return self.vocab_size - self.n_bins

    @property
    def bin_width(self) -> float:
        return (self.high - self.low) / (self.n_bins - 1)

    def encode(self, normalized: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Normalized actions (..., D) → token ids (..., D), int64 (torch in, torch out)."""
        if isinstance(normalized, torch.Tensor):
            # float64 like numpy, so that values on a bin edge land in the same bin on both paths
            clipped = normalized.detach().double().clamp(self.low, self.high)
            edges = torch.as_tensor(self.bins, dtype=torch.float64, device=clipped.device)
            # torch.bucketize(right=True) gives np.digitize's bin numbers (1..n_bins)
            return self.vocab_size - torch.bucketize(clipped, edges, right=True).long()
        clipped = np.clip(np.asarray(normalized, dtype=np.float64), self.low, self.high)
        return (self.vocab_size - np.digitize(clipped, self.bins)).astype(np.int64)

    def decode(self, token_ids: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
        """Token ids (..., D) → bin centres (..., D), float32 normalized actions."""
        if isinstance(token_ids, torch.Tensor):
            if self._centers_t is None or self._centers_t.device != token_ids.device:
                self._centers_t = torch.as_tensor(self.bin_centers, device=token_ids.device)
            index = (self.vocab_size - token_ids.long() - 1).clamp(0, self.n_bins - 2)
            return self._centers_t[index]
        index = np.clip(self.vocab_size - np.asarray(token_ids, dtype=np.int64) - 1, 0, self.n_bins - 2)
        return self.bin_centers[index]

    def is_action_token(self, token_ids):
        return (token_ids >= self.first_id) & (token_ids < self.vocab_size)

    def logits_to_bins(self, logits: torch.Tensor) -> torch.Tensor:
        """The action-token slice of LM logits (..., vocab) → (..., n_bins), index i = id first_id + i."""
        return logits[..., self.first_id:self.vocab_size]
