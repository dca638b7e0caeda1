"""`python -m embodied.collect suite=tabletop10 backend=mujoco episodes_per_task=N output_dir=PATH`

Runs each task's scripted expert (with domain randomization) in gymnasium vector-env workers,
keeps the successful episodes and writes them as an RLDS dataset in Open X-Embodiment layout:
`<output_dir>/<dataset_name>/<version>/` (`dataset_info.json`, `features.json`, TFRecord
shards), readable by plain `tfds.builder_from_directory`. Each episode's metadata records its
task, instruction, suite, backend, seed and randomization config.

Seeds come from `suite.episode_seeds(task, ..., seed=cfg.seed)`. `seed=0` gives the suite's
evaluation initial states, so collection defaults to `seed=1`: demonstrations never start
from an evaluation state. Episodes are written in seed order and the first
`episodes_per_task` successes per task are kept, so a run is reproducible whatever the
number of workers; at most `max_attempts_per_episode * episodes_per_task` seeds are tried.

`episodes_by_task` ({task: n}) keeps n episodes of the tasks it names instead of `episodes_per_task`,
e.g. more demonstrations of the contact-rich tasks; with the same seed, the first episodes of each task are
the ones a smaller collection keeps.

`dagger_policy` turns collection into DAgger (Ross et al., 2011): a trained policy drives the arm (the expert's own
action is executed instead with probability `expert_mix` per step, DAgger's beta) while every step is labelled
with the expert's answer to the state the policy reached. Every episode is kept, whatever its outcome: the
states where the policy goes wrong, labelled with how the expert gets out of them, are the point. Train on
these together with the demonstrations. The scripts follow phases, each closed-loop on the current state, so a
label is the answer of the phase the script is in (move behind the cube, say) until the arm gets there.

`min_steps_per_task` evens out the tasks: a task keeps taking episodes (still in seed order)
until its kept steps reach it, so a short task (an 8-step reach) gets as many frames, and many
more distinct layouts, than a long one (a 90-step sort) instead of 10x fewer.

`clause_instructions` labels each step of a multi-step task with the clause of its instruction that the step
serves ("press the red button" until the button is lit, then "put the blue cube in the tray"), in each step's
`language_instruction`; the episode's metadata keeps the whole instruction. The clauses are the one-step
tasks' instructions, so their demonstrations train them too. A policy trained on them is prompted one clause
at a time (`policy.instruction_clauses`). `clause_pause` makes the expert stand still that many steps after
each clause but the last, still labelled with it (off by default: it did not help, benchmarks/RESULTS.md).

`steps_after_success` records that many more of the expert's steps after an episode first succeeds (the
env's own `steps_after_success`; the episode still counts as reaching its goal). The suite ends an
episode the moment its predicate holds, so without it a pick's lift is cut where the cube passes 10 cm.
A {task: n} mapping sets it per task: `{PickCube: 4}` records the lift past 10 cm without recording the
expert backing away from a pressed button or a closed drawer.
"""
from __future__ import annotations

import json
import os
import time
import zlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

DEFAULT_VERSION = "1.0.0"


@dataclass
class CollectConfig:
    suite: str = "tabletop10"
    backend: str = "mujoco"
    episodes_per_task: int = 10  # episodes kept per task (successful ones unless keep_failures)
    min_steps_per_task: int = 0  # more episodes of a task until its kept steps reach this (0: off)
    episodes_by_task: dict | None = None  # {task: n}: n episodes kept instead of episodes_per_task
    tasks: list[str] | None = None
    num_envs: int = 2  # parallel env workers
    vector: str = "async"  # async | sync
    seed: int = 1  # 0 would reuse the suite's evaluation initial states
    randomization: Any = "default"
    image_size: int = 224
    wrist_camera: bool = False
    image_encoding: str = "jpeg"  # jpeg | png
    dataset_name: str | None = None  # default: embodied_<suite>_<backend>
    version: str = DEFAULT_VERSION
    max_attempts_per_episode: int = 3
    keep_failures: bool = False  # also write failed episodes (success false, reward 0): detector negatives
    action_noise: float = 0.0  # DART: std (metres) of noise on the executed translation; the label stays the expert's
    rotation_noise: float = 0.0  # std (radians) of noise on the executed roll, pitch and yaw
    # the action written with each step: "expert" (its answer to the state: DART's labels, for imitation) or
    # "executed" (what the arm was commanded, noise included: what moved the next frame, e.g. for latent actions)
    action_label: str = "expert"
    # the expert's steps recorded past each episode's first success (the episode still counts as reaching
    # its goal): a demonstration whose motion crosses the success threshold is not cut at it
    steps_after_success: int | dict = 0  # or {task: n}: per task (0 for the tasks it does not name)
    # each step's language_instruction: the clause of a multi-step instruction it serves (policies.instructions)
    clause_instructions: bool = False
    clause_pause: int = 0  # with clause_instructions: steps the expert stands still after each clause but the last
    dagger_policy: str | None = None  # DAgger: a checkpoint whose actions are executed; the labels stay the expert's
    expert_mix: float = 0.0  # with `dagger_policy`: per step, the probability that the expert's action is executed instead
    max_shard_mb: int = 256
    overwrite: bool = False
    env_kwargs: dict = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.dataset_name or f"embodied_{self.suite}_{self.backend}"

    def episodes_for(self, task: str) -> int:
        return int((self.episodes_by_task or {}).get(task, self.episodes_per_task))


