"""`RosBridgeRobot`: an arm driven over rosbridge (roslibpy), through the safety layer.

Observations: the camera (`sensor_msgs/CompressedImage` or `Image`), optionally a wrist camera
(`wrist_camera_topic`, for policies trained with one), the end-effector pose
(`geometry_msgs/PoseStamped`) and the gripper opening from `sensor_msgs/JointState`.
Commands: the action's end-effector deltas become a `geometry_msgs/TwistStamped` (velocity =
delta x control rate, rotation as a rotation vector) for MoveIt Servo's `delta_twist_cmds`,
streamed at `command_hz` for one control period and then followed by a zero twist (Servo halts
0.1 s after the last command, so a single message per step would stutter); the gripper goes to
its own topic. Topic names, types, rates and frames come from the Hydra `robot` config.

A background thread is both the command streamer and the watchdog: when the newest image (of
either camera) or pose is older than `safety.max_observation_age_s`, or the connection drops, it
publishes a zero twist and latches a halt (`safety.watchdog_period_s` later at most). A `true` on the e-stop topic
latches the emergency stop. In dry-run mode nothing is advertised or published; every command
that would have been sent is logged.
"""
from __future__ import annotations

import collections
import json
import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import numpy as np

from embodied.config_keys import from_mapping
from robots import messages as M
from robots.base import Robot
from robots.safety import SafetyConfig, SafetyLayer

log = logging.getLogger(__name__)


class ObservationTimeout(TimeoutError):
    """No fresh observation arrived in time."""


@dataclass
class RosRobotConfig:
    name: str = "ros_panda"
    host: str = "127.0.0.1"
    port: int = 9090
    transport: str = "asyncio"  # roslibpy transport: asyncio | twisted
    connect_timeout_s: float = 10.0
    ros_version: int = 2
    control_hz: float = 10.0
    command_hz: float = 50.0  # twist streaming rate (must beat Servo's 0.1 s timeout comfortably)
    base_frame: str = "panda_link0"
    camera_topic: str = "/camera/color/image_raw/compressed"
    camera_type: str = "sensor_msgs/CompressedImage"
    wrist_camera_topic: str | None = None  # a second, wrist-mounted camera (policies with wrist_image need it)
    wrist_camera_type: str = "sensor_msgs/CompressedImage"
    joint_states_topic: str = "/joint_states"
    ee_pose_topic: str = "/embodied/ee_pose"
    twist_topic: str = "/servo_node/delta_twist_cmds"
    gripper_topic: str = "/embodied/gripper_command"
    gripper_type: str = "std_msgs/Float64"  # or control_msgs/GripperCommand
    gripper_joint_names: tuple[str, ...] = ("panda_finger_joint1", "panda_finger_joint2")
    gripper_max_width: float = 0.08  # metres between the fingers when fully open
    status_topic: str | None = None  # the simulated arm's std_msgs/String status (instruction, success)
    image_size: int | None = None  # resize camera images to this square size (None keeps them)
    max_image_bytes: int = M.MAX_IMAGE_BYTES
    observation_wait_s: float = 1.0  # get_observation waits this long for a new frame
    dry_run: bool = False
    safety: dict = field(default_factory=dict)

    def __post_init__(self):
        for key in ("camera_type", "wrist_camera_type"):
            if getattr(self, key) not in ("sensor_msgs/CompressedImage", "sensor_msgs/Image"):
                raise ValueError(f"robot.{key} must be sensor_msgs/CompressedImage or sensor_msgs/Image, "
                                 f"got {getattr(self, key)!r}")
        if self.wrist_camera_topic is not None and self.wrist_camera_topic == self.camera_topic:
            raise ValueError(f"robot.wrist_camera_topic is robot.camera_topic ({self.camera_topic!r}); "
                             "the wrist camera needs its own topic")
        if self.gripper_type not in ("std_msgs/Float64", "control_msgs/GripperCommand"):
            raise ValueError(f"robot.gripper_type must be std_msgs/Float64 or control_msgs/GripperCommand, "
                             f"got {self.gripper_type!r}")
        if self.transport not in ("asyncio", "twisted"):
            raise ValueError(f"robot.transport must be asyncio or twisted, got {self.transport!r}")
        if self.command_hz < self.control_hz:
            raise ValueError(f"robot.command_hz ({self.command_hz}) must be at least robot.control_hz "
                             f"({self.control_hz})")
        self.gripper_joint_names = tuple(self.gripper_joint_names)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "RosRobotConfig":
        return from_mapping(cls, values, "robot setting", ignore=("_target_", "kind"))

    def safety_config(self) -> SafetyConfig:
        values = dict(self.safety)
        values.setdefault("control_hz", self.control_hz)
        if float(values["control_hz"]) != float(self.control_hz):
            raise ValueError(f"robot.safety.control_hz ({values['control_hz']}) differs from robot.control_hz "
                             f"({self.control_hz}); set only robot.control_hz")
        return SafetyConfig.from_dict(values)


