"""Read RLDS datasets through tensorflow-datasets: episodes → standardized frames → torch batches.

    from embodied.data import RLDSDataset, DataConfig

    data = RLDSDataset(DataConfig(datasets="sim_tabletop10", data_dir="data/rlds", batch_size=32))
    data.save_statistics(run_dir)              # dataset_statistics.json, carried by every checkpoint
    for batch in data:                         # an endless stream (repeat=True) of dicts of torch tensors
        batch["image"]                         # uint8 (B, H, W, 3)
        batch["action"]                        # float32 (B, 7), or (B, K, 7) with action_chunk=K
        batch["instruction"]                   # list of B strings

Pipeline (tf.data, as OpenVLA/Octo do): shard files → parallel interleaved reads (bad-record
aware) → parse with the dataset's own tfds features, image bytes left encoded → per-dataset
standardization (`oxe.py`) → normalization with the dataset's statistics → optional action
chunks → frames → weighted mixing across datasets → shuffle buffer → parallel image decode,
resize and augmentation → batch → prefetch.

Datasets are found as a builder directory (`.../<name>/<version>` holding `dataset_info.json`)
or as a name under `data_dir` (`<data_dir>/<name>/<version>`, the newest version unless
`name:version` is given).
"""
from __future__ import annotations

import inspect
import logging
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import numpy as np

from embodied.config_keys import from_mapping
from embodied.data import oxe
from embodied.data._tensorflow import tf as _tf
from embodied.data._tensorflow import tfds as _tfds
from embodied.data.errors import CorruptShardError, DatasetNotFoundError, EmptyDatasetError, MissingFeatureError
from embodied.data.mixtures import parse_datasets, sampling_weights
from embodied.data.statistics import (NormalizationMode, StatisticsCache, compute_statistics, fingerprint,
                                      load_dataset_statistics, save_dataset_statistics, share_first_statistics)
from embodied.data.transforms import (CHUNK_PADDINGS, OPENVLA_AUGMENT, AugmentConfig, chunk_actions, decode_image,
                                      next_keyframe_states, normalize_tf, with_clause_done_frames)

log = logging.getLogger(__name__)
STATISTICS_VERSION = 1  # bump when the statistics computation changes
VALIDATION_SPLITS = ("val", "validation")


# -- locating datasets -----------------------------------------------------------------------------

def _version_key(name: str):
    try:
        return tuple(int(p) for p in name.split("."))
    except ValueError:
        return (-1,)


def resolve_builder_dir(dataset: str | os.PathLike, data_dir: str | os.PathLike | None = None) -> Path:
    """A tfds builder directory (holding `dataset_info.json`) from a path or `name[:version]` + data_dir."""
    text = os.fspath(dataset)
    candidate = Path(text).expanduser()
    looks_like_path = os.sep in text or text.startswith(".") or data_dir is None
    if candidate.is_dir() or looks_like_path:
        root = candidate
    else:
        name, _, version = text.partition(":")
        root = Path(data_dir).expanduser() / name
        if version:
            root = root / version
    if not root.exists():
        hint = "" if data_dir is not None or root.is_absolute() else " (give data_dir= or an absolute path)"
        raise DatasetNotFoundError(root, "directory does not exist" + hint)
    if not root.is_dir():
        raise DatasetNotFoundError(root, "not a directory")
    if (root / "dataset_info.json").exists():
        return root
    versions = sorted((p for p in root.iterdir() if (p / "dataset_info.json").exists()), key=lambda p: _version_key(p.name))
    if not versions:
        raise DatasetNotFoundError(root, "no dataset_info.json in it or in a version subdirectory")
    return versions[-1]


def resolve_split(splits: Sequence[str], split: str) -> str:
    """"train"/"val" → a tfds split string; `train[:95%]`/`train[95%:]` when there is no validation split."""
    names = list(splits)
    has_val = next((s for s in VALIDATION_SPLITS if s in names), None)
    if split == "train":
        return "train" if has_val else "train[:95%]"
    if split in VALIDATION_SPLITS:
        return has_val or "train[95%:]"
    return split