def _check_by_task(key: str, by_task: dict, tasks: list[str], minimum: int) -> None:
    for task, n in by_task.items():
        if task not in tasks:
            raise ValueError(f"{key} names {task!r}, which this collection does not cover; its tasks: {', '.join(tasks)}")
        if not isinstance(n, int) or isinstance(n, bool) or n < minimum:
            raise ValueError(f"{key}[{task!r}] must be an integer >= {minimum}, got {n!r}")


def _eval_config(cfg: CollectConfig):
    from embodied.evaluation import EvalConfig

    return EvalConfig(suite=cfg.suite, backend=cfg.backend, episodes_per_task=cfg.episodes_per_task,
                      tasks=cfg.tasks, num_envs=cfg.num_envs, seed=cfg.seed, randomization=cfg.randomization,
                      image_size=cfg.image_size, wrist_camera=cfg.wrist_camera, videos_per_task=0, vector=cfg.vector,
                      env_kwargs={**cfg.env_kwargs, **({"steps_after_success": cfg.steps_after_success}
                                                       if cfg.steps_after_success else {}),
                                  **({"clause_pause": cfg.clause_pause} if cfg.clause_instructions else {})})


class _Recording:
    """One episode in progress in one env worker."""

    def __init__(self, index: int, seed: int, obs: dict, i: int, wrist: bool, metadata: dict):
        self.index, self.seed, self.metadata = index, seed, metadata
        self.instruction = str(obs["instruction"][i])
        self.images = [obs["image"][i].copy()]
        self.wrist = [obs["wrist_image"][i].copy()] if wrist else None
        self.states = [obs["state"][i].copy()]
        self.clauses = [0]  # the clause of the instruction each observation is on (the task's `clause`)
        self.actions: list[np.ndarray] = []

    def add(self, action: np.ndarray, obs: dict | None, i: int, clause: int = 0) -> None:
        self.actions.append(action.copy())
        if obs is not None:  # the next observation (not after the last action)
            self.images.append(obs["image"][i].copy())
            if self.wrist is not None:
                self.wrist.append(obs["wrist_image"][i].copy())
            self.states.append(obs["state"][i].copy())
            self.clauses.append(int(clause))

    def instructions(self, task, by_clause: bool) -> str | list[str]:
        """The episode's instruction, or each step's clause of it (`task`: an envs.tasks.Task)."""
        if not by_clause:
            return self.instruction
        clauses = task.clauses(self.instruction)
        return [clauses[c] for c in self.clauses]

    def observations(self) -> dict[str, np.ndarray]:
        out = {"image": np.stack(self.images), "state": np.stack(self.states).astype(np.float32)}
        if self.wrist is not None:
            out["wrist_image"] = np.stack(self.wrist)
        return out


def _seed_count(cfg: CollectConfig, task: str) -> int:
    # Seed lists are prefix-stable, so asking for more (every episode has >= 1 step) changes no kept episode.
    return max(cfg.episodes_for(task), cfg.min_steps_per_task) * max(1, cfg.max_attempts_per_episode)


