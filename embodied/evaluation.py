"""The evaluation harness: a policy on a named suite, through gymnasium vector envs.

Writes `results.json` (the platform's results schema, Wilson 95% intervals, versions),
`results.md`, `success_rates.png`, `episodes.jsonl` and videos of the first episodes.
"""
from __future__ import annotations

import functools

import json
import math
import os
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, Protocol

import numpy as np
from tqdm.auto import tqdm

from envs.suites import get_suite
from policies.action_chunks import ActionChunkQueue


class VectorPolicy(Protocol):
    """What the harness needs of a policy: batched observations in, (N, 7) actions out."""

    name: str

    def reset(self, env_indices: list[int]) -> None: ...

    def act(self, observations: dict[str, Any], envs) -> np.ndarray: ...


class ScriptedPolicy:
    """The task's state-based expert, run inside each env worker (it needs privileged state)."""

    name = "scripted"

    def reset(self, env_indices):
        pass

    def act(self, observations, envs):
        return np.stack(envs.call("expert_action")).astype(np.float32)


class RandomPolicy:
    """Uniform random actions within the action bounds, seeded."""

    name = "random"

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)

    def reset(self, env_indices):
        pass

    def act(self, observations, envs):
        space = envs.single_action_space
        n = envs.num_envs
        return self.rng.uniform(space.low, space.high, size=(n, *space.shape)).astype(np.float32)


class CheckpointPolicy:
    """A trained policy driving N envs: one batched forward pass for every env that needs actions.

    A chunked policy (K actions per prediction) runs the first `n_action_steps` of each chunk open-loop
    (all K by default, as OpenVLA-OFT does; fewer re-plans more often, like LeRobot's n_action_steps), or
    averages overlapping chunks (`temporal_ensemble_coeff`); each env keeps its own queue, emptied when that
    env starts a new episode.
    """

    def __init__(self, policy, name: str | None = None):
        self.policy = policy
        self.name = name or str(getattr(policy, "name_or_path", type(policy).__name__))
        config = getattr(policy, "config", None)  # its settings were checked when it was built or loaded
        self.actions = ActionChunkQueue.for_config(config)  # one stream per env
        # a policy whose gripper switches from its current state is told each env's last command
        self.switches_gripper = getattr(config, "gripper_switch_threshold", None) is not None

    def reset(self, env_indices):
        self.actions.reset(env_indices)

    def act(self, observations, envs):
        n = envs.num_envs
        need = self.actions.needing(range(n))
        if need:
            batch = [{key: observations[key][i] for key in ("image", "wrist_image", "state") if key in observations}
                     for i in need]
            states = observations.get("state")
            instructions = [self.actions.prompt_for_state(i, str(observations["instruction"][i]),
                                                          None if states is None else states[i]) for i in need]
            extra = {"gripper_state": self.actions.gripper_state(need)} if self.switches_gripper else {}
            if hasattr(self.policy, "predict_actions_and_clause_done"):
                predicted, done = self.policy.predict_actions_and_clause_done(batch, instructions, **extra)
            else:
                predicted, done = self.policy.predict_actions(batch, instructions, **extra), None
            predicted = np.asarray(predicted)
            if predicted.ndim == 2:  # (B, 7): one action per prediction
                predicted = predicted[:, None]
            for row, i in enumerate(need):
                self.actions.fill(i, predicted[row])
                if done is not None:
                    self.actions.clause_done(i, float(done[row]))
        return np.stack([self.actions.pop(i) for i in range(n)]).astype(np.float32)


def resolve_tasks(cfg) -> list[str]:
    """The tasks a run covers (its `tasks`, else the suite's), after checking backend, suite and counts.

    `cfg` is any config with `suite`, `backend`, `tasks` and `episodes_per_task` (eval or collect).
    """
    from envs.backends import BACKENDS

    if cfg.backend not in BACKENDS:
        raise ValueError(f"unknown backend {cfg.backend!r}; valid backends: {', '.join(BACKENDS)}")
    suite = get_suite(cfg.suite)
    tasks = list(cfg.tasks) if cfg.tasks else list(suite.tasks)
    for task in tasks:
        if task not in suite.tasks:
            raise ValueError(f"task {task!r} is not in suite {suite.name!r}; its tasks: {', '.join(suite.tasks)}")
    if cfg.episodes_per_task < 1:
        raise ValueError(f"episodes_per_task must be >= 1, got {cfg.episodes_per_task}")
    return tasks