# -- bad-record bookkeeping ------------------------------------------------------------------------

class BadRecordReport:
    """Shards that ended early (truncated or corrupt records), and how many records each lost."""

    def __init__(self):
        self._lock = threading.Lock()
        self.shards: dict[str, int] = {}  # path -> records skipped
        self.fatal: CorruptShardError | None = None

    def add(self, path: str, read: int, expected: int, strict: bool) -> None:
        with self._lock:
            if strict:
                self.fatal = self.fatal or CorruptShardError(path, read, expected)
            elif self.shards.get(path, -1) < expected - read:  # each pass over a bad shard finds the same records
                self.shards[path] = expected - read
                log.warning("skipping %d bad record(s) in %s (read %d of %d)", expected - read, path, read, expected)

    @property
    def skipped(self) -> int:
        return sum(self.shards.values())

    def summary(self) -> str:
        return (f"skipped {self.skipped} bad record(s) in {len(self.shards)} shard(s): "
                + ", ".join(f"{Path(p).name} ({n})" for p, n in sorted(self.shards.items())))


def _read_shard(path, skip, take, report: BadRecordReport, strict: bool):
    """Records of one shard; a read error ends the shard, and a short count is reported (or raised).

    Strict reading stops the pipeline with a failed assertion once a shard comes up short;
    `_iterate` turns that into the CorruptShardError recorded in `report`, naming the file.
    """
    tf = _tf()

    def check(path_t, count, expected):
        if int(count) < int(expected):
            report.add(path_t.numpy().decode(), int(count), int(expected), strict)
            return not strict
        return True

    records = tf.data.TFRecordDataset(path, buffer_size=8 * 2**20).ignore_errors().skip(skip).take(take)
    tagged = records.map(lambda r: (r, False)).concatenate(tf.data.Dataset.from_tensors((tf.constant(b""), True)))

    def at_end(count):
        ok = tf.py_function(check, [path, count, take], tf.bool)
        assertion = tf.debugging.Assert(ok, ["corrupt or truncated shard", path])
        with tf.control_dependencies([assertion]):
            return tf.identity(ok)

    def step(count, element):
        record, is_end = element
        tf.cond(is_end, lambda: at_end(count), lambda: tf.constant(True))
        return count + tf.cast(tf.logical_not(is_end), tf.int64), (record, is_end)

    scanned = tagged.scan(tf.constant(0, tf.int64), step)
    return scanned.filter(lambda record, is_end: tf.logical_not(is_end)).map(lambda record, is_end: record)


# -- one dataset -----------------------------------------------------------------------------------