def _num_envs(cfg: CollectConfig, tasks: list[str]) -> int:
    return max(1, min(cfg.num_envs, max(_seed_count(cfg, t) for t in tasks)))


def collect_task(task: str, cfg: CollectConfig, writer, progress=None, envs=None, driver=None) -> dict:
    """Run the expert on `task` until `cfg.episodes_for(task)` successes and `min_steps_per_task` steps are
    written (or seeds run out). `envs`: running vector env workers to reuse, switched to `task`. `driver`: a
    policy (`embodied.evaluation.VectorPolicy`) whose actions are executed instead, labelled by the expert."""
    from embodied.data.rlds_writer import make_episode
    from embodied.evaluation import make_vector_env
    from envs.env import ACTION_HIGH, ACTION_LOW
    from envs.suites import get_suite
    from envs.tasks import make_task

    needed, min_steps = cfg.episodes_for(task), cfg.min_steps_per_task
    task_spec = make_task(task)
    noise_rng = np.random.default_rng([cfg.seed, zlib.crc32(task.encode())])
    mix_rng = np.random.default_rng([cfg.seed, zlib.crc32(task.encode()), 1])
    keep_failures = cfg.keep_failures or driver is not None
    seeds = get_suite(cfg.suite).episode_seeds(task, _seed_count(cfg, task), seed=cfg.seed)
    own = envs is None
    if own:
        envs = make_vector_env(task, _eval_config(cfg), _num_envs(cfg, [task]))
    num_envs = envs.num_envs
    queue = list(enumerate(seeds))
    pending: dict[int, tuple[int, int]] = {}  # env slot -> (episode index, seed) being started
    finished: dict[int, tuple[bool, _Recording]] = {}  # completed, waiting to be written in seed order
    slots: list[_Recording | None] = [None] * num_envs
    next_index, written, attempts, successes, lengths, kept_seeds = 0, 0, 0, 0, [], []

    def wants_more() -> bool:
        return written < needed or sum(lengths) < min_steps

    def may_need_more() -> bool:
        # counts every finished and running episode as kept: schedule no more than could be needed
        keepable = [rec for ok, rec in finished.values() if ok or keep_failures]
        running = [s for s in slots if s is not None]
        return (written + len(keepable) + len(running) < needed
                or sum(lengths) + sum(len(r.actions) for r in keepable + running) < min_steps)

    def start(indices: list[int], obs: dict) -> None:
        metadata = envs.call("episode_metadata")
        if driver is not None:
            driver.reset(indices)
        for i in indices:
            slots[i] = _Recording(pending[i][0], pending[i][1], obs, i, cfg.wrist_camera, dict(metadata[i]))

    def flush() -> None:
        nonlocal next_index, written
        while next_index in finished:
            ok, rec = finished.pop(next_index)
            next_index += 1
            if (ok or keep_failures) and wants_more():
                meta = {**rec.metadata, "suite": cfg.suite, "episode_id": writer.num_episodes, "seed": rec.seed}
                writer.write(make_episode(rec.observations(), np.stack(rec.actions),
                                          rec.instructions(task_spec, cfg.clause_instructions), meta, success=ok))
                written += 1
                kept_seeds.append(rec.seed)
                lengths.append(len(rec.actions))
                if progress is not None:
                    progress.update(1)

    try:
        envs.call("set_task", task)
        pending.update({i: queue.pop(0) for i in range(num_envs)})
        obs, _ = envs.reset(seed=[s for _, s in pending.values()])
        start(list(range(num_envs)), obs)
        while any(s is not None for s in slots):
            actions = np.clip(np.stack(envs.call("expert_action")).astype(np.float32), ACTION_LOW, ACTION_HIGH)
            executed = actions
            if driver is not None:  # DAgger: the policy acts, except where the expert's turn is drawn
                driven = np.clip(driver.act(obs, envs), ACTION_LOW, ACTION_HIGH)
                expert_turn = mix_rng.random(num_envs) < cfg.expert_mix
                executed = np.where(expert_turn[:, None], actions, driven).astype(np.float32)
            if cfg.action_noise > 0 or cfg.rotation_noise > 0:  # the expert labels its answer to the perturbed state
                executed = executed.copy()
                executed[:, :3] += noise_rng.normal(0.0, cfg.action_noise, (num_envs, 3)).astype(np.float32)
                if cfg.rotation_noise > 0:  # drawn only when asked: translation-only datasets keep their noise stream
                    executed[:, 3:6] += noise_rng.normal(0.0, cfg.rotation_noise, (num_envs, 3)).astype(np.float32)
                executed = np.clip(executed, ACTION_LOW, ACTION_HIGH)
            obs, _, terminated, truncated, infos = envs.step(executed)
            clause = infos.get("clause", np.zeros(num_envs, dtype=int))
            restart = np.zeros(num_envs, dtype=bool)
            idle_done = (terminated | truncated) & np.array([s is None for s in slots])
            for i, rec in enumerate(slots):
                if rec is None:
                    continue
                done = bool(terminated[i] or truncated[i])
                rec.add((executed if cfg.action_label == "executed" else actions)[i], None if done else obs, i, clause[i])
                if not done:
                    continue
                attempts += 1
                successes += bool(terminated[i])
                finished[rec.index] = (bool(terminated[i]), rec)
                slots[i] = None
                if progress is not None:
                    progress.set_postfix_str(f"{task}: {'expert' if driver is None else 'policy'} {successes}/{attempts}",
                                            refresh=False)
                if queue and may_need_more():
                    pending[i] = queue.pop(0)
                    restart[i] = True
                else:
                    idle_done[i] = True
            flush()
            if restart.any() or idle_done.any():
                # Idle envs are stepped with the others; a finished one is reset (unrecorded) so that a
                # SyncVectorEnv, which refuses to step a finished env, keeps going.
                seeds_arg = [int(pending[i][1]) if restart[i] else None for i in range(num_envs)]
                obs, _ = envs.reset(seed=seeds_arg, options={"reset_mask": restart | idle_done})
                start([int(i) for i in np.flatnonzero(restart)], obs)
            if not wants_more():
                break
    finally:
        if own:
            envs.close()
    return {"episodes": written, "attempts": attempts, "successes": successes,
            "expert_success_rate": successes / attempts if attempts else 0.0,
            "mean_length": float(np.mean(lengths)) if lengths else 0.0, "seeds": kept_seeds,
            "shortfall": max(0, needed - written), "steps": int(sum(lengths)),
            "step_shortfall": max(0, min_steps - int(sum(lengths)))}


