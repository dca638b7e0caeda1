"""Data-loading throughput: frames/s into torch batches, against bare tfds iteration of the same shards.

    python benchmarks/data_loading.py                       # 224x224 JPEG, batch 32
    python benchmarks/data_loading.py --episodes 20 --steps 40 --batches 30 --compute-ms 200

Writes a synthetic dataset in the platform's RLDS layout (JPEG images, as OXE and
`embodied.collect` store them), then measures in one run:

1. baseline: bare tensorflow-datasets iteration of the same shards (`builder.as_dataset`,
   steps flattened, images decoded, batched, numpy);
2. `RLDSDataset` without augmentation (decode, resize to the policy size, normalize, shuffle
   buffer, torch tensors) and with OpenVLA's augmentation;
3. a training-like loop with a fixed compute per batch (a torch matmul chain calibrated to
   `--compute-ms`): the fraction of wall time spent waiting for the next batch.

Prints each pipeline's median frames/s over alternating rounds and its ratio to the baseline
(goal >= 1.0x), and the waiting fraction (goal < 5%). CPU-only figures depend on how many
cores are free; on a shared machine, compare only figures from one run.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import numpy as np  # noqa: E402


def write_dataset(root: Path, episodes: int, steps: int, size: int) -> Path:
    from embodied.data.rlds_writer import RLDSWriter, episode_features, make_episode

    rng = np.random.default_rng(0)
    features = episode_features(size, image_encoding="jpeg")
    # smooth images (a gradient plus noise) compress like camera frames, unlike white noise
    yy, xx = np.mgrid[0:size, 0:size]
    base = np.stack([xx, yy, (xx + yy) // 2], -1).astype(np.int16) * 255 // size
    with RLDSWriter(root, "embodied_benchmark", features, max_shard_bytes=8 * 2**20, overwrite=True) as writer:
        for e in range(episodes):
            images = np.clip(base[None] + rng.integers(-20, 20, size=(steps, size, size, 3)), 0, 255).astype(np.uint8)
            obs = {"image": images, "state": rng.normal(size=(steps, 8)).astype(np.float32)}
            actions = rng.normal(scale=0.02, size=(steps, 7)).astype(np.float32)
            actions[:, 6] = rng.integers(0, 2, steps)
            meta = {"episode_id": e, "task": "Benchmark", "suite": "benchmark", "backend": "none", "seed": e,
                    "randomization": {}, "control_hz": 10.0}
            writer.write(make_episode(obs, actions, f"task {e}", meta))
    return writer.builder_dir


def bare_tfds(path: Path, batch_size: int):
    """Plain tfds: episodes → steps → decoded images → batches (numpy)."""
    from embodied.data._tensorflow import tf, tfds

    tf = tf()
    builder = tfds().builder_from_directory(str(path))
    dataset = builder.as_dataset(split="train", shuffle_files=True).repeat()
    dataset = dataset.flat_map(lambda episode: episode["steps"])
    dataset = dataset.map(lambda s: {"image": s["observation"]["image"], "state": s["observation"]["state"],
                                     "action": s["action"], "language_instruction": s["language_instruction"]},
                          num_parallel_calls=tf.data.AUTOTUNE)
    return dataset.batch(batch_size).prefetch(tf.data.AUTOTUNE).as_numpy_iterator()


def loader(path: Path, batch_size: int, size: int, augment: bool, cache: str):
    from embodied.data import RLDSDataset

    data = RLDSDataset(datasets=str(path), split="train[:100%]", image_size=size, batch_size=batch_size,
                       augment=augment, shuffle_buffer=2000, statistics_cache_dir=cache, show_progress=False)
    return iter(data)


def _rate(iterator, batch_size: int, frames_wanted: int) -> float:
    batches = max(1, frames_wanted // batch_size)
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * batch_size / (time.perf_counter() - start)


def throughput(iterators: dict, batch_size: int, frames: int, rounds: int) -> dict:
    """Median frames/s of each iterator over `rounds` rounds, measured in turn (never concurrently)."""
    for iterator in iterators.values():
        for _ in range(3):  # warm-up: pipeline start, buffers filling
            next(iterator)
    rates = {name: [] for name in iterators}
    for r in range(rounds):
        order = list(iterators) if r % 2 == 0 else list(reversed(iterators))
        for name in order:
            rates[name].append(_rate(iterators[name], batch_size, frames))
    return {name: float(np.median(values)) for name, values in rates.items()}


def training_loop(path: Path, batch_size: int, batches: int, compute_ms: float, size: int, cache: str) -> dict:
    """Fixed compute per batch; the share of wall time spent in next(batch)."""
    import torch

    from embodied.data import RLDSDataset

    weights = torch.randn(512, 512)
    x = torch.randn(256, 512)

    def compute(reps):
        y = x
        for _ in range(reps):
            y = torch.tanh(y @ weights)
        return y

    start = time.perf_counter()
    compute(50)
    reps = max(1, int(50 * compute_ms / 1000 / (time.perf_counter() - start)))
    data = RLDSDataset(datasets=str(path), split="train[:100%]", image_size=size, batch_size=batch_size,
                       shuffle_buffer=2000, statistics_cache_dir=cache, show_progress=False)
    iterator = iter(data)
    for _ in range(3):
        next(iterator)
    waiting = 0.0
    start = time.perf_counter()
    for _ in range(batches):
        t = time.perf_counter()
        batch = next(iterator)
        waiting += time.perf_counter() - t
        compute(reps)
        del batch
    total = time.perf_counter() - start
    return {"wait_fraction": waiting / total, "step_ms": 1000 * total / batches,
            "compute_ms": 1000 * (total - waiting) / batches}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--episodes", type=int, default=24)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--frames", type=int, default=960, help="frames timed per measurement")
    parser.add_argument("--rounds", type=int, default=3, help="alternating measurement rounds (median)")
    parser.add_argument("--batches", type=int, default=40, help="batches in the training-like loop")
    parser.add_argument("--compute-ms", type=float, default=400.0, help="fixed compute per batch")
    parser.add_argument("--data-dir", default=None, help="reuse/keep the dataset here (default: a temp dir)")
    args = parser.parse_args()

    root = Path(args.data_dir or tempfile.mkdtemp(prefix="embodied_bench_"))
    cache = str(root / "stats_cache")
    start = time.perf_counter()
    path = write_dataset(root, args.episodes, args.steps, args.image_size)
    print(f"dataset: {args.episodes} episodes x {args.steps} steps, {args.image_size}px JPEG at {path} "
          f"({time.perf_counter() - start:.1f}s to write); cpu cores: {os.cpu_count()}")

    iterators = {"bare tfds iteration (baseline)": bare_tfds(path, args.batch_size),
                 "RLDSDataset -> torch, no augmentation": loader(path, args.batch_size, args.image_size, False, cache),
                 "RLDSDataset -> torch, augmentation": loader(path, args.batch_size, args.image_size, True, cache)}
    rates = throughput(iterators, args.batch_size, args.frames, args.rounds)
    base = rates["bare tfds iteration (baseline)"]
    for name, rate in rates.items():
        print(f"{name:40s} {rate:8.1f} frames/s   {rate / base:5.2f}x baseline")
    del iterators
    loop = training_loop(path, args.batch_size, args.batches, args.compute_ms, args.image_size, cache)
    print(f"training-like loop, {args.compute_ms:.0f} ms compute/batch: waiting for data "
          f"{100 * loop['wait_fraction']:.1f}% of wall time (step {loop['step_ms']:.0f} ms)")


if __name__ == "__main__":
    main()