class RLDSSource:
    """One RLDS dataset opened with tfds, read as standardized trajectories (tf.data)."""

    def __init__(self, dataset: str | os.PathLike, data_dir: str | os.PathLike | None = None, split: str = "train",
                 spec: str | oxe.DatasetSpec | None = None, wrist_image: bool = False,
                 skip_bad_records: bool = False, report: BadRecordReport | None = None):
        tfds = _tfds()
        _tf()
        self.builder_dir = resolve_builder_dir(dataset, data_dir)
        self.builder = tfds.builder_from_directory(os.fspath(self.builder_dir))
        self.name = self.builder.info.name
        if isinstance(spec, oxe.DatasetSpec):
            self.spec = spec
        else:
            self.spec = oxe.get_dataset_spec(spec or self.name)
        self.features = self.builder.info.features
        if "steps" not in self.features:
            raise MissingFeatureError("steps", self.name, list(self.features.keys()))
        self.step_features = self.features["steps"].feature
        self.wrist_image = wrist_image
        oxe.check_features(self.spec, self.step_features, self.name, wrist=wrist_image)
        self.split = resolve_split(self.builder.info.splits.keys(), split)
        try:
            split_info = self.builder.info.splits[self.split]
        except (KeyError, ValueError) as err:
            raise ValueError(f"dataset {self.name!r} ({self.builder_dir}) has no split {self.split!r}; "
                             f"its splits: {', '.join(self.builder.info.splits.keys())}") from err
        self.num_episodes = int(split_info.num_examples)
        if self.num_episodes == 0:
            raise EmptyDatasetError(f"split {self.split!r} of dataset {self.name!r} ({self.builder_dir}) "
                                    "has no episodes")
        self.file_instructions = list(split_info.file_instructions)
        missing = [fi.filename for fi in self.file_instructions if not Path(fi.filename).exists()]
        if missing:
            raise DatasetNotFoundError(missing[0], f"shard file missing from dataset {self.name!r}"
                                       + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        self.skip_bad_records = skip_bad_records
        self.report = report or BadRecordReport()

    def __repr__(self) -> str:
        return f"RLDSSource({self.name!r}, split={self.split!r}, episodes={self.num_episodes}, dir={self.builder_dir})"

    # -- identity --------------------------------------------------------------------------------
    def fingerprint(self) -> str:
        info = self.builder.info
        split_info = info.splits[self.split]
        return fingerprint({
            "name": self.name, "version": str(info.version), "split": self.split,
            "shard_lengths": [int(n) for n in info.splits[self.split.split("[")[0]].shard_lengths],
            "num_bytes": int(split_info.num_bytes), "num_examples": self.num_episodes,
            "features": info.features.to_json(),
            "spec": {k: v for k, v in asdict(self.spec).items() if k not in ("transform", "notes")},
            "transform": inspect.getsource(self.spec.transform), "statistics_version": STATISTICS_VERSION,
        })

    # -- tf.data -----------------------------------------------------------------------------------
    def records(self, shuffle: bool = False, seed: int | None = None, num_parallel_reads: int | None = None,
                worker: tuple[int, int] = (1, 0), ordered: bool = False, deterministic: bool | None = None):
        """Serialized episodes. `worker=(n, i)` keeps the i-th of n shares (files, else episodes).

        Shards are read `num_parallel_reads` at a time, interleaved; `ordered=True` reads them
        one after another (file order, for `episodes()`).
        """
        tf = _tf()
        instructions = self.file_instructions
        num_workers, worker_id = worker
        by_file = num_workers > 1 and len(instructions) >= num_workers
        if by_file:
            instructions = instructions[worker_id::num_workers]
        files = tf.data.Dataset.from_tensor_slices((
            [fi.filename for fi in instructions],
            np.asarray([fi.skip for fi in instructions], np.int64),
            np.asarray([fi.take if fi.take >= 0 else fi.examples_in_shard - fi.skip for fi in instructions],
                       np.int64)))
        if shuffle:
            files = files.shuffle(len(instructions), seed=seed, reshuffle_each_iteration=True)
        if ordered:
            cycle, parallel = 1, 1
        elif num_parallel_reads:
            cycle = parallel = max(1, min(num_parallel_reads, len(instructions)))
        else:
            cycle, parallel = min(len(instructions), 16), tf.data.AUTOTUNE
        strict = not self.skip_bad_records
        report = self.report
        read = lambda p, s, t: _read_shard(p, s, t, report, strict)  # noqa: E731
        if parallel == 1:
            records = files.flat_map(read)
        else:
            records = files.interleave(read, cycle_length=cycle, num_parallel_calls=parallel,
                                       deterministic=(not shuffle) if deterministic is None else deterministic)
        if num_workers > 1 and not by_file:
            records = records.shard(num_workers, worker_id)
        return records

    def trajectories(self, shuffle: bool = False, seed: int | None = None, num_parallel_reads: int | None = None,
                     num_parallel_calls: int | None = None, worker: tuple[int, int] = (1, 0), ordered: bool = False,
                     deterministic: bool | None = None):
        """Standardized trajectories: image (T,) bytes, [wrist_image], state (T, 8), action (T, 7), instruction (T,)."""
        tf = _tf()
        tfds = _tfds()
        calls = num_parallel_calls or tf.data.AUTOTUNE
        features, step_features, spec, wrist = self.features, self.step_features, self.spec, self.wrist_image
        decoders = {"steps": tfds.decode.SkipDecoding()}
        image_path = ("observation", spec.image_key)

        def parse(record):
            return features.deserialize_example(record, decoders=decoders)["steps"]

        def long_enough(raw):
            node = raw
            for key in image_path:
                node = node[key]
            return tf.shape(node)[0] >= spec.min_steps

        def to_common(raw):
            return oxe.standardize(oxe.decode_steps(raw, step_features, spec, wrist), spec, wrist)

        det = (not shuffle) if deterministic is None else deterministic
        records = self.records(shuffle, seed, num_parallel_reads, worker, ordered, det)
        return records.map(parse, num_parallel_calls=calls, deterministic=det).filter(long_enough).map(
            to_common, num_parallel_calls=calls, deterministic=det)

    # -- statistics --------------------------------------------------------------------------------
    def compute_statistics(self, show_progress: bool = True) -> dict[str, Any]:
        """One pass over the split (images are never decoded)."""
        from tqdm.auto import tqdm

        tf = _tf()
        actions, states, episodes = [], [], 0
        trajectories = self.trajectories().map(lambda t: (t["action"], t["state"]), num_parallel_calls=tf.data.AUTOTUNE)
        bar = tqdm(total=self.num_episodes, desc=f"statistics {self.name}", unit="ep", disable=not show_progress,
                   leave=False)
        try:
            for action, state in _iterate(trajectories, self.report):
                actions.append(action)
                states.append(state)
                episodes += 1
                bar.update(1)
        finally:
            bar.close()
        if not actions:
            raise EmptyDatasetError(f"dataset {self.name!r} split {self.split!r} ({self.builder_dir}) yielded no "
                                    f"frames to compute statistics on" + _skip_note(self.report))
        return compute_statistics(np.concatenate(actions), np.concatenate(states), episodes,
                                  action_mask=oxe.action_mask(self.spec))

    def statistics(self, cache_dir: str | os.PathLike | None = None, show_progress: bool = True) -> dict[str, Any]:
        """Statistics from the cache (keyed by the dataset's fingerprint), computed on a miss."""
        cache = StatisticsCache(cache_dir)
        key = self.fingerprint()
        stats = cache.get(self.name, key)
        if stats is None:
            stats = self.compute_statistics(show_progress=show_progress)
            stats["fingerprint"] = key
            path = cache.put(self.name, key, stats)
            log.info("cached statistics of %s at %s", self.name, path)
        return stats

    # -- numpy convenience -------------------------------------------------------------------------
    def episodes(self, image_size: int | tuple[int, int] | None = None) -> Iterator[dict[str, Any]]:
        """Standardized episodes in file order as numpy, images decoded (and resized if asked)."""
        tf = _tf()

        def decode(traj):
            def one(encoded):
                image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
                if image_size is not None:
                    image = decode_image(encoded, _size(image_size))
                return image

            out = dict(traj)
            for key in ("image", "wrist_image"):
                if key in out:
                    out[key] = tf.map_fn(one, out[key], fn_output_signature=tf.uint8)
            return out

        for traj in _iterate(self.trajectories(ordered=True).map(decode), self.report):
            traj["instruction"] = [s.decode() for s in traj["instruction"]]
            yield traj


def _size(image_size) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    return (int(image_size[0]), int(image_size[1]))


def _skip_note(report: BadRecordReport) -> str:
    return f"; {report.summary()}" if report.skipped else ""


def _iterate(dataset, report: BadRecordReport):
    """numpy elements of a tf.data pipeline; a bad shard surfaces as CorruptShardError naming the file."""
    tf = _tf()
    iterator = dataset.as_numpy_iterator()
    while True:
        try:
            element = next(iterator)
        except StopIteration:
            return
        except tf.errors.OpError as err:
            if report.fatal is not None:
                raise report.fatal from None
            raise
        yield element


# -- the torch-facing dataset ----------------------------------------------------------------------

@dataclass
class DataConfig:
    """Everything the loader needs; `datasets` is a mixture name, a dataset name/path, or a list."""

    datasets: Any = "sim_tabletop10"
    data_dir: str | None = None
    split: str = "train"  # "train" | "val" | any tfds split string
    image_size: int | tuple[int, int] = 224
    wrist_image: bool = False
    batch_size: int = 32
    shuffle: bool = True
    shuffle_buffer: int = 10_000  # frames
    repeat: bool = True
    drop_remainder: bool | None = None  # default: drop when repeating
    augment: bool = False  # OpenVLA's augmentation
    center_crop: bool = False  # evaluation crop for policies trained with augmentation
    action_chunk: int = 1  # K future actions per frame (1: a single action, no mask)
    chunk_padding: str = "repeat"  # past an episode's end: repeat (masked out) | hold (zero motion) | continue (the last action)
    # clause-labelled steps: the first N steps of each clause but the first again, prompted with the clause before,
    # labelled clause_done (a clause-done head's positives; needs action_chunk > 1, their actions are masked out)
    clause_done_frames: int = 0
    normalization: str = "bounds_q99"  # bounds_q99 | bounds | normal
    normalize_state: bool = False
    keyframe_states: bool = False  # also yield each frame's next-keyframe state (raw), an auxiliary target
    balance_weights: bool = False  # multiply mixture weights by frame counts
    shared_statistics: bool = False  # normalize every dataset with the first one's statistics (one robot, one scale)
    statistics: Any = None  # precomputed {name: stats}, or a dataset_statistics.json path
    statistics_cache_dir: str | None = None
    num_parallel_reads: int | None = None  # None: tf.data AUTOTUNE
    num_parallel_calls: int | None = None
    prefetch: int | None = None  # batches; None: AUTOTUNE
    skip_bad_records: bool = False
    seed: int | None = 0
    deterministic: bool = False  # True: a fixed element order for a seed even with shuffling (exact resume)
    skip_frames: int = 0  # frames dropped from the start of the stream (resuming a run where it stopped)
    spec: str | None = None  # force one standardization for every dataset (e.g. "embodied")
    show_progress: bool = True

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "DataConfig":
        return from_mapping(cls, values, "data config key")


def _torch_batch(batch: dict[str, Any], names: list[str]) -> dict[str, Any]:
    import torch

    out: dict[str, Any] = {}
    for key, value in batch.items():
        if key == "instruction":
            out[key] = [s.decode() for s in value]
        else:
            value = np.ascontiguousarray(value)
            out[key] = torch.from_numpy(value if value.flags.writeable else value.copy())
    out["dataset_name"] = [names[i] for i in batch["dataset_index"]]
    return out


try:
    from torch.utils.data import IterableDataset as _IterableDataset
except ImportError:  # pragma: no cover - torch is a dependency
    _IterableDataset = object


class RLDSDataset(_IterableDataset):
    """A (weighted mixture of) RLDS dataset(s) as a torch IterableDataset of ready batches.

    Batches are assembled by tf.data (parallel reads, decoding and batching happen there), so
    use it directly or with `DataLoader(dataset, batch_size=None)`; with DataLoader workers each
    worker reads its own share of the shards.
    """

    def __init__(self, config: DataConfig | Mapping[str, Any] | None = None, **overrides):
        if config is None:
            config = DataConfig()
        elif isinstance(config, Mapping):
            config = DataConfig.from_dict(config)
        self.config = cfg = DataConfig.from_dict({**asdict(config), **overrides}) if overrides else config
        if cfg.action_chunk < 1:
            raise ValueError(f"action_chunk must be >= 1, got {cfg.action_chunk}")
        if cfg.chunk_padding not in CHUNK_PADDINGS:
            raise ValueError(f"unknown chunk_padding {cfg.chunk_padding!r}; valid: {', '.join(CHUNK_PADDINGS)}")
        if cfg.clause_done_frames < 0:
            raise ValueError(f"clause_done_frames must be >= 0, got {cfg.clause_done_frames}")
        if cfg.clause_done_frames and cfg.action_chunk < 2:
            raise ValueError("clause_done_frames masks the added frames' actions out of the loss: it needs "
                             f"action_chunk > 1, got {cfg.action_chunk}")
        self.mode = NormalizationMode.parse(cfg.normalization)
        self.image_size = _size(cfg.image_size)
        self.report = BadRecordReport()
        entries = parse_datasets(cfg.datasets)
        self.sources = [RLDSSource(name, cfg.data_dir, cfg.split, spec=cfg.spec, wrist_image=cfg.wrist_image,
                                   skip_bad_records=cfg.skip_bad_records, report=self.report) for name, _ in entries]
        self.names = [s.name for s in self.sources]
        self.statistics = self._load_statistics()
        self.num_frames = [int(self.statistics[n]["num_transitions"]) for n in self.names]
        self.weights = sampling_weights([w for _, w in entries], self.num_frames, balance=cfg.balance_weights)
        self._pipelines: dict[tuple[int, int], Any] = {}

    def __repr__(self) -> str:
        parts = ", ".join(f"{n} ({w:.3f})" for n, w in zip(self.names, self.weights))
        return f"RLDSDataset([{parts}], split={self.config.split!r}, batch_size={self.config.batch_size})"

    # -- statistics ------------------------------------------------------------------------------
    def _load_statistics(self) -> dict[str, dict[str, Any]]:
        given = self.config.statistics
        if isinstance(given, (str, os.PathLike)):
            given = load_dataset_statistics(given)
        given = dict(given or {})
        stats = {}
        for source in self.sources:
            stats[source.name] = given.get(source.name) or source.statistics(self.config.statistics_cache_dir,
                                                                              self.config.show_progress)
        return share_first_statistics(stats) if self.config.shared_statistics else stats

    def save_statistics(self, directory: str | os.PathLike) -> Path:
        """Write `dataset_statistics.json` (every checkpoint carries it)."""
        return save_dataset_statistics(self.statistics, directory)

    # -- the pipeline ------------------------------------------------------------------------------
    def frames(self, worker: tuple[int, int] = (1, 0)):
        """The mixed, shuffled, un-batched frame stream (images still encoded)."""
        tf = _tf()
        cfg = self.config
        streams = []
        for index, source in enumerate(self.sources):
            stats = self.statistics[source.name]
            traj = source.trajectories(shuffle=cfg.shuffle, seed=cfg.seed, num_parallel_reads=cfg.num_parallel_reads,
                                       num_parallel_calls=cfg.num_parallel_calls, worker=worker,
                                       deterministic=self._deterministic)
            if cfg.repeat:
                traj = traj.repeat()
            traj = traj.map(self._trajectory_fn(index, stats), num_parallel_calls=cfg.num_parallel_calls or tf.data.AUTOTUNE,
                            deterministic=self._deterministic)
            streams.append(traj.unbatch())
        if len(streams) == 1:
            frames = streams[0]
        else:
            frames = tf.data.Dataset.sample_from_datasets(streams, weights=self.weights.tolist(), seed=cfg.seed,
                                                          stop_on_empty_dataset=False)
        if cfg.shuffle and cfg.shuffle_buffer > 1:
            frames = frames.shuffle(cfg.shuffle_buffer, seed=cfg.seed, reshuffle_each_iteration=True)
        return frames

    def _trajectory_fn(self, index: int, stats: Mapping[str, Any]):
        tf = _tf()
        cfg, mode = self.config, self.mode

        def fn(traj):
            length = tf.shape(traj["action"])[0]
            out = {"image": traj["image"], "instruction": traj["instruction"],
                   "state": normalize_tf(traj["state"], stats["proprio"], mode) if cfg.normalize_state else traj["state"],
                   "dataset_index": tf.fill([length], index), "timestep": tf.range(length)}
            if cfg.wrist_image:
                out["wrist_image"] = traj["wrist_image"]
            if cfg.keyframe_states:
                out["keyframe_state"] = next_keyframe_states(traj["state"], traj["action"])
            if cfg.action_chunk > 1:  # chunked before normalizing: "hold" pads with raw zero motion
                action, out["action_mask"] = chunk_actions(traj["action"], cfg.action_chunk, cfg.chunk_padding,
                                                            traj.get("ends_at_goal", True), traj["instruction"])
                out["action"] = normalize_tf(action, stats["action"], mode)
            else:
                out["action"] = normalize_tf(traj["action"], stats["action"], mode)
            if cfg.clause_done_frames:
                out = with_clause_done_frames(out, cfg.clause_done_frames)
            return out

        return fn

    def tf_dataset(self, worker: tuple[int, int] = (1, 0)):
        """Batched tf.data pipeline (decoded, resized, augmented images)."""
        tf = _tf()
        cfg = self.config
        augment: AugmentConfig | None = OPENVLA_AUGMENT if cfg.augment else None
        size = self.image_size

        # Deterministic streams draw augmentations from (seed, worker, frame index): stateless
        # ops, so a resumed run (skip_frames) sees the same crops and colours as the original.
        seeded = augment is not None and cfg.deterministic

        def decode(index, frame):
            frame = dict(frame)
            seed = tf.stack([tf.constant((cfg.seed or 0) * 1000 + worker[1], tf.int64), index]) if seeded else None
            frame["image"] = decode_image(frame["image"], size, augment, cfg.center_crop, seed=seed)
            if "wrist_image" in frame:
                wrist_seed = None if seed is None else seed + tf.constant([0, 2**40], tf.int64)
                frame["wrist_image"] = decode_image(frame["wrist_image"], size, augment, cfg.center_crop,
                                                    seed=wrist_seed)
            return frame

        calls = cfg.num_parallel_calls or tf.data.AUTOTUNE
        frames = self.frames(worker).enumerate()
        if cfg.skip_frames:
            frames = frames.skip(cfg.skip_frames)  # before decoding, so skipping is cheap
        frames = frames.map(decode, num_parallel_calls=calls, deterministic=self._deterministic)
        drop = cfg.repeat if cfg.drop_remainder is None else cfg.drop_remainder
        batches = frames.batch(cfg.batch_size, drop_remainder=drop, num_parallel_calls=calls,
                               deterministic=self._deterministic)
        batches = batches.prefetch(cfg.prefetch or tf.data.AUTOTUNE)
        options = tf.data.Options()
        options.experimental_optimization.map_parallelization = True
        options.deterministic = self._deterministic
        return batches.with_options(options)

    @property
    def _deterministic(self) -> bool:
        return self.config.deterministic or not self.config.shuffle

    def __iter__(self) -> Iterator[dict[str, Any]]:
        worker = (1, 0)
        try:
            import torch.utils.data as tud

            info = tud.get_worker_info()
            if info is not None:
                worker = (info.num_workers, info.id)
        except ImportError:  # pragma: no cover
            pass
        if worker not in self._pipelines:  # built (traced) once, iterated many times
            self._pipelines[worker] = self.tf_dataset(worker)
        frames = 0
        try:
            for batch in _iterate(self._pipelines[worker], self.report):
                frames += len(batch["dataset_index"])
                yield _torch_batch(batch, self.names)
        finally:
            if self.report.skipped:
                log.warning("%s", self.report.summary())
        if frames == 0:
            raise EmptyDatasetError(f"no frames from {', '.join(self.names)} (split {self.config.split!r})"
                                    + _skip_note(self.report))

    @property
    def skipped_records(self) -> int:
        return self.report.skipped


def make_dataloader(config: DataConfig | Mapping[str, Any] | None = None, num_workers: int = 0,
                    pin_memory: bool = False, **overrides):
    """A torch DataLoader over `RLDSDataset` (batches come ready-made from tf.data)."""
    from torch.utils.data import DataLoader

    dataset = RLDSDataset(config, **overrides)
    return DataLoader(dataset, batch_size=None, num_workers=num_workers, pin_memory=pin_memory,
                      persistent_workers=num_workers > 0)