def collect(cfg: CollectConfig, output_dir: str | os.PathLike, show_progress: bool = True) -> dict:
    """Collect every task of the suite into one RLDS dataset under `output_dir`; returns a summary."""
    from embodied.data.errors import EmptyDatasetError
    from embodied.data.rlds_writer import RLDSWriter, episode_features
    from embodied.evaluation import make_vector_env, package_versions, resolve_tasks
    from envs.experts import expert_revision
    from envs.randomization import RandomizationConfig

    tasks = resolve_tasks(cfg)
    for key in ("action_noise", "rotation_noise"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    if cfg.action_label not in ("expert", "executed"):
        raise ValueError(f"action_label must be 'expert' or 'executed', got {cfg.action_label!r}")
    if not 0.0 <= cfg.expert_mix <= 1.0:
        raise ValueError(f"expert_mix must be within [0, 1], got {cfg.expert_mix}")
    if cfg.expert_mix > 0 and cfg.dagger_policy is None:
        raise ValueError("expert_mix mixes the expert into a policy's rollouts: set dagger_policy=<checkpoint directory>")
    for key in ("min_steps_per_task", "clause_pause"):
        if getattr(cfg, key) < 0:
            raise ValueError(f"{key} must be >= 0, got {getattr(cfg, key)}")
    after = cfg.steps_after_success
    if isinstance(after, dict):
        _check_by_task("steps_after_success", after, tasks, minimum=0)
    elif not isinstance(after, int) or isinstance(after, bool) or after < 0:
        raise ValueError(f"steps_after_success must be an integer >= 0 or a {{task: n}} mapping, got {after!r}")
    _check_by_task("episodes_by_task", cfg.episodes_by_task or {}, tasks, minimum=1)
    output_dir = Path(output_dir)
    randomization = RandomizationConfig.from_any(cfg.randomization).to_dict()
    config = {**asdict(cfg), "randomization": randomization, "tasks": tasks}
    versions = package_versions()
    features = episode_features(cfg.image_size, wrist_image=cfg.wrist_camera, image_encoding=cfg.image_encoding)
    driver = _driver(cfg)
    description = (f"Scripted-expert demonstrations of the {cfg.suite} suite on {cfg.backend} "
                   f"({len(tasks)} tasks, domain randomization {'on' if any(randomization.values()) else 'off'})"
                   + (f", along rollouts of {cfg.dagger_policy} (DAgger, expert_mix {cfg.expert_mix})." if driver else "."))
    writer = RLDSWriter(output_dir, cfg.name, features, version=cfg.version, description=description,
                        metadata={"collect_config": config, "versions": versions,
                                  "expert_revision": expert_revision()},
                        max_shard_bytes=cfg.max_shard_mb * 2**20, overwrite=cfg.overwrite)
    started = time.time()
    per_task = {}
    # With min_steps_per_task the episode count is only known at the end.
    total = None if cfg.min_steps_per_task else sum(cfg.episodes_for(t) for t in tasks)
    with tqdm(total=total, desc=f"collect {cfg.suite}/{cfg.backend}", unit="ep",
              disable=not show_progress) as bar:
        envs = None
        try:
            # one set of env workers for every task: starting them costs seconds per task
            envs = make_vector_env(tasks[0], _eval_config(cfg), _num_envs(cfg, tasks))
            for task in tasks:
                per_task[task] = collect_task(task, cfg, writer, progress=bar, envs=envs, driver=driver)
        except BaseException:
            writer.abort()
            raise
        finally:
            if envs is not None:
                envs.close()
    try:
        builder_dir = writer.close()
    except EmptyDatasetError:
        rates = ", ".join(f"{t} {r['successes']}/{r['attempts']}" for t, r in per_task.items())
        raise EmptyDatasetError(f"no successful episodes to write (expert successes: {rates}); "
                                "nothing was saved") from None
    summary = {"dataset": cfg.name, "builder_dir": str(builder_dir), "data_dir": str(output_dir),
               "episodes": writer.num_episodes, "steps": writer.num_steps, "tasks": per_task,
               "seconds": round(time.time() - started, 1), "config": config, "versions": versions}
    # beside the data it describes: datasets collected into one output_dir keep their own summaries
    (Path(builder_dir) / "collect_summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def _driver(cfg: CollectConfig):
    """The DAgger policy (None without `dagger_policy`), checked against what the collection renders."""
    if cfg.dagger_policy is None:
        return None
    from embodied.evaluation import make_eval_policy

    driver = make_eval_policy(str(cfg.dagger_policy))
    config = driver.policy.config
    wanted = {"image_size": (cfg.image_size, config.observation_image_size),
              "wrist_camera": (cfg.wrist_camera, bool(getattr(config, "wrist_image", False)))}
    for key, (given, needed) in wanted.items():
        if given != needed:
            raise ValueError(f"policy {cfg.dagger_policy!r} was trained with {key}={needed}, but this collection renders "
                             f"{key}={given}; set {key}={needed}")
    return driver


def config_from_hydra(cfg) -> CollectConfig:
    from omegaconf import OmegaConf

    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("output_dir", None)
    values.pop("hydra", None)
    return CollectConfig(**values)


def _main(cfg) -> dict:
    from hydra.core.hydra_config import HydraConfig

    output_dir = HydraConfig.get().runtime.output_dir
    collect_cfg = config_from_hydra(cfg)
    summary = collect(collect_cfg, output_dir)
    actor = "policy (DAgger)" if collect_cfg.dagger_policy else "expert"
    for task, r in summary["tasks"].items():
        note = f" (short by {r['shortfall']})" if r["shortfall"] else ""
        note += f" (short by {r['step_shortfall']} steps)" if r["step_shortfall"] else ""
        print(f"{task}: {r['episodes']} episodes ({r['steps']} steps) kept, "
              f"{actor} {r['successes']}/{r['attempts']} successful{note}")
    print(f"wrote {summary['episodes']} episodes ({summary['steps']} steps) of {summary['dataset']} "
          f"to {summary['builder_dir']}")
    return summary


def main() -> None:
    import hydra

    from envs.rendering import configure_mujoco_gl

    configure_mujoco_gl()
    hydra.main(version_base="1.3", config_path="conf", config_name="collect")(_main)()


if __name__ == "__main__":
    main()
