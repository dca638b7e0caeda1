"""The data engine: RLDS datasets (Open X-Embodiment layout) in, torch batches out.

Public API (stable; other packages use only these names):

Reading (tensorflow-datasets → torch)
    RLDSDataset(config=None, **overrides)       torch IterableDataset of ready batches from a (mixture of)
                                                RLDS dataset(s). Batches are dicts: image uint8 (B,H,W,3),
                                                [wrist_image], state float32 (B,8), action float32 (B,7) or
                                                (B,K,7) plus action_mask bool (B,K) with action_chunk=K,
                                                instruction list[str], dataset_name list[str], timestep,
                                                dataset_index. Attributes: statistics {name: stats},
                                                names, weights, skipped_records; save_statistics(dir).
    DataConfig                                  every loader option (see reader.py; Hydra group `data`).
    make_dataloader(config, num_workers=0)      DataLoader(RLDSDataset, batch_size=None); tf.data already
                                                reads, decodes and batches in parallel threads.
    RLDSSource(dataset, data_dir=None, split="train", spec=None, wrist_image=False,
               skip_bad_records=False)          one dataset: episodes() → standardized numpy episodes
                                                (image/wrist_image (T,H,W,3), state (T,8), action (T,7),
                                                instruction list), trajectories() (tf.data), statistics().
    resolve_builder_dir(dataset, data_dir)      `path` or `name[:version]` under data_dir → builder dir
    resolve_split(splits, split)                "train"/"val" → "train[:95%]"/"train[95%:]" without a
                                                validation split
    BadRecordReport                             shards that came up short and records skipped

Standardization and mixtures
    DATASETS, DatasetSpec, get_dataset_spec, register_dataset    OXE registry (oxe.py)
    MIXTURES, get_mixture, parse_datasets, sampling_weights       named weighted mixtures (mixtures.py)

Statistics and normalization (numpy only: no TensorFlow at inference)
    NormalizationMode (BOUNDS_Q99 default, BOUNDS, NORMAL), normalize(x, stats["action"], mode),
    unnormalize(a, stats["action"], mode), compute_statistics, save_dataset_statistics,
    load_dataset_statistics, STATISTICS_FILENAME ("dataset_statistics.json"),
    share_first_statistics(stats)               every dataset normalized with the first one's statistics

Writing
    RLDSWriter(data_dir, name, features)        streams episodes into a tfds builder directory
    episode_features(image_size, wrist_image)   the platform's RLDS features
    make_episode(observations, actions, instruction, metadata), write_episodes(...)

Errors (all subclasses of DataError; each names the path, file, key or value at fault)
    DatasetNotFoundError, CorruptShardError, UnknownDatasetError, MissingFeatureError,
    EmptyDatasetError

Names are imported on first use, so `from embodied.data import unnormalize` does not load
TensorFlow. TensorFlow is imported through `embodied.data._tensorflow`, which lets it share
a process with MuJoCo's OSMesa renderer.
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "reader": ("RLDSDataset", "DataConfig", "make_dataloader", "RLDSSource", "BadRecordReport",
               "resolve_builder_dir", "resolve_split"),
    "oxe": ("DATASETS", "DatasetSpec", "get_dataset_spec", "register_dataset"),
    "mixtures": ("MIXTURES", "get_mixture", "parse_datasets", "sampling_weights"),
    "statistics": ("NormalizationMode", "normalize", "unnormalize", "compute_statistics", "save_dataset_statistics",
                   "load_dataset_statistics", "share_first_statistics", "STATISTICS_FILENAME"),
    "rlds_writer": ("RLDSWriter", "episode_features", "make_episode", "write_episodes"),
    "errors": ("DataError", "DatasetNotFoundError", "CorruptShardError", "UnknownDatasetError", "MissingFeatureError",
               "EmptyDatasetError"),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(__all__))
