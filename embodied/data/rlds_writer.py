"""Write episodes as an RLDS dataset in Open X-Embodiment layout.

The output is a plain tensorflow-datasets builder directory,

    <data_dir>/<name>/<version>/
        dataset_info.json
        features.json
        metadata.json                              (collection config, package versions)
        <name>-train.tfrecord-00000-of-00003 ...

that `tfds.builder_from_directory(path)` reads with no project code imported. Episodes are
encoded with tfds's own feature connectors (`FeaturesDict`, `Dataset` for `steps`, `Image`,
`Text`, ...) and serialized as `tf.train.Example` records, exactly as OXE datasets are.

Shards are streamed to disk as episodes arrive (memory stays bounded by one episode) under
temporary names, and renamed to the `-XXXXX-of-YYYYY` form once the shard count is known.

Step layout (the OXE/RLDS convention used by converted OXE datasets): an episode of T actions
has T steps; step t holds observation o_t, the action a_t taken from it, reward r_t and
`discount`; `is_first` on step 0, `is_last` and `is_terminal` on step T-1; demonstrations carry
reward 1 on their last step.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from embodied.data.errors import EmptyDatasetError

DEFAULT_VERSION = "1.0.0"
DEFAULT_MAX_SHARD_BYTES = 256 * 2**20
STATE_DIM = 8
ACTION_DIM = 7


from embodied.data._tensorflow import tf as _tf
from embodied.data._tensorflow import tfds as _tfds


def _image_shape(image_size) -> tuple[int, int]:
    if isinstance(image_size, int):
        return (image_size, image_size)
    h, w = image_size
    return (int(h), int(w))


def episode_features(image_size: int | tuple[int, int] = 224, wrist_image: bool = False,
                     image_encoding: str = "jpeg", state_dim: int = STATE_DIM, action_dim: int = ACTION_DIM):
    """The platform's RLDS episode features (the contract in ARCHITECTURE.md).

    `image_encoding` is "jpeg" (what OXE datasets use; ~5x smaller) or "png" (lossless).
    """
    tfds = _tfds()
    F = tfds.features
    if image_encoding not in ("jpeg", "png"):
        raise ValueError(f"image_encoding must be 'jpeg' or 'png', got {image_encoding!r}")
    h, w = _image_shape(image_size)
    observation = {"image": F.Image(shape=(h, w, 3), dtype=np.uint8, encoding_format=image_encoding,
                                    doc="Primary third-person camera RGB.")}
    if wrist_image:
        observation["wrist_image"] = F.Image(shape=(h, w, 3), dtype=np.uint8, encoding_format=image_encoding,
                                             doc="Wrist camera RGB.")
    observation["state"] = F.Tensor(shape=(state_dim,), dtype=np.float32,
                                    doc="End-effector position (3), quaternion xyzw (4), gripper opening in [0, 1] (1).")
    steps = F.Dataset({
        "observation": F.FeaturesDict(observation),
        "action": F.Tensor(shape=(action_dim,), dtype=np.float32,
                           doc="[dx, dy, dz, droll, dpitch, dyaw, gripper]: end-effector deltas in the base frame; "
                               "gripper 1 = open, 0 = closed."),
        "language_instruction": F.Text(doc="Natural-language instruction."),
        "reward": F.Scalar(dtype=np.float32, doc="1 on the last step of a successful episode."),
        "discount": F.Scalar(dtype=np.float32, doc="1 for every step."),
        "is_first": F.Scalar(dtype=np.bool_, doc="True on the first step."),
        "is_last": F.Scalar(dtype=np.bool_, doc="True on the last step."),
        "is_terminal": F.Scalar(dtype=np.bool_, doc="True on the last step of a successful episode."),
    })
    metadata = F.FeaturesDict({
        "episode_id": F.Scalar(dtype=np.int64, doc="Index of the episode in this dataset."),
        "task": F.Text(doc="Task name."),
        "instruction": F.Text(doc="The episode's instruction."),
        "suite": F.Text(doc="Task suite."),
        "backend": F.Text(doc="Physics backend."),
        "seed": F.Scalar(dtype=np.int64, doc="Episode seed: fixes layout and randomization draw."),
        "randomization": F.Text(doc="Domain-randomization config as JSON."),
        "success": F.Scalar(dtype=np.bool_, doc="Whether the episode reached the task's success predicate."),
        "control_hz": F.Scalar(dtype=np.float32, doc="Control frequency."),
    })
    return F.FeaturesDict({"steps": steps, "episode_metadata": metadata})


def make_episode(observations: Mapping[str, np.ndarray], actions: np.ndarray, instruction: str | Sequence[str],
                 metadata: Mapping[str, Any], success: bool = True) -> dict:
    """Build one RLDS episode from stacked arrays.

    `observations` maps "image" (T,H,W,3), optional "wrist_image", and "state" (T,8) to arrays
    aligned with `actions` (T,7): observation t is the one action t was taken from. `instruction`: the
    episode's, or one per step (each step's clause of a multi-step instruction; the metadata's
    `instruction` is then the whole one and must be given).
    """
    actions = np.asarray(actions, dtype=np.float32)
    length = len(actions)
    if length == 0:
        raise ValueError("an episode needs at least one step")
    if isinstance(instruction, str):
        per_step = [instruction] * length
    else:
        per_step = [str(text) for text in instruction]
        if len(per_step) != length:
            raise ValueError(f"{len(per_step)} step instructions for {length} actions")
        if "instruction" not in metadata:
            raise ValueError("with one instruction per step, metadata must give the episode's whole 'instruction'")
    for key, value in observations.items():
        if len(value) != length:
            raise ValueError(f"observation {key!r} has {len(value)} entries for {length} actions")
    steps = []
    for t in range(length):
        last = t == length - 1
        steps.append({
            "observation": {k: v[t] for k, v in observations.items()},
            "action": actions[t],
            "language_instruction": per_step[t],
            "reward": float(last and success),
            "discount": 1.0,
            "is_first": t == 0,
            "is_last": last,
            "is_terminal": bool(last and success),
        })
    meta = dict(metadata)
    if "randomization" in meta and not isinstance(meta["randomization"], str):
        meta["randomization"] = json.dumps(meta["randomization"], sort_keys=True)
    meta.setdefault("success", success)
    meta.setdefault("instruction", instruction)
    return {"steps": steps, "episode_metadata": meta}


class RLDSWriter:
    """Stream episodes into a tfds builder directory (one split, TFRecord shards).

        with RLDSWriter(out_dir, "embodied_tabletop10_mujoco", episode_features(64)) as writer:
            writer.write(episode)            # a dict matching the features
        writer.builder_dir                   # -> out_dir/embodied_tabletop10_mujoco/1.0.0

    A failure inside the `with` block removes the partial shards and writes no metadata, so
    a directory with `dataset_info.json` is always complete.
    """

    def __init__(self, data_dir: str | os.PathLike, name: str, features, *, version: str = DEFAULT_VERSION,
                 split: str = "train", description: str = "", homepage: str | None = None,
                 citation: str | None = None, metadata: Mapping[str, Any] | None = None,
                 max_shard_bytes: int = DEFAULT_MAX_SHARD_BYTES, overwrite: bool = False):
        tfds = _tfds()
        self.name = name
        self.version = str(version)
        self.split = split
        self.features = features
        self.builder_dir = Path(data_dir) / name / self.version
        self.max_shard_bytes = int(max_shard_bytes)
        self._description = description
        self._homepage = homepage
        self._citation = citation
        self._metadata = dict(metadata or {})
        if (self.builder_dir / "dataset_info.json").exists():
            if not overwrite:
                raise FileExistsError(f"an RLDS dataset already exists at {self.builder_dir}; "
                                      "pass overwrite=True (or a new output_dir) to replace it")
            for old in self.builder_dir.glob(f"{name}-{split}.tfrecord-*"):
                old.unlink()
            for meta in ("dataset_info.json", "features.json", "metadata.json"):
                (self.builder_dir / meta).unlink(missing_ok=True)
        self.builder_dir.mkdir(parents=True, exist_ok=True)
        self._template = tfds.core.ShardedFileTemplate(data_dir=self.builder_dir, dataset_name=name, split=split,
                                                       filetype_suffix="tfrecord")
        self._tmp_paths: list[Path] = []
        self._shard_lengths: list[int] = []
        self._shard_bytes = 0
        self._total_bytes = 0
        self._writer = None
        self.num_episodes = 0
        self.num_steps = 0
        self._closed = False

    # -- writing ------------------------------------------------------------------------------
    def write(self, episode: Mapping[str, Any]) -> None:
        """Encode (tfds feature connectors) and append one episode."""
        if self._closed:
            raise RuntimeError("the writer is closed")
        tf = _tf()
        record = self.features.serialize_example(episode)
        if self._writer is not None and self._shard_bytes + len(record) > self.max_shard_bytes:
            self._close_shard()
        if self._writer is None:
            path = self.builder_dir / f".{self.name}-{self.split}.tfrecord-{len(self._tmp_paths):05d}.tmp"
            self._tmp_paths.append(path)
            self._shard_lengths.append(0)
            self._shard_bytes = 0
            self._writer = tf.io.TFRecordWriter(os.fspath(path))
        self._writer.write(record)
        self._shard_lengths[-1] += 1
        self._shard_bytes += len(record)
        self._total_bytes += len(record)
        self.num_episodes += 1
        steps = episode["steps"]
        self.num_steps += len(steps) if not isinstance(steps, Mapping) else len(next(iter(steps.values())))

    def write_all(self, episodes: Iterable[Mapping[str, Any]]) -> None:
        for episode in episodes:
            self.write(episode)

    def _close_shard(self) -> None:
        if self._writer is not None:
            self._writer.flush()
            self._writer.close()
            self._writer = None

    # -- finishing ----------------------------------------------------------------------------
    def close(self) -> Path:
        """Rename shards to their final names and write `dataset_info.json`/`features.json`."""
        if self._closed:
            return self.builder_dir
        self._close_shard()
        self._closed = True
        if self.num_episodes == 0:
            self._remove_partial()
            raise EmptyDatasetError(f"no episodes were written to {self.builder_dir}; an empty dataset is not saved")
        tfds = _tfds()
        num_shards = len(self._tmp_paths)
        for index, tmp in enumerate(self._tmp_paths):
            tmp.rename(self._template.sharded_filepath(shard_index=index, num_shards=num_shards))
        identity = tfds.core.DatasetIdentity(name=self.name, version=tfds.core.Version(self.version),
                                             data_dir=os.fspath(self.builder_dir), module_name=__name__)
        metadata = tfds.core.MetadataDict()
        metadata.update(self._metadata)
        info = tfds.core.DatasetInfo(builder=identity, description=self._description, features=self.features,
                                     homepage=self._homepage, citation=self._citation, metadata=metadata)
        info.set_file_format("tfrecord")
        split = tfds.core.SplitInfo(name=self.split, shard_lengths=list(self._shard_lengths),
                                    num_bytes=self._total_bytes, filename_template=self._template)
        info.set_splits(tfds.core.SplitDict([split]))
        info.write_to_directory(self.builder_dir)
        return self.builder_dir

    def abort(self) -> None:
        """Drop everything written so far."""
        self._close_shard()
        self._closed = True
        self._remove_partial()

    def _remove_partial(self) -> None:
        for tmp in self._tmp_paths:
            tmp.unlink(missing_ok=True)

    def __enter__(self) -> "RLDSWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()


def write_episodes(data_dir, name: str, episodes: Iterable[Mapping[str, Any]], features, **kwargs) -> Path:
    """Write all `episodes` in one call; returns the builder directory."""
    with RLDSWriter(data_dir, name, features, **kwargs) as writer:
        writer.write_all(episodes)
    return writer.builder_dir
