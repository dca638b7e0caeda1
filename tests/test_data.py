"""Reading RLDS datasets: tfds builder dirs → standardized episodes → torch batches."""
import json

import numpy as np
import pytest
import torch

from embodied.data import (DatasetNotFoundError, EmptyDatasetError, RLDSDataset, RLDSSource, load_dataset_statistics,
                           normalize, resolve_split)
from embodied.data.synthetic import write_platform_dataset
from embodied.data.transforms import OPENVLA_AUGMENT

IMAGE = 16
NAME = "embodied_reader_test"


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """6 episodes of 4..9 steps, 2 episodes per shard (3 shards), lossless PNG images."""
    root = tmp_path_factory.mktemp("rlds")
    path, raw = write_platform_dataset(root, name=NAME, num_episodes=6, length=(4, 9), image_size=IMAGE,
                                       episodes_per_shard=2, seed=3)
    return root, path, raw


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("stats_cache"))


def _config(path, cache, **overrides):
    config = dict(datasets=str(path), split="train[:100%]", batch_size=5, image_size=IMAGE, shuffle=False,
                  repeat=False, statistics_cache_dir=cache, show_progress=False)
    config.update(overrides)
    return config


def _frames(dataset):
    """Every frame of a finite RLDSDataset as a list of dicts (numpy), in stream order."""
    out = []
    for batch in dataset:
        for i in range(len(batch["instruction"])):
            out.append({k: (v[i].numpy() if isinstance(v, torch.Tensor) else v[i]) for k, v in batch.items()})
    return out


def _episode(instruction: str) -> int:
    return int(instruction.rsplit(" ", 1)[1])


def test_writer_output_is_a_plain_tfds_builder_dir(dataset):
    import tensorflow_datasets as tfds

    _, path, raw = dataset
    assert (path / "dataset_info.json").exists() and (path / "features.json").exists()
    shards = sorted(p.name for p in path.glob("*.tfrecord-*"))
    assert shards == [f"{NAME}-train.tfrecord-{i:05d}-of-00003" for i in range(3)]
    builder = tfds.builder_from_directory(str(path))
    assert builder.info.splits["train"].num_examples == 6
    for episode, expected in zip(builder.as_dataset(split="train"), raw):
        steps = list(episode["steps"].as_numpy_iterator())
        assert len(steps) == len(expected["actions"])
        np.testing.assert_array_equal(np.stack([s["action"] for s in steps]), expected["actions"])
        np.testing.assert_array_equal(np.stack([s["observation"]["image"] for s in steps]),
                                      expected["observations"]["image"])
        assert [s["is_first"] for s in steps] == [True] + [False] * (len(steps) - 1)
        assert steps[-1]["is_last"] and steps[-1]["is_terminal"] and steps[-1]["reward"] == 1.0
        assert steps[0]["language_instruction"].decode() == expected["instruction"]


def test_source_found_by_path_or_by_name_and_data_dir(dataset):
    root, path, _ = dataset
    by_path = RLDSSource(path, split="train[:100%]")
    by_name = RLDSSource(NAME, data_dir=root, split="train[:100%]")
    by_version = RLDSSource(f"{NAME}:1.0.0", data_dir=root, split="train[:100%]")
    by_parent = RLDSSource(root / NAME, split="train[:100%]")  # newest version subdirectory
    assert {s.builder_dir for s in (by_path, by_name, by_version, by_parent)} == {path}
    assert by_path.num_episodes == 6 and by_path.name == NAME
    with pytest.raises(DatasetNotFoundError, match=f"{NAME}/9.9.9"):
        RLDSSource(f"{NAME}:9.9.9", data_dir=root)


def test_standardized_episodes_round_trip_exactly(dataset):
    _, path, raw = dataset
    episodes = list(RLDSSource(path, split="train[:100%]").episodes())
    assert len(episodes) == len(raw)
    for got, expected in zip(episodes, raw):
        np.testing.assert_array_equal(got["action"], expected["actions"])
        np.testing.assert_array_equal(got["state"], expected["observations"]["state"])
        np.testing.assert_array_equal(got["image"], expected["observations"]["image"])  # PNG: lossless
        assert got["instruction"] == [expected["instruction"]] * len(expected["actions"])