def make_eval_policy(spec: str, seed: int = 0, device: str = "cpu", n_action_steps: int | None = None,
                     binarize_gripper: bool | None = None, gripper_threshold: float | None = None,
                     gripper_switch_threshold: float | None = None,
                     temporal_ensemble_coeff: float | None = None, instruction_clauses: bool | None = None,
                     clause_hold_tolerance: float | None = None, clause_still_steps: int | None = None,
                     clause_done_threshold: float | None = None,
                     clause_release_opening: float | None = None) -> VectorPolicy:
    """`scripted`, `random`, or a checkpoint directory / hub id (any policy `policies` can load).

    `n_action_steps`, `binarize_gripper`, `gripper_threshold`, `gripper_switch_threshold`,
    `temporal_ensemble_coeff`, `instruction_clauses`, `clause_hold_tolerance`, `clause_still_steps`,
    `clause_done_threshold` and `clause_release_opening` override a checkpoint's own settings when not None.
    """
    if spec == "scripted":
        return ScriptedPolicy()
    if spec == "random":
        return RandomPolicy(seed)
    import policies

    given = {"n_action_steps": (int, n_action_steps), "binarize_gripper": (bool, binarize_gripper),
             "gripper_threshold": (float, gripper_threshold),
             "gripper_switch_threshold": (float, gripper_switch_threshold),
             "temporal_ensemble_coeff": (float, temporal_ensemble_coeff),
             "instruction_clauses": (bool, instruction_clauses), "clause_hold_tolerance": (float, clause_hold_tolerance),
             "clause_still_steps": (int, clause_still_steps), "clause_done_threshold": (float, clause_done_threshold),
             "clause_release_opening": (float, clause_release_opening)}
    overrides = {key: cast(value) for key, (cast, value) in given.items() if value is not None}
    try:
        policy = policies.load_pretrained(spec, device=device, **overrides)
    except (FileNotFoundError, OSError) as error:
        raise FileNotFoundError(f"policy {spec!r} is neither 'scripted', 'random' nor a loadable checkpoint: "
                                f"{error}") from error
    return CheckpointPolicy(policy, name=spec)


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion."""
    if trials == 0:
        return (0.0, 1.0)
    p = successes / trials
    denom = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denom
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denom
    low = 0.0 if successes == 0 else max(0.0, centre - half)  # exact ends: rounding leaves 1 - 1e-16
    return (low, 1.0 if successes == trials else min(1.0, centre + half))


def package_versions() -> dict[str, str]:
    versions = {}
    for package in ("embodied", "mujoco", "pybullet", "gymnasium", "numpy", "torch", "transformers"):
        try:
            versions[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            versions[package] = "not installed"
    return versions


@dataclass
class EvalConfig:
    suite: str = "tabletop10"
    backend: str = "mujoco"
    episodes_per_task: int = 10
    tasks: list[str] | None = None
    num_envs: int = 2
    seed: int = 0
    randomization: Any = "default"
    image_size: int = 224
    wrist_camera: bool = False
    videos_per_task: int = 1
    record_actions: bool = False  # keep every episode's first frame, first state and actions (for imagined replays)
    vector: str = "async"  # "async" (one process per env) or "sync"
    env_kwargs: dict = field(default_factory=dict)


def _make_env(task: str, cfg: EvalConfig):
    import envs  # registers the ids in worker processes

    return envs.make_env(task, backend=cfg.backend, randomization=cfg.randomization, image_size=cfg.image_size,
                         wrist_camera=cfg.wrist_camera, **cfg.env_kwargs)


def make_vector_env(task: str, cfg: EvalConfig, num_envs: int):
    import gymnasium as gym
    from gymnasium.vector import AutoresetMode

    fns = [functools.partial(_make_env, task, cfg) for _ in range(num_envs)]
    if cfg.vector == "sync" or num_envs == 1:
        return gym.vector.SyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED)
    # gymnasium's shared memory cannot hold Text spaces (instructions come back as placeholder
    # characters), so observations travel through the pipes.
    # Workers start from a fresh forkserver process, never by forking this one: a process that has
    # already opened a GL context (a MuJoCo renderer) deadlocks its forked children's renderers.
    return gym.vector.AsyncVectorEnv(fns, autoreset_mode=AutoresetMode.DISABLED, shared_memory=False,
                                     context="forkserver")


class _Episode:
    """An episode running in one env slot."""

    def __init__(self, episode: int, seed: int, obs: dict, row: int, cfg: EvalConfig):
        self.episode, self.seed, self.length = episode, seed, 0
        self.instruction = str(obs["instruction"][row])
        self.frames = [obs["image"][row].copy()] if episode < cfg.videos_per_task else None
        self.initial_frame = obs["image"][row].copy() if cfg.record_actions else None
        self.initial_state = obs["state"][row].copy() if cfg.record_actions else None
        self.actions: list[np.ndarray] | None = [] if cfg.record_actions else None

    def record(self, task: str, success: bool, stages: dict[str, bool]) -> dict:
        record = {"task": task, "episode": self.episode, "seed": int(self.seed), "success": success,
                  "length": self.length, "instruction": self.instruction, "stages": stages, "frames": self.frames}
        if self.actions is not None:
            record["initial_frame"], record["actions"] = self.initial_frame, np.stack(self.actions)
            record["initial_state"] = self.initial_state
        return record


def run_task(task: str, policy: VectorPolicy, cfg: EvalConfig, seeds: list[int], progress=None,
             envs=None) -> list[dict]:
    """Run one episode per seed; episodes are refilled into whichever env finishes first.

    `envs`: a running vector env to reuse, switched to `task` (`TabletopEnv.set_task`); by default
    one is started here.
    """
    own = envs is None
    if own:
        envs = make_vector_env(task, cfg, max(1, min(cfg.num_envs, len(seeds))))
    queue = list(enumerate(seeds))
    records: list[dict] = []
    slots: list[_Episode | None] = [None] * envs.num_envs
    env_ids = list(range(envs.num_envs))
    try:
        envs.call("set_task", task)

        def start(mask: np.ndarray | None) -> dict:
            """Reset the masked envs (all if None): new episodes while seeds last, else idle."""
            rows = env_ids if mask is None else [int(i) for i in np.flatnonzero(mask)]
            fresh = {i: queue.pop(0) for i in rows if queue}
            seed_arg = [int(fresh[i][1]) if i in fresh else None for i in env_ids]
            # With autoreset disabled, envs outside the mask keep their last observation. An idle env
            # is stepped with the others and reset (unrecorded) when it finishes, so that a
            # SyncVectorEnv, which refuses to step a finished env, keeps going.
            obs, _ = envs.reset(seed=seed_arg, options=None if mask is None else {"reset_mask": mask})
            for i in rows:
                slots[i] = _Episode(*fresh[i], obs, i, cfg) if i in fresh else None
            policy.reset(rows)
            return obs

        obs = start(None)
        while any(slot is not None for slot in slots):
            actions = policy.act(obs, envs)
            obs, _, terminated, truncated, infos = envs.step(actions)
            finished = terminated | truncated
            for i, slot in enumerate(slots):
                if slot is None:
                    continue
                slot.length += 1
                if slot.actions is not None:
                    slot.actions.append(np.asarray(actions[i], np.float32).copy())
                if slot.frames is not None:
                    slot.frames.append(obs["image"][i].copy())
                if finished[i]:
                    stages = {name: bool(flags[i]) for name, flags in infos.get("stages", {}).items()
                              if not name.startswith("_")}
                    records.append(slot.record(task, bool(terminated[i]), stages))
                    if progress is not None:
                        progress.update(1)
            if finished.any():
                obs = start(finished)
    finally:
        if own:
            envs.close()
    records.sort(key=lambda r: r["episode"])
    return records


def summarize(records: list[dict], tasks: list[str]) -> dict:
    out = {}
    for task in tasks:
        rs = [r for r in records if r["task"] == task]
        wins = sum(r["success"] for r in rs)
        out[task] = {"success_rate": wins / len(rs) if rs else 0.0, "ci95": list(wilson_interval(wins, len(rs))),
                     "episodes": len(rs), "mean_length": float(np.mean([r["length"] for r in rs])) if rs else 0.0}
        stage_names = list(rs[0].get("stages", {})) if rs else []
        if stage_names:  # the fraction of episodes that reached each named stage
            out[task]["stages"] = {name: float(np.mean([r["stages"][name] for r in rs])) for name in stage_names}
    wins, n = sum(r["success"] for r in records), len(records)
    return {"tasks": out, "overall": {"success_rate": wins / n if n else 0.0, "ci95": list(wilson_interval(wins, n)),
                                      "episodes": n}}


def write_video(path: Path, frames: list[np.ndarray], fps: int = 10) -> None:
    import imageio.v2 as imageio

    with imageio.get_writer(path, fps=fps, codec="libx264", quality=7, macro_block_size=8) as writer:
        for frame in frames:
            writer.append_data(frame)


def write_plot(path: Path, results: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = list(results["tasks"])
    rates = [results["tasks"][t]["success_rate"] for t in tasks]
    # max(0, ...): at a rate of 0 or 1 the interval's end equals the rate up to rounding
    low = [max(0.0, r - results["tasks"][t]["ci95"][0]) for t, r in zip(tasks, rates)]
    high = [max(0.0, results["tasks"][t]["ci95"][1] - r) for t, r in zip(tasks, rates)]
    fig, ax = plt.subplots(figsize=(max(6, 0.8 * len(tasks) + 2), 4))
    ax.bar(tasks, rates, yerr=[low, high], capsize=3, color="#4878cf")
    ax.set_ylim(0, 1.05)
    ax.set_ylabel("success rate (Wilson 95% CI)")
    overall = results["overall"]
    ax.set_title(f"{results['policy']} on {results['suite']} ({results['backend']}): "
                 f"{overall['success_rate']:.1%} over {overall['episodes']} episodes")
    plt.setp(ax.get_xticklabels(), rotation=35, ha="right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def results_markdown(results: dict) -> str:
    lines = [f"# {results['policy']} on {results['suite']} ({results['backend']}, seed {results['seed']})", "",
             "| task | success | 95% CI | episodes | mean length | stages reached |", "|---|---|---|---|---|---|"]
    rows = list(results["tasks"].items()) + [("**overall**", results["overall"])]
    for task, r in rows:
        lo, hi = r["ci95"]
        length = f"{r['mean_length']:.1f}" if "mean_length" in r else ""
        stages = ", ".join(f"{name} {rate:.0%}" for name, rate in r.get("stages", {}).items())
        lines.append(f"| {task} | {r['success_rate']:.1%} | [{lo:.2f}, {hi:.2f}] | {r['episodes']} | {length} | {stages} |")
    return "\n".join(lines) + "\n"


def run_suite(policy: VectorPolicy, cfg: EvalConfig, show_progress: bool = True) -> tuple[list[str], list[dict]]:
    """Every task's episodes in the simulator: (tasks, per-episode records)."""
    tasks = resolve_tasks(cfg)
    records = []
    total = cfg.episodes_per_task * len(tasks)
    # one set of env workers for every task: starting them costs seconds per task
    envs = make_vector_env(tasks[0], cfg, max(1, min(cfg.num_envs, cfg.episodes_per_task)))
    try:
        with tqdm(total=total, desc=f"eval {cfg.suite}/{cfg.backend}", unit="ep", disable=not show_progress) as bar:
            for task in tasks:
                bar.set_postfix_str(task)
                seeds = get_suite(cfg.suite).episode_seeds(task, cfg.episodes_per_task, seed=cfg.seed)
                records.extend(run_task(task, policy, cfg, seeds, progress=bar, envs=envs))
    finally:
        envs.close()
    return tasks, records


