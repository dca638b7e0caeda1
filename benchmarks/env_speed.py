"""Environment steps per second with 224x224 rendering, against the bare engine loop.

    python benchmarks/env_speed.py [--steps 200] [--task PickCube] [--image-size 224]

For each engine, on the same scene in the same run:
  env  : TabletopEnv.step (action checks, IK, physics sub-steps, state, one render)
  raw  : the same number of physics sub-steps per control step + one render, bare engine
         calls (mj_step + mujoco.Renderer / stepSimulation + getCameraImage)
Goal: env >= 0.8x raw. Then AsyncVectorEnv with 2 workers against 1 (goal >= 1.8x).
"""
from __future__ import annotations

import argparse
import functools
import time

import numpy as np

from envs.rendering import configure_mujoco_gl

configure_mujoco_gl()

from envs.env import TabletopEnv  # noqa: E402


def actions(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    a = rng.uniform(-0.01, 0.01, size=(n, 7)).astype(np.float32)
    a[:, 3:6] = 0.0
    a[:, 6] = 1.0
    return a


def time_env(env: TabletopEnv, acts: np.ndarray) -> float:
    env.reset(seed=0)
    start = time.perf_counter()
    for a in acts:
        env.step(a)
    return len(acts) / (time.perf_counter() - start)


def time_raw_mujoco(env: TabletopEnv, n: int) -> float:
    import mujoco

    sim = env.sim
    model, data = sim.model, sim.data
    h, w = sim.image_size
    renderer = mujoco.Renderer(model, height=h, width=w)
    camera = sim._front_cam
    start = time.perf_counter()
    for _ in range(n):
        for _ in range(sim.substeps):
            mujoco.mj_step(model, data)
        renderer.update_scene(data, camera=camera)
        renderer.render()
    elapsed = time.perf_counter() - start
    renderer.close()
    return n / elapsed


def time_raw_pybullet(env: TabletopEnv, n: int) -> float:
    import pybullet as p

    sim = env.sim
    kwargs = sim.camera_args("front")
    start = time.perf_counter()
    for _ in range(n):
        for _ in range(sim.n_substeps):
            p.stepSimulation(physicsClientId=sim.client)
        p.getCameraImage(**kwargs)
    return n / (time.perf_counter() - start)


def time_vector(task: str, backend: str, num_envs: int, steps: int, image_size: int) -> float:
    import gymnasium as gym

    from embodied.evaluation import EvalConfig, _make_env

    # The evaluation harness's own settings (forkserver workers, observations through the pipes),
    # with an async vector env even for one worker, so that both sides pay the same overheads.
    cfg = EvalConfig(backend=backend, image_size=image_size, randomization="none")
    vec = gym.vector.AsyncVectorEnv([functools.partial(_make_env, task, cfg) for _ in range(num_envs)],
                                    shared_memory=False, context="forkserver")
    try:
        vec.reset(seed=list(range(num_envs)))
        acts = actions(steps + 5)
        for a in acts[:5]:  # warm up the workers
            vec.step(np.repeat(a[None], num_envs, 0))
        start = time.perf_counter()
        for a in acts[5:]:
            vec.step(np.repeat(a[None], num_envs, 0))
        return num_envs * steps / (time.perf_counter() - start)
    finally:
        vec.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--task", default="PickCube")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--backends", nargs="+", default=["mujoco", "pybullet"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    print(f"task {args.task}, {args.image_size}x{args.image_size} rendering, {args.steps} control steps, "
          f"best of {args.repeats}")
    for backend in args.backends:
        env = TabletopEnv(args.task, backend=backend, image_size=args.image_size, randomization="none")
        raw_fn = time_raw_mujoco if backend == "mujoco" else time_raw_pybullet
        acts = actions(args.steps)
        env_sps, raw_sps = [], []
        for _ in range(args.repeats):  # interleaved, so load changes hit both alike
            env_sps.append(time_env(env, acts))
            env.reset(seed=0)
            raw_sps.append(raw_fn(env, args.steps))
        env.close()
        e, r = max(env_sps), max(raw_sps)
        print(f"{backend:9s} env {e:7.1f} steps/s | raw {r:7.1f} steps/s | ratio {e / r:.2f}x (goal >= 0.8x)")
    for backend in args.backends:
        one = time_vector(args.task, backend, 1, args.steps, args.image_size)
        two = time_vector(args.task, backend, 2, args.steps, args.image_size)
        print(f"{backend:9s} AsyncVectorEnv 1 worker {one:7.1f} steps/s | 2 workers {two:7.1f} steps/s | "
              f"ratio {two / one:.2f}x (goal >= 1.8x)")


if __name__ == "__main__":
    main()