def test_batches_are_torch_tensors_with_normalized_actions(dataset, cache):
    _, path, raw = dataset
    data = RLDSDataset(_config(path, cache))
    stats = data.statistics[NAME]
    frames = _frames(data)
    assert len(frames) == sum(len(r["actions"]) for r in raw) == stats["num_transitions"]
    batch = next(iter(data))
    assert batch["image"].dtype == torch.uint8 and batch["image"].shape == (5, IMAGE, IMAGE, 3)
    assert batch["action"].dtype == torch.float32 and batch["action"].shape == (5, 7)
    assert batch["state"].shape == (5, 8) and batch["dataset_name"] == [NAME] * 5
    for frame in frames:
        expected = raw[_episode(frame["instruction"])]
        t = int(frame["timestep"])
        np.testing.assert_allclose(frame["action"], normalize(expected["actions"][t], stats["action"]), atol=1e-6)
        np.testing.assert_array_equal(frame["state"], expected["observations"]["state"][t])
        np.testing.assert_array_equal(frame["image"], expected["observations"]["image"][t])
    assert frames[0]["action"][6] == raw[0]["actions"][0][6]  # the gripper is not normalized


def test_images_are_resized_to_the_policy_size(dataset, cache):
    _, path, raw = dataset
    frames = _frames(RLDSDataset(_config(path, cache, image_size=8)))
    assert frames[0]["image"].shape == (8, 8, 3)
    # area-averaging: the mean colour survives the resize
    source = raw[0]["observations"]["image"][0].astype(float)
    assert abs(frames[0]["image"].astype(float).mean() - source.mean()) < 4


def test_shuffled_stream_repeats_and_mixes_episodes(dataset, cache):
    _, path, _ = dataset
    data = RLDSDataset(_config(path, cache, shuffle=True, repeat=True, shuffle_buffer=64, seed=1))
    stream = iter(data)
    batches = [next(stream) for _ in range(40)]  # 200 frames from a 39-frame dataset: it repeats
    seen = [(b, int(t)) for batch in batches for b, t in zip(batch["instruction"], batch["timestep"])]
    assert len(set(seen)) == sum(1 for _ in _frames(RLDSDataset(_config(path, cache))))
    first = [(b, int(t)) for b, t in zip(batches[0]["instruction"], batches[0]["timestep"])]
    assert first != [(batches[0]["instruction"][0], t) for t in range(5)]  # not file order


def test_parallel_workers_read_disjoint_shares(dataset, cache):
    _, path, _ = dataset
    data = RLDSDataset(_config(path, cache, num_parallel_reads=2))
    shares = []
    for worker in range(2):
        frames = set()
        for batch in data.tf_dataset(worker=(2, worker)).as_numpy_iterator():
            frames.update(zip([s.decode() for s in batch["instruction"]], batch["timestep"].tolist()))
        shares.append(frames)
    everything = {(f["instruction"], int(f["timestep"])) for f in _frames(data)}
    assert shares[0] and shares[1] and not shares[0] & shares[1]
    assert shares[0] | shares[1] == everything


def test_action_chunks_pad_past_the_episode_end_with_a_mask(dataset, cache):
    _, path, raw = dataset
    data = RLDSDataset(_config(path, cache, action_chunk=4))
    stats = data.statistics[NAME]
    frames = _frames(data)
    assert frames[0]["action"].shape == (4, 7) and frames[0]["action_mask"].shape == (4,)
    ends = 0
    for frame in frames:
        actions = raw[_episode(frame["instruction"])]["actions"]
        t, length = int(frame["timestep"]), len(actions)
        index = np.minimum(np.arange(t, t + 4), length - 1)
        np.testing.assert_array_equal(frame["action_mask"], np.arange(t, t + 4) < length)
        np.testing.assert_allclose(frame["action"], normalize(actions[index], stats["action"]), atol=1e-6)
        ends += t == length - 1
    assert ends == len(raw)
    last = next(f for f in frames if int(f["timestep"]) == len(raw[_episode(f["instruction"])]["actions"]) - 1)
    assert last["action_mask"].tolist() == [True, False, False, False]


