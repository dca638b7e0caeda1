"""Normalization statistics and the normalization modes (numpy only: safe to import at inference).

Per dataset, OpenVLA's `dataset_statistics.json` layout:

    {"<dataset name>": {
        "action":  {"mean": [7], "std": [7], "min": [7], "max": [7], "q01": [7], "q99": [7], "mask": [7 bools]},
        "proprio": {... the same for the 8-D state ...},
        "num_transitions": N, "num_trajectories": M}}

The mask marks the dimensions that are normalized (by default the first six action
dimensions; the gripper is left as is). Modes:

- BOUNDS_Q99 (default): clip(2 (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
- BOUNDS: the same with min and max
- NORMAL: (x - mean) / (std + 1e-8)

In the BOUNDS modes, dimensions whose min equals their max (unused dimensions) map to 0.
Un-normalizing inverts these where the mask is set: 0.5 (a + 1) (q99 - q01) + q01, etc.
"""
from __future__ import annotations

import hashlib
import json
import os
from enum import Enum
from pathlib import Path
from typing import Any, Mapping

import numpy as np

STATISTICS_FILENAME = "dataset_statistics.json"
EPS = 1e-8


class NormalizationMode(str, Enum):
    BOUNDS_Q99 = "bounds_q99"
    BOUNDS = "bounds"
    NORMAL = "normal"

    @classmethod
    def parse(cls, value: "str | NormalizationMode") -> "NormalizationMode":
        if isinstance(value, cls):
            return value
        try:
            return cls(str(value).lower())
        except ValueError:
            raise ValueError(f"unknown normalization {value!r}; valid: {', '.join(m.value for m in cls)}") from None


def summarize(values: np.ndarray, mask: np.ndarray | None = None) -> dict[str, list]:
    """mean, std, min, max, q01, q99 (and mask) per dimension of an (N, D) array."""
    values = np.asarray(values, dtype=np.float64)
    if values.ndim != 2 or len(values) == 0:
        raise ValueError(f"need a non-empty (N, D) array of values, got shape {values.shape}")
    mask = np.ones(values.shape[1], dtype=bool) if mask is None else np.asarray(mask, dtype=bool)
    return {"mean": values.mean(0).tolist(), "std": values.std(0).tolist(),
            "min": values.min(0).tolist(), "max": values.max(0).tolist(),
            "q01": np.quantile(values, 0.01, axis=0).tolist(), "q99": np.quantile(values, 0.99, axis=0).tolist(),
            "mask": mask.tolist()}


def compute_statistics(actions: np.ndarray, states: np.ndarray, num_trajectories: int,
                       action_mask=None, state_mask=None) -> dict[str, Any]:
    actions = np.asarray(actions)
    states = np.asarray(states)
    if action_mask is None:
        action_mask = [True] * (actions.shape[1] - 1) + [False]
    return {"action": summarize(actions, action_mask), "proprio": summarize(states, state_mask),
            "num_transitions": int(len(actions)), "num_trajectories": int(num_trajectories)}


def _arrays(entry: Mapping[str, Any]) -> dict[str, np.ndarray]:
    out = {k: np.asarray(v, dtype=np.float32) for k, v in entry.items() if k != "mask"}
    out["mask"] = np.asarray(entry.get("mask", [True] * len(entry["mean"])), dtype=bool)
    return out


def normalize(x: np.ndarray, entry: Mapping[str, Any], mode: str | NormalizationMode = "bounds_q99") -> np.ndarray:
    """Normalize values with one statistics entry (e.g. `stats["action"]`)."""
    mode = NormalizationMode.parse(mode)
    s = _arrays(entry)
    x = np.asarray(x, dtype=np.float32)
    if mode is NormalizationMode.NORMAL:
        return np.where(s["mask"], (x - s["mean"]) / (s["std"] + EPS), x).astype(np.float32)
    low, high = (s["q01"], s["q99"]) if mode is NormalizationMode.BOUNDS_Q99 else (s["min"], s["max"])
    out = np.where(s["mask"], np.clip(2 * (x - low) / (high - low + EPS) - 1, -1, 1), x)
    # a constant dimension maps to 0, except an unnormalized one (e.g. a gripper that never closes), which passes through
    return np.where((s["min"] == s["max"]) & s["mask"], 0.0, out).astype(np.float32)


def unnormalize(a: np.ndarray, entry: Mapping[str, Any], mode: str | NormalizationMode = "bounds_q99") -> np.ndarray:
    """Invert `normalize` on the masked dimensions (a policy's normalized outputs → actions)."""
    mode = NormalizationMode.parse(mode)
    s = _arrays(entry)
    a = np.asarray(a, dtype=np.float32)
    if mode is NormalizationMode.NORMAL:
        return np.where(s["mask"], a * (s["std"] + EPS) + s["mean"], a).astype(np.float32)
    low, high = (s["q01"], s["q99"]) if mode is NormalizationMode.BOUNDS_Q99 else (s["min"], s["max"])
    return np.where(s["mask"], 0.5 * (a + 1) * (high - low) + low, a).astype(np.float32)


def share_first_statistics(statistics: Mapping[str, Mapping[str, Any]]) -> dict[str, dict[str, Any]]:
    """Every dataset normalized with the first one's statistics (one robot, one scale, e.g. DAgger data beside
    its demonstrations): each keeps its own counts, which mixture weights may use, and its fingerprint."""
    first = next(iter(statistics.values()))
    own_keys = ("num_transitions", "num_trajectories", "fingerprint")
    return {name: {**first, **{k: own[k] for k in own_keys if k in own}} for name, own in statistics.items()}


# -- files and cache -------------------------------------------------------------------------------

def save_dataset_statistics(statistics: Mapping[str, Mapping[str, Any]], path: str | os.PathLike) -> Path:
    """Write {dataset name: statistics} as JSON; a directory gets `dataset_statistics.json`."""
    path = Path(path)
    if path.is_dir() or not path.suffix:
        path.mkdir(parents=True, exist_ok=True)
        path = path / STATISTICS_FILENAME
    path.write_text(json.dumps(statistics, indent=2))
    return path


def load_dataset_statistics(path: str | os.PathLike) -> dict[str, dict[str, Any]]:
    path = Path(path)
    if path.is_dir():
        path = path / STATISTICS_FILENAME
    if not path.exists():
        raise FileNotFoundError(f"no dataset statistics at {path}")
    return json.loads(path.read_text())


def fingerprint(payload: Mapping[str, Any]) -> str:
    """A stable hash of a JSON-able description of a dataset (name, splits, features, transform)."""
    blob = json.dumps(payload, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def default_cache_dir() -> Path:
    root = os.environ.get("EMBODIED_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "embodied")
    return Path(root) / "dataset_statistics"


class StatisticsCache:
    """JSON files named `<dataset>_<fingerprint>.json` in a cache directory."""

    def __init__(self, directory: str | os.PathLike | None = None):
        self.directory = Path(directory) if directory else default_cache_dir()

    def path(self, name: str, key: str) -> Path:
        return self.directory / f"{name}_{key}.json"

    def get(self, name: str, key: str) -> dict | None:
        path = self.path(name, key)
        if path.exists():
            try:
                return json.loads(path.read_text())
            except json.JSONDecodeError:
                return None  # a torn write; recompute
        return None

    def put(self, name: str, key: str, stats: Mapping[str, Any]) -> Path:
        self.directory.mkdir(parents=True, exist_ok=True)
        path = self.path(name, key)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(stats, indent=2))
        tmp.replace(path)
        return path
