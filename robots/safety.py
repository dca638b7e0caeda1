"""The safety layer between a policy and an arm: always on, independent of the policy.

Every action goes through `SafetyLayer.filter` before anything is published. In order:

1. gate: nothing moves unless the layer is armed, not emergency-stopped and not halted by the
   watchdog (the action sent is then a zero motion that keeps the last gripper command);
2. non-finite values (NaN, inf) are replaced by a zero motion and counted as rejected;
3. workspace box: the commanded target (current position + delta) is clipped into the box, so an
   arm outside the box may only move back towards it;
4. per-step clamps on translation (per axis, LeRobot's 0.05 m) and rotation (per axis, radians);
5. velocity limit: per-step motion at most `max_linear_speed / control_hz` (and angular alike);
6. the gripper is clipped to [0, 1].

The watchdog (`check_watchdog`) halts when the newest observation is older than
`max_observation_age_s` or the connection is lost; the halt is latched, like the emergency stop,
until `rearm()` is called. Every limit comes from `SafetyConfig` (Hydra `robot.safety`).
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Mapping

import numpy as np

from embodied.config_keys import from_mapping

log = logging.getLogger(__name__)

ACTION_DIM = 7


@dataclass
class SafetyConfig:
    workspace_low: tuple[float, float, float] = (0.15, -0.45, 0.0)  # metres, robot base frame
    workspace_high: tuple[float, float, float] = (0.75, 0.45, 0.6)
    max_translation_per_step: float = 0.05  # metres per control step, per axis
    max_rotation_per_step: float = 0.25  # radians per control step, per axis
    max_linear_speed: float = 0.5  # m/s (per axis) -> per-step limit max_linear_speed / control_hz
    max_angular_speed: float = 2.5  # rad/s (per axis)
    control_hz: float = 10.0
    max_observation_age_s: float = 0.15  # watchdog: older observations halt the arm
    max_action_latency_s: float = 0.5  # an action computed from an older observation is not sent
    watchdog_period_s: float = 0.02  # how often the watchdog looks (must keep the halt within 2 periods)
    require_arming: bool = True
    estop_keys: tuple[str, ...] = ("space", "e")  # keyboard keys that latch the emergency stop
    estop_topic: str | None = "/embodied/estop"  # std_msgs/Bool; true latches the emergency stop

    def __post_init__(self):
        for name in ("workspace_low", "workspace_high"):
            value = tuple(float(v) for v in getattr(self, name))
            if len(value) != 3 or not all(np.isfinite(value)):
                raise ValueError(f"safety.{name} must be 3 finite numbers (x, y, z in metres); got {list(value)}")
            setattr(self, name, value)
        if not all(lo < hi for lo, hi in zip(self.workspace_low, self.workspace_high)):
            raise ValueError(f"safety.workspace_low {list(self.workspace_low)} must be below "
                             f"safety.workspace_high {list(self.workspace_high)} on every axis")
        for name in ("max_translation_per_step", "max_rotation_per_step", "max_linear_speed", "max_angular_speed",
                     "control_hz", "max_observation_age_s", "max_action_latency_s", "watchdog_period_s"):
            value = float(getattr(self, name))
            if not np.isfinite(value) or value <= 0:
                raise ValueError(f"safety.{name} must be a positive number; got {getattr(self, name)!r}")
            setattr(self, name, value)
        self.estop_keys = tuple(str(k) for k in self.estop_keys)
        # The watchdog must notice a stale observation and halt within two control periods of it.
        if self.max_observation_age_s + self.watchdog_period_s > 2.0 / self.control_hz + 1e-9:
            raise ValueError(
                f"safety.max_observation_age_s ({self.max_observation_age_s}) + safety.watchdog_period_s "
                f"({self.watchdog_period_s}) must be at most two control periods (2 / control_hz = "
                f"{2.0 / self.control_hz:.3f} s) so that a stale observation halts the arm in time")

    @classmethod
    def from_dict(cls, values: Mapping[str, Any] | None) -> "SafetyConfig":
        return from_mapping(cls, values, "safety setting")

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def step_translation_limit(self) -> float:
        return min(self.max_translation_per_step, self.max_linear_speed / self.control_hz)

    @property
    def step_rotation_limit(self) -> float:
        return min(self.max_rotation_per_step, self.max_angular_speed / self.control_hz)


@dataclass
class FilterReport:
    """What the layer did to one action."""

    requested: np.ndarray
    sent: np.ndarray
    blocked: str | None = None  # "not armed" | "emergency stop" | "watchdog: ..." | "non-finite action"
    clamped: list[str] = field(default_factory=list)  # "workspace", "translation", "rotation", "gripper"


class SafetyLayer:
    """Thread-safe: the control loop filters actions while the watchdog, keyboard and ROS
    e-stop listeners latch stops from other threads."""

    def __init__(self, config: SafetyConfig | Mapping[str, Any] | None = None):
        self.config = config if isinstance(config, SafetyConfig) else SafetyConfig.from_dict(config)
        self._lock = threading.Lock()
        self._armed = not self.config.require_arming
        self._estop_reason: str | None = None
        self._halt_reason: str | None = None
        self.last_gripper = 1.0  # open until told otherwise
        self.rejected = 0  # non-finite actions replaced by a zero motion
        self.clamp_counts: dict[str, int] = {}
        self.blocked_counts: dict[str, int] = {}  # actions not sent, by reason

    # -- state -----------------------------------------------------------------------------------
    @property
    def armed(self) -> bool:
        return self._armed

    @property
    def estopped(self) -> bool:
        return self._estop_reason is not None

    @property
    def halted(self) -> bool:
        return self._halt_reason is not None

    @property
    def stop_reason(self) -> str | None:
        """Why motion is blocked now, or None when actions may move the arm."""
        with self._lock:
            return self._block_reason()

    def _block_reason(self) -> str | None:
        if self._estop_reason is not None:
            return f"emergency stop ({self._estop_reason})"
        if self._halt_reason is not None:
            return f"watchdog halt ({self._halt_reason})"
        if not self._armed:
            return "not armed"
        return None

    def arm(self) -> None:
        """Allow motion (after explicit confirmation). An emergency stop stays latched."""
        with self._lock:
            if self._estop_reason is not None:
                raise RuntimeError(f"cannot arm: the emergency stop is latched ({self._estop_reason}); "
                                   "call reset_estop() first")
            self._armed = True
        log.warning("robot ARMED: policy actions will move the arm")

    def disarm(self) -> None:
        with self._lock:
            self._armed = False

    def emergency_stop(self, reason: str = "requested") -> bool:
        """Latch the emergency stop; returns True if it was not latched before."""
        with self._lock:
            first = self._estop_reason is None
            if first:
                self._estop_reason = reason
                self._armed = False
        if first:
            log.error("EMERGENCY STOP latched: %s", reason)
        return first

    def reset_estop(self) -> None:
        """Unlatch the emergency stop. Motion still needs `arm()` again."""
        with self._lock:
            self._estop_reason = None
            self._armed = False

    def halt(self, reason: str) -> bool:
        """Latch a watchdog halt; returns True if it was not halted before."""
        with self._lock:
            first = self._halt_reason is None
            if first:
                self._halt_reason = reason
        if first:
            log.error("watchdog HALT: %s", reason)
        return first

    def rearm(self) -> None:
        """Clear a watchdog halt and arm again (after the cause is fixed)."""
        with self._lock:
            self._halt_reason = None
        self.arm()

    # -- watchdog ----------------------------------------------------------------------------------
    def check_watchdog(self, observation_time: float | None, connected: bool, now: float | None = None) -> str | None:
        """Latch a halt when the observation is stale or the connection is lost; returns the reason."""
        now = time.monotonic() if now is None else now
        if not connected:
            reason = "connection lost"
        elif observation_time is None:
            reason = None if not self._armed else "no observation received"
        elif now - observation_time > self.config.max_observation_age_s:
            reason = (f"stale observation ({now - observation_time:.3f} s old > "
                      f"max_observation_age_s {self.config.max_observation_age_s})")
        else:
            return None
        if reason is None:
            return None
        self.halt(reason)
        return reason

    # -- filtering -----------------------------------------------------------------------------------
    def hold_action(self) -> np.ndarray:
        """A zero motion that keeps the last gripper command."""
        out = np.zeros(ACTION_DIM, dtype=np.float32)
        out[6] = self.last_gripper
        return out

    def filter(self, action, position: np.ndarray | None, observation_age: float | None = None) -> FilterReport:
        """The action actually to send, given the requested one, the current TCP position and the
        age of the observation the action was computed from."""
        report = self._filter(action, position, observation_age)
        if report.blocked is not None:
            key = report.blocked.split(" (")[0]
            self.blocked_counts[key] = self.blocked_counts.get(key, 0) + 1
        return report

    def _filter(self, action, position, observation_age) -> FilterReport:
        arr = np.asarray(action, dtype=np.float64)
        if arr.shape != (ACTION_DIM,):
            raise ValueError(f"action must have shape (7,) = [dx, dy, dz, droll, dpitch, dyaw, gripper]; "
                             f"got shape {arr.shape}")
        requested = arr.astype(np.float32)
        with self._lock:
            blocked = self._block_reason()
        if blocked is not None:
            return FilterReport(requested, self.hold_action(), blocked=blocked)
        if observation_age is not None and observation_age > self.config.max_action_latency_s:
            log.warning("not sending an action computed from an observation %.3f s old (max_action_latency_s %s)",
                        observation_age, self.config.max_action_latency_s)
            return FilterReport(requested, self.hold_action(),
                                blocked=f"stale action (observation {observation_age:.3f} s old)")
        if not np.all(np.isfinite(arr)):
            self.rejected += 1
            log.error("rejected a non-finite action %s: sending a zero motion instead", arr.tolist())
            return FilterReport(requested, self.hold_action(), blocked="non-finite action")
        cfg = self.config
        clamped: list[str] = []
        delta = arr[:3].copy()
        if position is not None:
            position = np.asarray(position, dtype=np.float64)
            if position.shape != (3,) or not np.all(np.isfinite(position)):
                return FilterReport(requested, self.hold_action(), blocked=f"invalid TCP position {position!r}")
            target = np.clip(position + delta, cfg.workspace_low, cfg.workspace_high)
            inside = target - position
            if not np.allclose(inside, delta, atol=1e-9):
                clamped.append("workspace")
            delta = inside
        else:
            return FilterReport(requested, self.hold_action(), blocked="no TCP position to check the workspace")
        limit = cfg.step_translation_limit
        if np.any(np.abs(delta) > limit):
            clamped.append("translation")
            delta = np.clip(delta, -limit, limit)
        rotation = arr[3:6]
        rot_limit = cfg.step_rotation_limit
        if np.any(np.abs(rotation) > rot_limit):
            clamped.append("rotation")
            rotation = np.clip(rotation, -rot_limit, rot_limit)
        gripper = float(arr[6])
        if not 0.0 <= gripper <= 1.0:
            clamped.append("gripper")
            gripper = min(max(gripper, 0.0), 1.0)
        sent = np.concatenate([delta, rotation, [gripper]]).astype(np.float32)
        with self._lock:
            if self._block_reason() is not None:  # stopped while we computed
                return FilterReport(requested, self.hold_action(), blocked=self._block_reason())
            self.last_gripper = gripper
        for name in clamped:
            self.clamp_counts[name] = self.clamp_counts.get(name, 0) + 1
        if clamped:
            log.info("clamped action (%s): requested %s, sending %s", ", ".join(clamped),
                     np.round(requested, 4).tolist(), np.round(sent, 4).tolist())
        return FilterReport(requested, sent, clamped=clamped)


KEY_NAMES = {"space": " ", "esc": "\x1b", "enter": "\n"}


def key_char(name: str) -> str:
    """'space' -> ' ', 'esc' -> '\\x1b', a single character -> itself."""
    if name in KEY_NAMES:
        return KEY_NAMES[name]
    if len(name) != 1:
        raise ValueError(f"estop key {name!r} must be one character or one of {sorted(KEY_NAMES)}")
    return name


class KeyboardEstop:
    """Latch the emergency stop when one of `keys` is pressed in the terminal.

    Reads single key presses from stdin in cbreak mode (a TTY is needed; on a non-terminal stdin
    it does nothing and says so). The terminal is restored on `stop()`.
    """

    def __init__(self, safety: SafetyLayer, keys=None, stream=None):
        self.safety = safety
        self.chars = {key_char(k) for k in (keys if keys is not None else safety.config.estop_keys)}
        self.stream = stream
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._restore = None
        self.active = False

    def start(self) -> bool:
        import sys

        stream = self.stream or sys.stdin
        if not self.chars:
            return False
        try:
            fd = stream.fileno()
        except (AttributeError, ValueError, OSError):
            fd = None
        if fd is None or not stream.isatty():
            log.warning("stdin is not a terminal: the keyboard emergency stop is off (the ROS topic e-stop "
                        "and Ctrl-C still work)")
            return False
        import termios
        import tty

        old = termios.tcgetattr(fd)
        tty.setcbreak(fd)
        self._restore = lambda: termios.tcsetattr(fd, termios.TCSADRAIN, old)
        self._thread = threading.Thread(target=self._run, args=(fd,), daemon=True, name="estop-keyboard")
        self._thread.start()
        self.active = True
        return True

    def _run(self, fd: int) -> None:
        import os
        import select

        while not self._stop.is_set():
            ready, _, _ = select.select([fd], [], [], 0.05)
            if not ready:
                continue
            char = os.read(fd, 1).decode(errors="replace")
            if char in self.chars:
                self.safety.emergency_stop(f"key {char!r} pressed")

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)
        if self._restore is not None:
            self._restore()
            self._restore = None
        self.active = False