def test_hold_padding_trains_the_chunk_to_stand_still_past_the_end(dataset, cache, tmp_path):
    _, path, raw = dataset
    data = RLDSDataset(_config(path, cache, action_chunk=4, chunk_padding="hold"))
    stats = data.statistics[NAME]
    for frame in _frames(data):
        actions = raw[_episode(frame["instruction"])]["actions"]
        t, length = int(frame["timestep"]), len(actions)
        expected = actions[np.minimum(np.arange(t, t + 4), length - 1)].copy()
        expected[np.arange(t, t + 4) >= length, :6] = 0.0  # zero motion, the last gripper command kept
        np.testing.assert_allclose(frame["action"], normalize(expected, stats["action"]), atol=1e-6)
        assert frame["action_mask"].all()
    with pytest.raises(ValueError, match="chunk_padding 'zeros'"):
        RLDSDataset(_config(path, cache, action_chunk=4, chunk_padding="zeros"))

    # An episode that failed (or was driven by a policy and cut off) stops anywhere: standing still there is
    # nothing to learn, so its chunks past the end are masked out instead, as with "repeat".
    mixed, raw = write_platform_dataset(tmp_path, name=NAME + "_failures", num_episodes=4, length=6, image_size=IMAGE,
                                        seed=4, failed_episodes=(1, 3))
    checked = 0
    for frame in _frames(RLDSDataset(_config(mixed, cache, action_chunk=4, chunk_padding="hold"))):
        episode, t = _episode(frame["instruction"]), int(frame["timestep"])
        inside = np.arange(t, t + 4) < 6
        assert frame["action_mask"].tolist() == (inside.tolist() if episode in (1, 3) else [True] * 4)
        checked += episode in (1, 3) and not inside.all()
    assert checked == 6  # the last three frames of each failed episode


def test_continue_padding_trains_the_last_action_past_a_goal(dataset, cache, tmp_path):
    _, path, raw = dataset
    data = RLDSDataset(_config(path, cache, action_chunk=4, chunk_padding="continue"))
    stats = data.statistics[NAME]
    padded = 0
    for frame in _frames(data):
        actions = raw[_episode(frame["instruction"])]["actions"]
        t, length = int(frame["timestep"]), len(actions)
        expected = actions[np.minimum(np.arange(t, t + 4), length - 1)]  # the last action, motion and all
        np.testing.assert_allclose(frame["action"], normalize(expected, stats["action"]), atol=1e-6)
        assert frame["action_mask"].all()
        padded += t + 4 > length
    assert padded == 3 * len(raw)
    # failed episodes: masked past the end, as with "hold"
    mixed, _ = write_platform_dataset(tmp_path, name=NAME + "_failures", num_episodes=4, length=6, image_size=IMAGE,
                                      seed=4, failed_episodes=(1, 3))
    for frame in _frames(RLDSDataset(_config(mixed, cache, action_chunk=4, chunk_padding="continue"))):
        episode, t = _episode(frame["instruction"]), int(frame["timestep"])
        inside = np.arange(t, t + 4) < 6
        assert frame["action_mask"].tolist() == (inside.tolist() if episode in (1, 3) else [True] * 4)


def test_keyframe_states_are_the_state_at_the_next_gripper_change_or_the_end(dataset, cache):
    _, path, raw = dataset
    frames = _frames(RLDSDataset(_config(path, cache, keyframe_states=True)))
    checked_changes = 0
    for frame in frames:
        episode = raw[_episode(frame["instruction"])]
        gripper, states = episode["actions"][:, 6], episode["observations"]["state"]
        t, length = int(frame["timestep"]), len(gripper)
        key = next((j for j in range(max(t, 1), length) if abs(gripper[j] - gripper[j - 1]) > 0.5), length - 1)
        checked_changes += key < length - 1
        np.testing.assert_array_equal(frame["keyframe_state"], states[key])  # raw, not normalized
    assert checked_changes > 0 and len(frames) == sum(len(r["actions"]) for r in raw)
    assert "keyframe_state" not in _frames(RLDSDataset(_config(path, cache)))[0]