def build_results(records: list[dict], tasks: list[str], cfg: EvalConfig, policy_name: str) -> dict:
    """The platform's results schema."""
    summary = summarize(records, tasks)
    return {"suite": cfg.suite, "backend": cfg.backend, "policy": policy_name, "seed": cfg.seed,
            **summary, "episode_seeds": {t: [r["seed"] for r in records if r["task"] == t] for t in tasks},
            "randomization": cfg.randomization if isinstance(cfg.randomization, str) else dict(cfg.randomization),
            "versions": package_versions()}


def write_outputs(results: dict, records: list[dict], output_dir: str | os.PathLike) -> None:
    """results.json, results.md, success_rates.png, episodes.jsonl and videos/ (of records with frames)."""
    output_dir = Path(output_dir)
    (output_dir / "videos").mkdir(parents=True, exist_ok=True)
    with open(output_dir / "results.json", "w") as f:
        json.dump(results, f, indent=2)
    (output_dir / "results.md").write_text(results_markdown(results))
    write_plot(output_dir / "success_rates.png", results)
    with open(output_dir / "episodes.jsonl", "w") as f:
        for r in records:
            r = dict(r)
            r.pop("initial_frame", None)
            r.pop("initial_state", None)
            r.pop("actions", None)
            frames = r.pop("frames", None)
            if frames:
                name = f"{r['task']}_ep{r['episode']:03d}_{'success' if r['success'] else 'failure'}.mp4"
                write_video(output_dir / "videos" / name, frames)
                r["video"] = f"videos/{name}"
            f.write(json.dumps(r) + "\n")


def evaluate(policy: VectorPolicy, cfg: EvalConfig, output_dir: str | os.PathLike, policy_name: str | None = None,
             show_progress: bool = True) -> dict:
    started = time.perf_counter()
    tasks, records = run_suite(policy, cfg, show_progress)
    seconds = time.perf_counter() - started
    results = build_results(records, tasks, cfg, policy_name or policy.name)
    results["timing"] = {"seconds": round(seconds, 2), "seconds_per_episode": round(seconds / max(len(records), 1), 3),
                         "num_envs": cfg.num_envs}
    if isinstance(policy, CheckpointPolicy):  # inference settings that change the numbers
        config = policy.policy.config
        results["inference"] = {"binarize_gripper": bool(getattr(config, "binarize_gripper", False)),
                                "gripper_threshold": getattr(config, "gripper_threshold", None),
                                "gripper_switch_threshold": getattr(config, "gripper_switch_threshold", None),
                                **policy.actions.settings()}  # what the queue actually ran
    write_outputs(results, records, output_dir)
    return results