class _RateLimitFilter(logging.Filter):
    """At most `per_second` records a second from a logger; a flood of malformed frames must not
    flood the log (each suppressed record is still counted)."""

    def __init__(self, per_second: float = 2.0):
        super().__init__()
        self.interval = 1.0 / per_second
        self.last = 0.0
        self.suppressed = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = time.monotonic()
        if record.levelno >= logging.WARNING and now - self.last < self.interval:
            self.suppressed += 1
            return False
        if record.levelno >= logging.WARNING:
            if self.suppressed:
                record.msg = f"{record.msg} ({self.suppressed} similar messages suppressed)"
                self.suppressed = 0
            self.last = now
        return True


_ROSLIBPY_LOG_FILTER = _RateLimitFilter()


def _bounded_ros(max_bytes: int):
    import roslibpy

    logger = logging.getLogger("roslibpy")
    if _ROSLIBPY_LOG_FILTER not in logger.filters:
        logger.addFilter(_ROSLIBPY_LOG_FILTER)

    class BoundedRos(roslibpy.Ros):
        """roslibpy.Ros whose websocket refuses incoming messages above `max_bytes` and drops
        binary frames (roslibpy would raise on one and lose the connection)."""

        def connect(self):
            factory = self.factory
            try:
                factory.setProtocolOptions(maxMessagePayloadSize=max_bytes, maxFramePayloadSize=max_bytes)
            except Exception:  # a transport without autobahn options (IronPython's cli)
                pass
            base = getattr(factory, "protocol", None)
            if base is not None and hasattr(base, "onMessage"):
                class TextOnlyProtocol(base):
                    def onMessage(self, payload, isBinary):
                        if isBinary:
                            logger.warning("dropped a binary frame of %d bytes: rosbridge JSON is text", len(payload))
                            return
                        super().onMessage(payload, isBinary)

                factory.protocol = TextOnlyProtocol
            super().connect()

    return BoundedRos