def test_augmentation_uses_openvla_settings_and_is_random(dataset, cache):
    _, path, _ = dataset
    assert (OPENVLA_AUGMENT.crop_scale, OPENVLA_AUGMENT.brightness, OPENVLA_AUGMENT.contrast,
            OPENVLA_AUGMENT.saturation, OPENVLA_AUGMENT.hue) == (0.9, 0.2, (0.8, 1.2), (0.8, 1.2), 0.05)
    plain = np.stack([f["image"] for f in _frames(RLDSDataset(_config(path, cache)))])
    augmented = RLDSDataset(_config(path, cache, augment=True))
    first, second = (np.stack([f["image"] for f in _frames(augmented)]) for _ in range(2))
    assert first.shape == plain.shape and first.dtype == np.uint8
    assert not np.array_equal(first, second)  # a new draw every pass
    assert not np.array_equal(first, plain)
    centered = RLDSDataset(_config(path, cache, center_crop=True))
    crop_a, crop_b = (np.stack([f["image"] for f in _frames(centered)]) for _ in range(2))
    np.testing.assert_array_equal(crop_a, crop_b)  # evaluation crop: deterministic
    assert not np.array_equal(crop_a, plain)


def test_center_crop_keeps_the_central_90_percent_of_the_area():
    import tensorflow as tf

    from embodied.data.transforms import decode_image

    # a 100x100 image whose value is the column index: the crop keeps columns ~2.6..97.4
    image = np.repeat(np.repeat(np.arange(100, dtype=np.uint8)[None, :, None], 100, 0), 3, 2)
    encoded = tf.io.encode_png(image)
    out = decode_image(encoded, (100, 100), center_crop=True).numpy().astype(float)
    side = np.sqrt(0.9)
    assert abs(out[:, 0, 0].mean() - (1 - side) / 2 * 99) < 1.0
    assert abs(out[:, -1, 0].mean() - (1 + side) / 2 * 99) < 1.0


def test_splits_without_a_validation_split_take_95_and_5_percent(tmp_path):
    assert resolve_split(["train"], "train") == "train[:95%]"
    assert resolve_split(["train"], "val") == "train[95%:]"
    assert resolve_split(["train", "validation"], "train") == "train"
    assert resolve_split(["train", "val"], "val") == "val"
    assert resolve_split(["train"], "train[:10]") == "train[:10]"
    path, raw = write_platform_dataset(tmp_path, name="embodied_split_test", num_episodes=20, length=2,
                                       image_size=4, episodes_per_shard=20)
    train, val = RLDSSource(path, split="train"), RLDSSource(path, split="val")
    assert (train.split, train.num_episodes, val.split, val.num_episodes) == ("train[:95%]", 19, "train[95%:]", 1)
    train_ids = {e["instruction"][0] for e in train.episodes()}
    val_ids = {e["instruction"][0] for e in val.episodes()}
    assert len(train_ids) == 19 and val_ids == {raw[-1]["instruction"]}
    tiny, _ = write_platform_dataset(tmp_path, name="embodied_tiny", num_episodes=2, length=2, image_size=4)
    with pytest.raises(EmptyDatasetError, match=r"train\[95%:\].*embodied_tiny.*no episodes"):
        RLDSSource(tiny, split="val")


def test_dataset_statistics_json_is_written_for_checkpoints(dataset, cache, tmp_path):
    _, path, _ = dataset
    data = RLDSDataset(_config(path, cache))
    written = data.save_statistics(tmp_path / "checkpoint")
    assert written.name == "dataset_statistics.json"
    loaded = load_dataset_statistics(tmp_path / "checkpoint")
    assert loaded[NAME]["action"]["q99"] == data.statistics[NAME]["action"]["q99"]
    assert json.loads(written.read_text())[NAME]["num_trajectories"] == 6
    # a loader given those statistics uses them instead of computing its own
    reused = RLDSDataset(_config(path, cache, statistics=str(written)))
    assert reused.statistics[NAME]["fingerprint"] == data.statistics[NAME]["fingerprint"]


def test_deterministic_stream_resumes_exactly_with_skip_frames(dataset, cache):
    _, path, _ = dataset
    settings = dict(shuffle=True, repeat=True, shuffle_buffer=16, seed=4, deterministic=True, augment=True,
                    batch_size=4)
    first = iter(RLDSDataset(_config(path, cache, **settings)))
    batches = [next(first) for _ in range(4)]  # 16 frames
    resumed = next(iter(RLDSDataset(_config(path, cache, skip_frames=8, **settings))))
    for key in ("image", "action", "timestep"):
        assert torch.equal(resumed[key], batches[2][key]), key  # same frames, same augmentation draws
    assert resumed["instruction"] == batches[2]["instruction"]
    assert not torch.equal(batches[0]["image"], batches[1]["image"])
