"""Weighted mixtures of datasets, balancing by frame count, and the named mixtures in config."""
from pathlib import Path

import numpy as np
import pytest

from embodied.data import MIXTURES, DataConfig, RLDSDataset, UnknownDatasetError, get_mixture, parse_datasets

CONF = Path(__file__).resolve().parents[1] / "embodied" / "conf"


@pytest.fixture(scope="module")
def two_datasets(tmp_path_factory):
    """A: 4 episodes x 5 steps (20 frames); B: 4 episodes x 15 steps (60 frames)."""
    from embodied.data.synthetic import write_platform_dataset

    root = tmp_path_factory.mktemp("mix")
    a, _ = write_platform_dataset(root, name="embodied_mix_a", num_episodes=4, length=5, image_size=4, seed=1)
    b, _ = write_platform_dataset(root, name="embodied_mix_b", num_episodes=4, length=15, image_size=4, seed=2)
    return root, str(a), str(b)


def _fraction_from_a(data, batches):
    stream = iter(data)
    names = [name for _ in range(batches) for name in next(stream)["dataset_name"]]
    return np.mean([name == "embodied_mix_a" for name in names]), len(names)


@pytest.mark.parametrize("balance, expected", [(False, 0.75), (True, 0.5)], ids=["weights", "balanced"])
def test_sampled_proportions_match_the_weights(two_datasets, tmp_path, balance, expected):
    root, a, b = two_datasets
    # weights 3:1; balanced by frame counts 3*20 : 1*60 = 1:1
    data = RLDSDataset(datasets=[(a, 3.0), {"name": b, "weight": 1.0}], split="train[:100%]", image_size=4,
                       batch_size=50, balance_weights=balance, shuffle_buffer=200, seed=5, show_progress=False,
                       statistics_cache_dir=str(tmp_path))
    np.testing.assert_allclose(data.weights, [expected, 1 - expected])
    fraction, n = _fraction_from_a(data, batches=12)
    sigma = np.sqrt(expected * (1 - expected) / n)
    assert abs(fraction - expected) < 4 * sigma, (fraction, expected, n)


def test_shared_statistics_normalize_every_dataset_with_the_first_ones(two_datasets, tmp_path):
    # e.g. DAgger data beside its demonstrations: one robot, one action scale; each keeps its own frame count
    from policy_helpers import tiny

    from embodied.data import normalize
    from policies.openvla import OpenVLAPolicy

    root, a, b = two_datasets
    config = dict(datasets=[a, b], split="train[:100%]", image_size=4, batch_size=80, shuffle=False, repeat=False,
                  balance_weights=True, statistics_cache_dir=str(tmp_path), show_progress=False)
    own, shared = RLDSDataset(**config), RLDSDataset(**config, shared_statistics=True)
    stats_a, stats_b = own.statistics["embodied_mix_a"], own.statistics["embodied_mix_b"]
    assert not np.allclose(stats_a["action"]["q99"], stats_b["action"]["q99"])
    assert shared.statistics["embodied_mix_b"]["action"] == stats_a["action"]
    assert shared.statistics["embodied_mix_b"]["num_transitions"] == stats_b["num_transitions"] == 60
    np.testing.assert_allclose(shared.weights, own.weights)  # balanced by each one's own frames: 20 : 60
    raw_b = {tuple(f["state"].round(5)): f for f in _raw_frames(b)}
    batch = next(iter(shared))
    rows = [i for i, name in enumerate(batch["dataset_name"]) if name == "embodied_mix_b"]
    for i in rows:
        expected = normalize(raw_b[tuple(batch["state"][i].numpy().round(5))]["action"], stats_a["action"])
        np.testing.assert_allclose(batch["action"][i].numpy(), expected, atol=1e-5)
    assert rows
    # a policy with such statistics needs no unnorm_key; with differing ones it must be told which
    processor = tiny(OpenVLAPolicy).processor
    processor.set_statistics(shared.statistics)
    assert processor.action_statistics() == stats_a["action"]
    processor.set_statistics(own.statistics)
    with pytest.raises(ValueError, match="pass unnorm_key= to pick"):
        processor.action_statistics()


def _raw_frames(path):
    from embodied.data import RLDSSource

    for episode in RLDSSource(path, split="train[:100%]").episodes():
        for t in range(len(episode["action"])):
            yield {"state": episode["state"][t], "action": episode["action"][t]}


def test_openvla_mixture_weights_are_published_facts():
    weights = dict(get_mixture("oxe_magic_soup_subset"))
    assert weights == {"fractal20220817_data": 0.54087122203, "kuka": 0.8341046294, "bridge_dataset": 1.0,
                       "taco_play": 2.0, "jaco_play": 1.0, "berkeley_autolab_ur5": 2.0, "language_table": 0.1}
    assert dict(get_mixture("bridge_rt_1")) == {"bridge_dataset": 1.0, "fractal20220817_data": 1.0}
    assert [name for name, _ in MIXTURES["sim_tabletop10"]] == ["embodied_tabletop10_mujoco",
                                                                "embodied_tabletop10_pybullet"]


def test_dataset_lists_and_bad_mixtures():
    assert parse_datasets("bridge_rt_1") == get_mixture("bridge_rt_1")
    assert parse_datasets("some/path") == [("some/path", 1.0)]
    assert parse_datasets(["x", ("y", 2)]) == [("x", 1.0), ("y", 2.0)]
    with pytest.raises(ValueError, match="'y' has weight 0"):
        parse_datasets([("y", 0)])
    with pytest.raises(UnknownDatasetError, match="unknown mixture 'soup'.*oxe_magic_soup_subset"):
        get_mixture("soup")


@pytest.mark.parametrize("name", ["sim_tabletop10", "sim_mujoco", "sim_tabletop10_chunked", "oxe_magic_soup_subset"])
def test_data_configs_compose_into_a_data_config(name):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONF / "data"), version_base="1.3"):
        cfg = compose(config_name=name)
    from omegaconf import OmegaConf

    config = DataConfig.from_dict(OmegaConf.to_container(cfg, resolve=True))
    assert parse_datasets(config.datasets)
    if name == "sim_tabletop10_chunked":
        assert config.action_chunk == 8
    if name == "oxe_magic_soup_subset":
        assert config.balance_weights and config.augment
    with pytest.raises(ValueError, match="unknown data config key.*'batchsize'"):
        DataConfig.from_dict({**OmegaConf.to_container(cfg), "batchsize": 3})