class RosBridgeRobot(Robot):
    def __init__(self, config: RosRobotConfig | Mapping[str, Any]):
        self.config = config if isinstance(config, RosRobotConfig) else RosRobotConfig.from_dict(config)
        self.safety = SafetyLayer(self.config.safety_config())
        self.ros = None
        self._lock = threading.Condition()
        self._image: np.ndarray | None = None
        self._image_time: float | None = None  # monotonic arrival time
        self._image_seq = 0
        self._wrist_image: np.ndarray | None = None
        self._wrist_time: float | None = None
        self._returned_seq = 0
        self._returned_time: float | None = None
        self._position: np.ndarray | None = None
        self._quat: np.ndarray | None = None
        self._pose_time: float | None = None
        self._gripper_opening: float | None = None
        self._status: dict | None = None
        self._connected = False
        self._command: tuple[np.ndarray, np.ndarray, float] | None = None  # linear, angular, valid until
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()
        self._topics: dict[str, Any] = {}
        self.rejected_messages = collections.Counter()  # topic -> count
        self._last_reject_log = 0.0
        self.published: collections.deque = collections.deque(maxlen=5000)  # (time, kind, payload) sent or dry-run
        self.halt_events: list[dict] = []
        self.last_report = None

    # -- connection ----------------------------------------------------------------------------------
    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.config.port}"

    @property
    def connected(self) -> bool:
        return self._connected and self.ros is not None and self.ros.is_connected

    def connect(self) -> None:
        import roslibpy
        from roslibpy.core import RosTimeoutError

        cfg = self.config
        ros_cls = _bounded_ros(max(cfg.max_image_bytes * 2, 1_000_000))
        self.ros = ros_cls(cfg.host, cfg.port, transport=cfg.transport)
        try:
            self.ros.run(timeout=cfg.connect_timeout_s)
        except RosTimeoutError:
            self.ros.close()
            raise ConnectionError(f"no rosbridge server answered at {self.url} within {cfg.connect_timeout_s} s "
                                  "(robot.host / robot.port; rehearse with `python -m robots.sim_server`)") from None
        self._connected = True
        self.ros.on("close", self._on_close)
        self.ros.on("ready", self._on_ready)
        subscriptions = [(cfg.camera_topic, cfg.camera_type, self._on_image),
                         (cfg.ee_pose_topic, "geometry_msgs/PoseStamped", self._on_pose),
                         (cfg.joint_states_topic, "sensor_msgs/JointState", self._on_joints)]
        if cfg.wrist_camera_topic:
            subscriptions.append((cfg.wrist_camera_topic, cfg.wrist_camera_type, self._on_wrist_image))
        if cfg.status_topic:
            subscriptions.append((cfg.status_topic, "std_msgs/String", self._on_status))
        if self.safety.config.estop_topic:
            subscriptions.append((self.safety.config.estop_topic, "std_msgs/Bool", self._on_estop))
        for topic, msg_type, callback in subscriptions:
            t = roslibpy.Topic(self.ros, topic, msg_type)
            t.subscribe(self._guarded(topic, callback))
            self._topics[topic] = t
        if not cfg.dry_run:
            self._twist_topic = roslibpy.Topic(self.ros, cfg.twist_topic, "geometry_msgs/TwistStamped")
            self._gripper_topic = roslibpy.Topic(self.ros, cfg.gripper_topic, cfg.gripper_type)
            self._twist_topic.advertise()
            self._gripper_topic.advertise()
        self._stop.clear()
        self._thread = threading.Thread(target=self._stream_and_watch, daemon=True, name="robot-watchdog")
        self._thread.start()
        log.info("connected to %s%s", self.url, " (dry run: nothing will be published)" if cfg.dry_run else "")

    def disconnect(self) -> None:
        if self.ros is None:
            return
        self.safety.disarm()
        self._command = None
        self._publish_twist(np.zeros(3), np.zeros(3), "disconnect")
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None
        for topic in self._topics.values():
            try:
                topic.unsubscribe()
            except Exception:
                pass
        self._connected = False
        try:
            if self.ros.is_connected:
                self.ros.close()
        except Exception as err:
            log.warning("closing the rosbridge connection: %s", err)
        self.ros = None

    def _on_close(self, *_):
        if self._connected and not self._stop.is_set():
            log.error("rosbridge connection to %s lost", self.url)
        self._connected = False

    def _on_ready(self, *_):
        self._connected = True

    # -- incoming ----------------------------------------------------------------------------------
    def _guarded(self, topic: str, callback):
        def handle(msg):
            try:
                callback(msg)
            except M.MessageError as err:
                self._rejected(topic, str(err))
            except Exception as err:  # never let a bad message escape into the transport
                self._rejected(topic, f"{type(err).__name__}: {err}")
        return handle

    def _rejected(self, topic: str, reason: str) -> None:
        self.rejected_messages[topic] += 1
        now = time.monotonic()
        if now - self._last_reject_log > 0.5:
            log.warning("rejected a message on %s: %s (%d rejected on this topic)", topic, reason[:300],
                        self.rejected_messages[topic])
            self._last_reject_log = now

    def _decode_image(self, msg, topic: str, msg_type: str) -> np.ndarray:
        cfg = self.config
        if msg_type.endswith("CompressedImage"):
            image = M.parse_compressed_image(msg, topic, cfg.max_image_bytes)
        else:
            image = M.parse_raw_image(msg, topic, cfg.max_image_bytes)
        if cfg.image_size and image.shape[:2] != (cfg.image_size, cfg.image_size):
            from PIL import Image

            image = np.asarray(Image.fromarray(image).resize((cfg.image_size, cfg.image_size), Image.BILINEAR))
        return image

    def _on_wrist_image(self, msg) -> None:
        image = self._decode_image(msg, self.config.wrist_camera_topic, self.config.wrist_camera_type)
        with self._lock:
            self._wrist_image, self._wrist_time = image, time.monotonic()

    def _on_image(self, msg) -> None:
        image = self._decode_image(msg, self.config.camera_topic, self.config.camera_type)
        with self._lock:
            self._image = image
            self._image_time = time.monotonic()
            self._image_seq += 1
            self._lock.notify_all()

    def _on_pose(self, msg) -> None:
        position, quat = M.parse_pose_stamped(msg, self.config.ee_pose_topic)
        frame = msg.get("header", {}).get("frame_id", "") if isinstance(msg.get("header"), dict) else ""
        if frame and frame != self.config.base_frame:
            raise M.MessageError(f"{self.config.ee_pose_topic}: pose in frame {frame!r}, expected "
                                 f"{self.config.base_frame!r}")
        with self._lock:
            self._position, self._quat, self._pose_time = position, quat, time.monotonic()

    def _on_joints(self, msg) -> None:
        joints = M.parse_joint_state(msg, self.config.joint_states_topic)
        names = self.config.gripper_joint_names
        if all(n in joints for n in names):
            opening = sum(joints[n] for n in names) / self.config.gripper_max_width
            with self._lock:
                self._gripper_opening = float(np.clip(opening, 0.0, 1.0))

    def _on_status(self, msg) -> None:
        text = M.parse_string(msg, self.config.status_topic)
        try:
            status = json.loads(text)
        except ValueError:
            raise M.MessageError(f"{self.config.status_topic}: data is not JSON") from None
        if not isinstance(status, dict):
            raise M.MessageError(f"{self.config.status_topic}: data is not a JSON object")
        with self._lock:
            self._status = status

    def _on_estop(self, msg) -> None:
        if M.parse_bool(msg, self.safety.config.estop_topic):
            if self.safety.emergency_stop(f"ROS topic {self.safety.config.estop_topic}"):
                self._command = None
                self._publish_twist(np.zeros(3), np.zeros(3), "emergency stop")

    # -- observation ---------------------------------------------------------------------------------
    def get_observation(self, timeout: float | None = None) -> dict:
        """The newest frame not returned before (waits up to `observation_wait_s` for one), with the
        newest wrist image when the robot has a wrist camera."""
        cfg = self.config
        wait = cfg.observation_wait_s if timeout is None else timeout
        deadline = time.monotonic() + wait
        with self._lock:
            while (self._image_seq == self._returned_seq or self._position is None
                   or self._gripper_opening is None or (cfg.wrist_camera_topic and self._wrist_image is None)):
                left = deadline - time.monotonic()
                if left <= 0:
                    needed = [("new camera image", self._image_seq != self._returned_seq, cfg.camera_topic),
                              ("end-effector pose", self._position is not None, cfg.ee_pose_topic),
                              ("gripper joint states", self._gripper_opening is not None, cfg.joint_states_topic)]
                    if cfg.wrist_camera_topic:
                        needed.append(("wrist camera image", self._wrist_image is not None, cfg.wrist_camera_topic))
                    missing = [name for name, ok, _ in needed if not ok]
                    raise ObservationTimeout(f"no {', '.join(missing)} from {self.url} within {wait:.2f} s "
                                             f"({', '.join(topic for _, _, topic in needed)})")
                self._lock.wait(left)
            self._returned_seq = self._image_seq
            self._returned_time = self._image_time
            state = np.concatenate([self._position, self._quat, [self._gripper_opening]]).astype(np.float32)
            obs = {"image": self._image, "state": state, "timestamp": self._image_time}
            if cfg.wrist_camera_topic:
                obs["wrist_image"] = self._wrist_image
            if self._status is not None:
                obs["sim"] = dict(self._status)
                if isinstance(self._status.get("instruction"), str):
                    obs["instruction"] = self._status["instruction"]
        return obs

    def observation_age(self) -> float | None:
        """Seconds since the older of the newest camera and wrist camera images (None before both)."""
        times = self._camera_times()
        return None if None in times else time.monotonic() - min(times)

    def _camera_times(self) -> tuple:
        return (self._image_time, self._wrist_time) if self.config.wrist_camera_topic else (self._image_time,)

    # -- commands ------------------------------------------------------------------------------------
    def arm(self) -> None:
        """Allow motion (after the operator's confirmation): needs a live connection and a fresh image."""
        age = self.observation_age()
        if self._pose_time is not None and age is not None:
            age = max(age, time.monotonic() - self._pose_time)
        if not self.connected:
            raise RuntimeError(f"cannot arm: not connected to {self.url}")
        if age is None or age > self.safety.config.max_observation_age_s:
            cameras = " and ".join(t for t in (self.config.camera_topic, self.config.wrist_camera_topic) if t)
            raise RuntimeError(f"cannot arm: no fresh camera image on {cameras} "
                               f"(newest is {'missing' if age is None else f'{age:.2f} s old'})")
        self.safety.rearm()

    def send_action(self, action) -> np.ndarray:
        """Filter through the safety layer, command the arm, return the action actually sent."""
        with self._lock:
            position = None if self._position is None else self._position.copy()
            used = self._returned_time  # the image the policy saw (None before any get_observation)
        report = self.safety.filter(action, position, None if used is None else time.monotonic() - used)
        self.last_report = report
        sent = report.sent
        hz = self.config.control_hz
        if report.blocked is None and np.any(sent[:6] != 0):
            linear = sent[:3].astype(np.float64) * hz
            angular = M.rpy_to_rotvec(sent[3:6]) * hz
            self._command = (linear, angular, time.monotonic() + 1.0 / hz)
            self._publish_twist(linear, angular, "action")
        else:
            self._command = None
            self._publish_twist(np.zeros(3), np.zeros(3), report.blocked or "zero action")
        self._publish_gripper(float(sent[6]))
        return sent

    def _publish_twist(self, linear, angular, why: str) -> None:
        cfg = self.config
        msg = M.twist_stamped(linear, angular, cfg.base_frame, time.time(), cfg.ros_version)
        self.published.append((time.monotonic(), "twist", np.concatenate([linear, angular]), why))
        if cfg.dry_run:
            log.info("dry run: would publish %s %s (%s)", cfg.twist_topic,
                     np.round(np.concatenate([linear, angular]), 4).tolist(), why)
            return
        if self.ros is None or not self.ros.is_connected:
            return  # never queue commands for a later reconnect
        import roslibpy

        self._twist_topic.publish(roslibpy.Message(msg))

    def _publish_gripper(self, opening: float) -> None:
        cfg = self.config
        msg = M.gripper_command(opening, cfg.gripper_type, cfg.gripper_max_width)
        self.published.append((time.monotonic(), "gripper", opening, ""))
        if cfg.dry_run:
            log.info("dry run: would publish %s %s", cfg.gripper_topic, msg)
            return
        if self.ros is None or not self.ros.is_connected:
            return
        import roslibpy

        self._gripper_topic.publish(roslibpy.Message(msg))

    def _stream_and_watch(self) -> None:
        period = min(1.0 / self.config.command_hz, self.safety.config.watchdog_period_s)
        next_tick = time.monotonic()
        while not self._stop.is_set():
            now = time.monotonic()
            was_blocked = self.safety.halted or self.safety.estopped
            # the oldest of the newest images and the newest pose: all must be fresh to move
            times = (*self._camera_times(), self._pose_time)
            observed = None if None in times else min(times)
            reason = self.safety.check_watchdog(observed, self.connected, now) if (
                self.safety.armed or self._command is not None) else None
            if reason is not None and not was_blocked:
                self._command = None
                self._publish_twist(np.zeros(3), np.zeros(3), f"watchdog: {reason}")
                self.halt_events.append({"reason": reason, "time": time.monotonic(), "observation_time": observed})
            command = self._command
            if command is not None:
                if self.safety.stop_reason is not None:
                    self._command = None
                    self._publish_twist(np.zeros(3), np.zeros(3), self.safety.stop_reason)
                elif now < command[2]:
                    self._publish_twist(command[0], command[1], "stream")
                else:
                    self._command = None
                    self._publish_twist(np.zeros(3), np.zeros(3), "step done")
            next_tick += period
            self._stop.wait(max(0.0, next_tick - time.monotonic()))
            if next_tick < time.monotonic() - period:
                next_tick = time.monotonic()

    # -- convenience ---------------------------------------------------------------------------------
    def status(self) -> dict | None:
        with self._lock:
            return None if self._status is None else dict(self._status)

    def reset_sim(self, seed: int, service: str = "/embodied/sim/reset", timeout: float = 10.0) -> dict:
        """Reset the simulated arm's episode (the sim server's reset service)."""
        import roslibpy

        result = roslibpy.Service(self.ros, service, "embodied/Reset").call(roslibpy.ServiceRequest({"seed": int(seed)}),
                                                                            timeout=timeout)
        with self._lock:
            self._status = None
            self._returned_seq = self._image_seq
        return dict(result)
