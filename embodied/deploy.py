"""`python -m embodied.deploy policy=<checkpoint|random|scripted|ws://host:port> robot=ros_panda instruction="…"`

Runs a policy on an arm over the ROS bridge at the robot's control rate:

    observation (camera + pose + gripper)  ->  policy  ->  safety layer  ->  twist + gripper command

Motion starts only after the operator types `arm` (or `arm=true` / `--yes` for automation);
space or `e` (robot.safety.estop_keys), a `true` on the e-stop topic or Ctrl-C stop the arm.
`dry_run=true` publishes nothing and logs what would be sent. The progress bar shows the live
control rate and latencies. Every episode is recorded as RLDS through the data engine
(`<output_dir>/<dataset_name>/1.0.0/`) with the action actually sent after the safety layer, so
recorded episodes feed LoRA fine-tuning; an episode cut short (e-stop, watchdog halt, lost
connection) is kept up to its last step. `deploy_summary.json` holds the timings and safety
counters.

`robot=sim_panda` starts the simulated arm (`robots.sim_server`) in-process to rehearse with no
hardware; its status topic provides the instruction, task success and, for `policy=scripted`,
the scripted expert's actions.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import numpy as np
from tqdm.auto import tqdm

log = logging.getLogger(__name__)
# Apps that take a policy checkpoint path live in conf/rollout (a `policy` config group is in conf/).
CONF_DIR = Path(__file__).resolve().parent / "conf" / "rollout"


class LoopStats:
    """Latency and rate of the control loop (milliseconds), for the live display and the summary."""

    FIELDS = ("observation_wait_ms", "policy_ms", "send_ms", "step_ms", "observation_age_ms")

    def __init__(self):
        self.values: dict[str, list[float]] = {k: [] for k in self.FIELDS}
        self.step_times: list[float] = []

    def add(self, **values: float) -> None:
        for key, value in values.items():
            self.values[key].append(float(value))
        self.step_times.append(time.monotonic())

    def rate_hz(self, window: int = 20) -> float:
        times = self.step_times[-window:]
        return (len(times) - 1) / (times[-1] - times[0]) if len(times) > 1 and times[-1] > times[0] else 0.0

    def postfix(self) -> str:
        def last(key, n=10):
            v = self.values[key][-n:]
            return float(np.mean(v)) if v else 0.0
        return (f"{self.rate_hz():.1f} Hz | policy {last('policy_ms'):.0f} ms | step {last('step_ms'):.0f} ms | "
                f"obs age {last('observation_age_ms'):.0f} ms")

    def summary(self) -> dict:
        out: dict[str, Any] = {"steps": len(self.step_times), "rate_hz": self.rate_hz(window=len(self.step_times))}
        for key, values in self.values.items():
            if values:
                arr = np.asarray(values)
                out[key] = {"mean": round(float(arr.mean()), 2), "p50": round(float(np.percentile(arr, 50)), 2),
                            "p95": round(float(np.percentile(arr, 95)), 2), "max": round(float(arr.max()), 2)}
        return out


@dataclass
class EpisodeRecord:
    instruction: str
    images: list = field(default_factory=list)
    wrist_images: list = field(default_factory=list)  # with a wrist camera, one per image
    states: list = field(default_factory=list)
    actions: list = field(default_factory=list)  # sent (after the safety layer)
    requested: list = field(default_factory=list)  # what the policy asked for
    success: bool = False
    stop_reason: str = ""
    stats: LoopStats = field(default_factory=LoopStats)
    sim: dict | None = None
    error: BaseException | None = None  # raised again once the recording is saved

    def __len__(self) -> int:
        return len(self.actions)


def run_episode(robot, policy, instruction: str, max_steps: int, stop_on_success: bool = True,
                show_progress: bool = True, desc: str = "deploy") -> EpisodeRecord:
    """The control loop for one episode; returns what happened, recorded step by step."""
    from robots.ros_robot import ObservationTimeout

    period = 1.0 / robot.config.control_hz
    record = EpisodeRecord(instruction)
    bar = tqdm(total=max_steps, desc=desc, unit="step", disable=not show_progress, dynamic_ncols=True)
    next_step = time.monotonic()
    try:
        while len(record) < max_steps:
            started = time.monotonic()
            stop = robot.safety.stop_reason
            if stop is not None and stop != "not armed":
                record.stop_reason = stop
                break
            if stop == "not armed":
                record.stop_reason = "disarmed"
                break
            try:
                obs = robot.get_observation()
            except ObservationTimeout as err:
                record.stop_reason = robot.safety.stop_reason or f"observation timeout: {err}"
                break
            got_obs = time.monotonic()
            if "sim" in obs:
                record.sim = obs["sim"]
                if stop_on_success and obs["sim"].get("success"):
                    record.success = True
                    record.stop_reason = "task success"
                    break
            policy_obs = {"image": obs["image"], "state": obs["state"], "instruction": instruction}
            if "wrist_image" in obs:
                policy_obs["wrist_image"] = obs["wrist_image"]
            if "sim" in obs:
                policy_obs["sim"] = obs["sim"]
            action = policy.predict_action(policy_obs, instruction)
            got_action = time.monotonic()
            sent = robot.send_action(action)
            done = time.monotonic()
            record.images.append(obs["image"])
            if "wrist_image" in obs:
                record.wrist_images.append(obs["wrist_image"])
            record.states.append(obs["state"])
            record.actions.append(np.asarray(sent, dtype=np.float32))
            record.requested.append(np.asarray(action, dtype=np.float32))
            record.stats.add(observation_wait_ms=(got_obs - started) * 1000, policy_ms=(got_action - got_obs) * 1000,
                             send_ms=(done - got_action) * 1000, step_ms=(done - started) * 1000,
                             observation_age_ms=(done - obs["timestamp"]) * 1000)
            bar.update(1)
            bar.set_postfix_str(record.stats.postfix(), refresh=False)
            next_step += period
            delay = next_step - time.monotonic()
            if delay > 0:
                time.sleep(delay)
            else:
                next_step = time.monotonic()
        else:
            record.stop_reason = "max_steps"
    except KeyboardInterrupt:
        record.stop_reason = "interrupted (Ctrl-C)"
        robot.safety.emergency_stop("Ctrl-C")
        robot.send_action(np.zeros(7, dtype=np.float32))
    except Exception as err:  # e.g. the policy failed: stop the arm, keep the steps recorded so far
        record.stop_reason = f"error: {type(err).__name__}: {err}"
        record.error = err
        robot.safety.disarm()
        robot.send_action(np.zeros(7, dtype=np.float32))
    finally:
        bar.close()
    if record.sim is not None and not record.success:
        status = robot.status() if hasattr(robot, "status") else None
        record.success = bool(status and status.get("success"))
    return record


def _confirm_arming(robot, cfg) -> None:
    if cfg.get("dry_run"):
        log.info("dry run: arming without confirmation (nothing is published)")
        robot.arm()
        return
    if cfg.get("arm"):
        robot.arm()
        return
    if not sys.stdin.isatty():
        raise RuntimeError("refusing to move the arm without confirmation: stdin is not a terminal; pass arm=true "
                           "(or --yes) to arm for automation")
    answer = input(f"Policy ready on {robot.url}. Type 'arm' and Enter to let it move the arm "
                   f"(anything else aborts): ").strip()
    if answer != "arm":
        raise RuntimeError(f"not armed (answer {answer!r}); nothing was sent")
    robot.arm()


def _dataset_name(cfg: Mapping[str, Any], robot_cfg) -> str:
    return cfg.get("dataset_name") or f"embodied_deploy_{robot_cfg.name}"


def _write_dataset(records: list[EpisodeRecord], output_dir: Path, cfg: Mapping[str, Any], robot_cfg,
                   versions: dict) -> Path | None:
    from embodied.data.rlds_writer import RLDSWriter, episode_features, make_episode

    kept = [r for r in records if len(r) > 0]
    if not kept:
        return None
    image_shape = kept[0].images[0].shape[:2]
    wrist = bool(kept[0].wrist_images)
    features = episode_features(image_shape, wrist_image=wrist, image_encoding=cfg.get("image_encoding", "jpeg"))
    writer = RLDSWriter(output_dir, _dataset_name(cfg, robot_cfg), features,
                        description=f"Episodes deployed on {robot_cfg.name}.",
                        metadata={"deploy_config": dict(cfg), "versions": versions},
                        overwrite=bool(cfg.get("overwrite", False)))
    with writer:
        for index, rec in enumerate(kept):
            sim = rec.sim or {}
            meta = {"episode_id": index, "task": str(sim.get("task", cfg.get("task") or "deploy")),
                    "suite": "deploy", "backend": robot_cfg.name, "seed": int(sim.get("seed", cfg.get("seed", 0))),
                    "randomization": "{}", "control_hz": float(robot_cfg.control_hz)}
            observations = {"image": np.stack(rec.images), "state": np.stack(rec.states)}
            if wrist:
                observations["wrist_image"] = np.stack(rec.wrist_images)
            writer.write(make_episode(observations, np.stack(rec.actions), rec.instruction, meta, success=rec.success))
    return writer.builder_dir


def deploy(cfg: Mapping[str, Any], output_dir: str | os.PathLike) -> dict:
    """Run `cfg['episodes']` episodes; returns (and writes) the summary."""
    from embodied.evaluation import package_versions
    from embodied.policy_loader import load_policy
    from robots.ros_robot import RosBridgeRobot, RosRobotConfig
    from robots.safety import KeyboardEstop

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    robot_values = dict(cfg["robot"])
    sim_values = robot_values.pop("sim", None)
    robot_values["dry_run"] = bool(cfg.get("dry_run", False))
    dataset_name = cfg.get("dataset_name") or f"embodied_deploy_{robot_values.get('name', 'ros_panda')}"
    existing = output_dir / dataset_name / "1.0.0" / "dataset_info.json"
    if cfg.get("record", True) and existing.exists() and not cfg.get("overwrite", False):
        raise FileExistsError(f"a recording already exists at {existing.parent}; pass a new output_dir= "
                              "(or overwrite=true to replace it)")
    robot_cfg = RosRobotConfig.from_dict(robot_values)  # bad settings fail before anything starts
    policy = load_policy(str(cfg["policy"]), seed=int(cfg.get("seed", 0)))
    if policy.metadata().get("config", {}).get("wrist_image") and not robot_cfg.wrist_camera_topic:
        raise ValueError(f"policy {cfg['policy']} reads a wrist camera (wrist_image) and robot {robot_cfg.name} has "
                         "none: set robot.wrist_camera_topic (and robot.wrist_camera_type)")
    server = None
    if sim_values:
        from robots.sim_server import SimArmServer

        # the simulated arm publishes the wrist camera where and as the robot config reads it
        server = SimArmServer({**sim_values, "host": robot_cfg.host, "port": robot_cfg.port,
                               "wrist_camera_topic": robot_cfg.wrist_camera_topic,
                               "wrist_camera_type": robot_cfg.wrist_camera_type}).start()
        robot_cfg.port = server.port
    robot = RosBridgeRobot(robot_cfg)
    records: list[EpisodeRecord] = []
    keyboard = None
    started = time.time()
    try:
        robot.connect()
        first = robot.get_observation(timeout=max(robot_cfg.observation_wait_s, 5.0))
        instruction = cfg.get("instruction") or first.get("instruction")
        if not instruction:
            raise ValueError("instruction is required on a robot with no task status: pass instruction=\"...\"")
        _confirm_arming(robot, cfg)
        keyboard = KeyboardEstop(robot.safety)
        keyboard.start()
        episodes = int(cfg.get("episodes", 1))
        if episodes > 1 and server is None:
            raise ValueError("episodes > 1 needs a simulated arm to reset (robot=sim_panda); run deploy once per "
                             "episode on a real arm")
        for index in range(episodes):
            if index > 0:
                robot.safety.disarm()
                robot.reset_sim(int(cfg.get("seed", 0)) + index)
                robot.get_observation(timeout=5.0)
                instruction = cfg.get("instruction") or robot.get_observation(timeout=5.0).get("instruction")
                robot.arm()
            policy.reset()
            rec = run_episode(robot, policy, instruction, int(cfg.get("max_steps", 100)),
                              bool(cfg.get("stop_on_success", True)), bool(cfg.get("show_progress", True)),
                              desc=f"deploy {index + 1}/{episodes}")
            records.append(rec)
            log.info("episode %d: %d steps, %s", index, len(rec), rec.stop_reason)
            if rec.stop_reason not in ("task success", "max_steps"):
                break
    finally:
        if keyboard is not None:
            keyboard.stop()
        robot.disconnect()
        if server is not None:
            server.stop()
        dataset = None
        if cfg.get("record", True) and records:
            dataset = _write_dataset(records, output_dir, cfg, robot_cfg, package_versions())
        summary = {
            "policy": str(cfg["policy"]), "robot": robot_cfg.name, "url": robot.url, "dry_run": robot_cfg.dry_run,
            "episodes": [{"steps": len(r), "success": r.success, "stop_reason": r.stop_reason,
                          "instruction": r.instruction, "timing": r.stats.summary(),
                          "clamped_steps": int(sum(np.any(np.abs(a - q) > 1e-6) for a, q in zip(r.actions, r.requested)))}
                         for r in records],
            "safety": {"clamps": dict(robot.safety.clamp_counts), "rejected_actions": robot.safety.rejected,
                       "blocked_actions": dict(robot.safety.blocked_counts),
                       "rejected_messages": dict(robot.rejected_messages), "halt_events": robot.halt_events,
                       "estopped": robot.safety.estopped},
            "dataset": str(dataset) if dataset else None, "seconds": round(time.time() - started, 2),
        }
        if server is not None:
            summary["sim_server"] = {k: int(v) for k, v in server.stats.items()}
        (output_dir / "deploy_summary.json").write_text(json.dumps(summary, indent=2, default=str))
    for rec in records:
        if rec.error is not None:
            raise RuntimeError(f"deploy stopped by an error after {len(rec)} steps (recorded in {dataset}): "
                               f"{rec.stop_reason}") from rec.error
    return summary


def _print_summary(summary: dict, output_dir: str) -> None:
    for i, ep in enumerate(summary["episodes"]):
        t = ep["timing"]
        policy_ms = t.get("policy_ms", {}).get("p50", float("nan"))
        step_ms = t.get("step_ms", {}).get("p50", float("nan"))
        print(f"episode {i}: {ep['steps']} steps, {'success' if ep['success'] else 'no success'}, "
              f"stopped by {ep['stop_reason']}; {t.get('rate_hz', 0):.1f} Hz, policy p50 {policy_ms:.1f} ms, "
              f"step p50 {step_ms:.1f} ms, {ep['clamped_steps']} steps clamped")
    where = f"RLDS episodes in {summary['dataset']}, " if summary["dataset"] else ""
    print(f"wrote {where}deploy_summary.json to {output_dir}")


def _main(cfg) -> dict:
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    output_dir = HydraConfig.get().runtime.output_dir
    values = OmegaConf.to_container(cfg, resolve=True)
    values.pop("hydra", None)
    summary = deploy(values, output_dir)
    _print_summary(summary, output_dir)
    return summary


def main() -> None:
    import hydra

    from envs.rendering import configure_mujoco_gl

    configure_mujoco_gl()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    # `--yes` is the usual spelling for automation; Hydra only takes key=value overrides.
    if "--yes" in sys.argv:
        sys.argv = [a for a in sys.argv if a != "--yes"] + ["arm=true"]
    # An absolute path: the app also runs when imported (tests), not only with `python -m`.
    hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="deploy")(_main)()


if __name__ == "__main__":
    main()
