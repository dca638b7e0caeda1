"""Bad input: missing directories and shards, truncated and corrupt shards, datasets with no frames."""
import logging
import shutil

import pytest

from embodied.data import CorruptShardError, DatasetNotFoundError, EmptyDatasetError, RLDSDataset, RLDSSource
from embodied.data.synthetic import write_platform_dataset, write_synthetic_dataset

NAME = "embodied_damaged"


@pytest.fixture(scope="module")
def healthy(tmp_path_factory):
    """6 episodes of 5 steps, 2 per shard."""
    root = tmp_path_factory.mktemp("healthy")
    path, _ = write_platform_dataset(root, name=NAME, num_episodes=6, length=5, image_size=8, episodes_per_shard=2)
    return path


def _damaged_copy(healthy, tmp_path, damage):
    copy = tmp_path / NAME / "1.0.0"
    shutil.copytree(healthy, copy)
    shard = copy / f"{NAME}-train.tfrecord-00001-of-00003"
    data = bytearray(shard.read_bytes())
    shard.write_bytes(damage(data))
    return copy, shard


def truncate(data):
    return data[: len(data) * 3 // 4]  # the second record loses its tail


def corrupt(data):
    middle = len(data) // 4  # inside the first record's payload: its CRC no longer matches
    data[middle:middle + 8] = bytes(255 - b for b in data[middle:middle + 8])
    return data


def test_missing_directory_names_the_path(tmp_path):
    missing = tmp_path / "nowhere" / "my_dataset"
    with pytest.raises(DatasetNotFoundError, match=str(missing)):
        RLDSSource(missing)
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "bridge_dataset")):
        RLDSSource("bridge_dataset", data_dir=tmp_path)
    with pytest.raises(DatasetNotFoundError, match=str(tmp_path / "nowhere")):
        RLDSDataset(datasets=str(tmp_path / "nowhere"), show_progress=False)
    (tmp_path / "empty_dir").mkdir()
    with pytest.raises(DatasetNotFoundError, match=f"{tmp_path / 'empty_dir'}.*no dataset_info.json"):
        RLDSSource(tmp_path / "empty_dir")


def test_missing_shard_file_names_the_file(healthy, tmp_path):
    copy = tmp_path / NAME / "1.0.0"
    shutil.copytree(healthy, copy)
    (copy / f"{NAME}-train.tfrecord-00002-of-00003").unlink()
    with pytest.raises(DatasetNotFoundError, match=f"{NAME}-train.tfrecord-00002-of-00003"):
        RLDSSource(copy)


@pytest.mark.parametrize("damage, lost", [(truncate, 1), (corrupt, 2)], ids=["truncated", "corrupt"])
def test_damaged_shard_errors_naming_the_file(healthy, tmp_path, damage, lost):
    copy, shard = _damaged_copy(healthy, tmp_path, damage)
    with pytest.raises(CorruptShardError) as error:
        list(RLDSSource(copy, split="train[:100%]").episodes())
    assert str(shard) in str(error.value) and "skip_bad_records" in str(error.value)
    assert error.value.records_read == 2 - lost and error.value.records_expected == 2
    # the loader fails the same way (while computing its statistics, before the first batch)
    with pytest.raises(CorruptShardError, match=str(shard)):
        RLDSDataset(datasets=str(copy), split="train[:100%]", image_size=8, show_progress=False,
                    statistics_cache_dir=str(tmp_path / "cache"))


@pytest.mark.parametrize("damage, lost", [(truncate, 1), (corrupt, 2)], ids=["truncated", "corrupt"])
def test_skip_bad_records_reads_the_rest_and_reports_the_count(healthy, tmp_path, caplog, damage, lost):
    copy, shard = _damaged_copy(healthy, tmp_path, damage)
    source = RLDSSource(copy, split="train[:100%]", skip_bad_records=True)
    assert len(list(source.episodes())) == 6 - lost
    assert source.report.skipped == lost and source.report.shards == {str(shard): lost}
    data = RLDSDataset(datasets=str(copy), split="train[:100%]", image_size=8, batch_size=4, shuffle=False,
                       repeat=False, skip_bad_records=True, show_progress=False,
                       statistics_cache_dir=str(tmp_path / "cache"))
    assert data.statistics[NAME]["num_trajectories"] == 6 - lost
    with caplog.at_level(logging.WARNING, logger="embodied.data.reader"):
        frames = sum(len(batch["instruction"]) for batch in data)
    assert frames == 5 * (6 - lost)
    assert data.skipped_records == lost
    summary = caplog.records[-1].getMessage()  # reported once the stream ends
    assert summary == f"skipped {lost} bad record(s) in 1 shard(s): {shard.name} ({lost})"


def test_nothing_yields_zero_frames_silently(tmp_path):
    # bridge drops its first and last steps: 2-step episodes leave nothing to train on
    write_synthetic_dataset("bridge_dataset", tmp_path, num_episodes=2, length=2)
    with pytest.raises(EmptyDatasetError, match="bridge_dataset.*yielded no frames"):
        RLDSSource("bridge_dataset", data_dir=tmp_path, split="train[:100%]").compute_statistics(show_progress=False)
