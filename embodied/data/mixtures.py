"""Named dataset mixtures: (dataset name, sampling weight) lists.

The OXE weights are published facts from OpenVLA's `prismatic/vla/datasets/rlds/oxe/mixtures.py`
("oxe_magic_soup", the mixture OpenVLA was trained on), restricted to the datasets this
platform registers. OpenVLA names Bridge V2 `bridge_orig`; its tfds name is `bridge_dataset`.
With `balance_weights=True` a dataset's weight is multiplied by its frame count before
normalizing (OpenVLA's behaviour), so weights become per-frame rates.
"""
from __future__ import annotations

from typing import Iterable, Sequence

import numpy as np

from embodied.data.errors import UnknownDatasetError

MIXTURES: dict[str, list[tuple[str, float]]] = {
    # OpenVLA "oxe_magic_soup" weights, for the registered OXE datasets.
    "oxe_magic_soup_subset": [
        ("fractal20220817_data", 0.54087122203),
        ("kuka", 0.8341046294),
        ("bridge_dataset", 1.0),
        ("taco_play", 2.0),
        ("jaco_play", 1.0),
        ("berkeley_autolab_ur5", 2.0),
        ("language_table", 0.1),
    ],
    # OpenVLA "bridge_rt_1".
    "bridge_rt_1": [("bridge_dataset", 1.0), ("fractal20220817_data", 1.0)],
    "bridge": [("bridge_dataset", 1.0)],
    "fractal": [("fractal20220817_data", 1.0)],
    # The platform's simulated demonstrations from both physics engines.
    "sim_tabletop10": [("embodied_tabletop10_mujoco", 1.0), ("embodied_tabletop10_pybullet", 1.0)],
    "sim_tabletop10_mujoco": [("embodied_tabletop10_mujoco", 1.0)],
    "sim_tabletop10_pybullet": [("embodied_tabletop10_pybullet", 1.0)],
}


def get_mixture(name: str) -> list[tuple[str, float]]:
    if name not in MIXTURES:
        raise UnknownDatasetError(name, MIXTURES, kind="mixture")
    return list(MIXTURES[name])


def parse_datasets(datasets) -> list[tuple[str, float]]:
    """A mixture name, one dataset name, or a list of names / (name, weight) / {name, weight} entries."""
    if isinstance(datasets, str):
        return get_mixture(datasets) if datasets in MIXTURES else [(datasets, 1.0)]
    out = []
    for entry in datasets:
        if isinstance(entry, str):
            out.append((entry, 1.0))
        elif hasattr(entry, "keys"):
            out.append((str(entry["name"]), float(entry.get("weight", 1.0))))
        else:
            name, weight = entry
            out.append((str(name), float(weight)))
    if not out:
        raise ValueError("no datasets given")
    for name, weight in out:
        if not weight > 0:
            raise ValueError(f"dataset {name!r} has weight {weight}; weights must be > 0")
    return out


def sampling_weights(weights: Sequence[float], num_frames: Iterable[int] | None = None,
                     balance: bool = False) -> np.ndarray:
    """Normalized sampling probabilities, optionally multiplied by each dataset's frame count."""
    w = np.asarray(weights, dtype=np.float64)
    if balance:
        if num_frames is None:
            raise ValueError("balance=True needs the datasets' frame counts")
        w = w * np.asarray(list(num_frames), dtype=np.float64)
    if w.sum() <= 0:
        raise ValueError(f"sampling weights sum to {w.sum()}")
    return w / w.sum()
