"""Normalization statistics (against numpy), their fingerprint-keyed cache, and the normalization modes."""
import numpy as np
import pytest

from embodied.data import NormalizationMode, RLDSSource, normalize, unnormalize
from embodied.data.statistics import compute_statistics
from embodied.data.synthetic import write_platform_dataset


@pytest.fixture(scope="module")
def source_and_raw(tmp_path_factory):
    root = tmp_path_factory.mktemp("stats")
    path, raw = write_platform_dataset(root, name="embodied_stats", num_episodes=5, length=(3, 12), image_size=4,
                                       episodes_per_shard=5, seed=11)
    return RLDSSource(path, split="train[:100%]"), raw


def test_statistics_match_numpy(source_and_raw):
    source, raw = source_and_raw
    stats = source.compute_statistics(show_progress=False)
    actions = np.concatenate([r["actions"] for r in raw]).astype(np.float64)
    states = np.concatenate([r["observations"]["state"] for r in raw]).astype(np.float64)
    for key, values in (("action", actions), ("proprio", states)):
        entry = stats[key]
        for name, reference in (("mean", values.mean(0)), ("std", values.std(0)), ("min", values.min(0)),
                                ("max", values.max(0)), ("q01", np.quantile(values, 0.01, axis=0)),
                                ("q99", np.quantile(values, 0.99, axis=0))):
            np.testing.assert_allclose(entry[name], reference, rtol=1e-6, atol=1e-7, err_msg=f"{key} {name}")
    assert stats["action"]["mask"] == [True] * 6 + [False]  # the gripper is not normalized
    assert stats["num_transitions"] == len(actions) and stats["num_trajectories"] == len(raw)


def test_statistics_are_cached_by_dataset_fingerprint(source_and_raw, tmp_path, monkeypatch):
    source, _ = source_and_raw
    first = source.statistics(tmp_path, show_progress=False)
    cached = tmp_path / f"embodied_stats_{first['fingerprint']}.json"
    assert cached.exists()

    def fail(*args, **kwargs):
        raise AssertionError("statistics were recomputed despite the cache")

    monkeypatch.setattr(RLDSSource, "compute_statistics", fail)
    again = RLDSSource(source.builder_dir, split="train[:100%]").statistics(tmp_path, show_progress=False)
    assert again == first
    # another split (or a changed dataset) is another fingerprint, hence a miss
    other = RLDSSource(source.builder_dir, split="train[:60%]")
    assert other.fingerprint() != source.fingerprint()
    with pytest.raises(AssertionError, match="recomputed"):
        other.statistics(tmp_path, show_progress=False)


def _stats(rng):
    values = rng.normal(size=(500, 7)).astype(np.float32)
    values[:, 6] = rng.integers(0, 2, 500)
    values[:, 5] = 0.25  # an unused dimension: min == max
    return compute_statistics(values, rng.normal(size=(500, 8)), num_trajectories=10)["action"], values


@pytest.mark.parametrize("mode", list(NormalizationMode))
def test_normalize_unnormalize_round_trip(mode):
    entry, values = _stats(np.random.default_rng(0))
    normalized = normalize(values, entry, mode)
    np.testing.assert_array_equal(normalized[:, 6], values[:, 6])  # the gripper passes through
    low, high = {NormalizationMode.BOUNDS_Q99: ("q01", "q99"), NormalizationMode.BOUNDS: ("min", "max")}.get(
        mode, (None, None))
    if low:
        assert normalized.min() >= -1 and normalized.max() <= 1
        np.testing.assert_array_equal(normalized[:, 5], 0.0)  # min == max maps to 0
        inside = np.all((values[:, :5] >= np.asarray(entry[low])[:5]) & (values[:, :5] <= np.asarray(entry[high])[:5]),
                        axis=1)
    else:
        inside = np.ones(len(values), bool)
    restored = unnormalize(normalized, entry, mode)
    np.testing.assert_allclose(restored[inside][:, :5], values[inside][:, :5], atol=1e-5)
    np.testing.assert_array_equal(restored[:, 6], values[:, 6])
    # a gripper that never closes (a reach-only dataset) still passes through: 1 = open, not 0 = closed
    values[:, 6] = 1.0
    entry = compute_statistics(values, np.zeros((500, 8), np.float32), num_trajectories=10)["action"]
    np.testing.assert_array_equal(normalize(values, entry, mode)[:, 6], 1.0)
    np.testing.assert_array_equal(unnormalize(normalize(values, entry, mode), entry, mode)[:, 6], 1.0)


def test_bounds_q99_is_openvlas_formula_and_clips():
    entry, _ = _stats(np.random.default_rng(1))
    q01, q99 = np.asarray(entry["q01"], np.float32), np.asarray(entry["q99"], np.float32)
    x = np.stack([q01, q99, (q01 + q99) / 2, q99 + 10, q01 - 10])
    out = normalize(x, entry)  # BOUNDS_Q99 is the default
    np.testing.assert_allclose(out[:, :5], [[-1] * 5, [1] * 5, [0] * 5, [1] * 5, [-1] * 5], atol=1e-5)
    expected = np.clip(2 * (x - q01) / (q99 - q01 + 1e-8) - 1, -1, 1)
    np.testing.assert_allclose(out[:, :5], expected[:, :5], atol=1e-6)
    np.testing.assert_allclose(unnormalize(np.zeros(7), entry)[:5], (0.5 * (q99 - q01) + q01)[:5], atol=1e-6)


def test_tensorflow_normalization_matches_numpy():
    from embodied.data.transforms import normalize_tf

    entry, values = _stats(np.random.default_rng(2))
    for mode in NormalizationMode:
        np.testing.assert_allclose(normalize_tf(values, entry, mode).numpy(), normalize(values, entry, mode),
                                   atol=1e-6)


def test_unknown_normalization_mode_lists_the_valid_ones():
    with pytest.raises(ValueError, match="minmax.*bounds_q99, bounds, normal"):
        NormalizationMode.parse("minmax")
