"""`python -m robots.sim_server`: a simulated arm from the suite behind the rosbridge v2 protocol.

A websocket server (127.0.0.1:9090 by default) speaking rosbridge's JSON protocol, with one
`TabletopEnv` (MuJoCo or PyBullet) standing in for a Panda driven by MoveIt Servo:

published (topic, type)                                      obeyed
  /camera/color/image_raw/compressed  sensor_msgs/CompressedImage   /servo_node/delta_twist_cmds  geometry_msgs/TwistStamped
  /joint_states                       sensor_msgs/JointState        /embodied/gripper_command     std_msgs/Float64 (1 = open)
  /embodied/ee_pose                   geometry_msgs/PoseStamped     service /embodied/sim/reset   {seed: int}
  /embodied/sim/status                std_msgs/String (JSON: instruction, success, frame, expert_action)
  wrist_camera_topic (when set)       the wrist camera, of wrist_camera_type

Like MoveIt Servo it integrates the newest twist every servo period and halts when no command
arrived for `command_timeout_s` (0.1 s). Twists above the servo's speed limits are scaled down,
and non-finite or malformed messages are rejected with a rosbridge `status` reply and a log line.
Other topics are relayed between clients as a rosbridge server does, so an e-stop published
by any client reaches the robot's subscription.

    python -m robots.sim_server task=PickCube backend=pybullet port=9090 image_size=128
"""
from __future__ import annotations

import asyncio
import collections
import itertools
import json
import logging
import threading
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np

from embodied.config_keys import from_mapping
from robots import messages as M
from robots import rosbridge as rb
from robots.server_thread import ServerThread

log = logging.getLogger(__name__)


@dataclass
class SimServerConfig:
    host: str = "127.0.0.1"
    port: int = rb.DEFAULT_PORT  # 0 picks a free port
    task: str = "ReachTarget"
    backend: str = "mujoco"
    seed: int = 0
    randomization: Any = "none"
    image_size: int = 128
    camera_hz: float = 10.0  # camera, pose, joint states and status are published together at this rate
    servo_hz: float = 30.0  # physics + twist integration rate (a multiple of camera_hz)
    command_timeout_s: float = 0.1  # MoveIt Servo's incoming_command_timeout
    max_linear_speed: float = 0.5  # m/s per axis; faster twists are scaled down (the env's 0.05 m at 10 Hz)
    max_angular_speed: float = 2.5  # rad/s per axis
    ros_version: int = 2
    base_frame: str = "panda_link0"
    camera_topic: str = "/camera/color/image_raw/compressed"
    camera_type: str = "sensor_msgs/CompressedImage"  # or sensor_msgs/Image (raw rgb8)
    image_format: str = "jpeg"  # for CompressedImage: jpeg | png
    wrist_camera_topic: str | None = None  # also publish the wrist camera here
    wrist_camera_type: str | None = None  # its message type (None: camera_type); image_format as the front camera
    joint_states_topic: str = "/joint_states"
    ee_pose_topic: str = "/embodied/ee_pose"
    twist_topic: str = "/servo_node/delta_twist_cmds"
    gripper_topic: str = "/embodied/gripper_command"
    gripper_type: str = "std_msgs/Float64"  # or control_msgs/GripperCommand (position in metres)
    status_topic: str = "/embodied/sim/status"
    reset_service: str = "/embodied/sim/reset"
    expert: bool = True  # publish the scripted expert's next action in the status (rehearsal only)
    max_message_bytes: int = rb.DEFAULT_MAX_MESSAGE_BYTES
    max_clients: int = 16
    send_queue: int = 64  # outgoing messages buffered per client; the oldest are dropped beyond it

    def __post_init__(self):
        ratio = self.servo_hz / self.camera_hz
        if self.camera_hz <= 0 or ratio < 1 or abs(ratio - round(ratio)) > 1e-6:
            raise ValueError(f"servo_hz ({self.servo_hz}) must be a whole multiple of camera_hz ({self.camera_hz})")
        types = ("sensor_msgs/CompressedImage", "sensor_msgs/Image")
        if self.camera_type not in types:
            raise ValueError(f"camera_type must be {' or '.join(types)}, got {self.camera_type!r}")
        if self.wrist_camera_type not in (None, *types):
            raise ValueError(f"wrist_camera_type must be {' or '.join(types)} (or None: camera_type), "
                             f"got {self.wrist_camera_type!r}")

    @classmethod
    def from_dict(cls, values) -> "SimServerConfig":
        return from_mapping(cls, values, "sim_server setting")


@dataclass
class _Subscription:
    sub_id: str | None
    compression: str
    throttle_s: float
    fragment_size: int | None
    last_sent: float = 0.0


@dataclass
class _Client:
    ws: Any
    name: str
    queue: asyncio.Queue
    subscriptions: dict = field(default_factory=dict)  # topic -> {sub id: _Subscription}
    advertised: dict = field(default_factory=dict)  # topic -> type
    fragments: rb.FragmentBuffer = None
    dropped: int = 0


class SimArmServer(ServerThread):
    """The server. `start()` runs it on a background thread (tests, benchmarks); `serve_forever()`
    runs it on the calling thread (the CLI). Server-side records for checks: `commands` (every
    twist accepted, with its receive time), `applied` (the motion integrated each servo period),
    `stats` (counters) and `rejections` (recent reasons)."""

    description = "the simulated arm server"
    thread_name = "sim-arm-server"

    def __init__(self, config: SimServerConfig | dict | None = None):
        super().__init__()
        self.config = config if isinstance(config, SimServerConfig) else SimServerConfig.from_dict(config)
        self.stats = collections.Counter()
        self.rejections: collections.deque = collections.deque(maxlen=256)
        self.commands: collections.deque = collections.deque(maxlen=20000)  # (time, linear, angular)
        self.applied: collections.deque = collections.deque(maxlen=20000)  # (time, fresh, linear, angular, grip)
        self.gripper_commands: collections.deque = collections.deque(maxlen=20000)
        self.success = False
        self.frame = 0
        self.publish_frames = True  # False simulates a camera/state dropout (rehearse the watchdog)
        self.frame_times: collections.deque = collections.deque(maxlen=20000)  # monotonic publish times
        self.port: int | None = None
        self._clients: dict[int, _Client] = {}
        self._client_ids = itertools.count()
        self._last_twist: tuple[float, np.ndarray, np.ndarray] | None = None
        self._gripper = 1.0
        self._last_reject_log = 0.0
        self.env = None  # built on the server's own thread: a GL context must not be shared across threads
        self.seed = self.config.seed

    # -- simulation ---------------------------------------------------------------------------------
    def _make_env(self) -> None:
        import envs

        cfg = self.config
        self.env = envs.make_env(cfg.task, backend=cfg.backend, randomization=cfg.randomization,
                                 image_size=cfg.image_size, control_hz=cfg.servo_hz,
                                 wrist_camera=bool(cfg.wrist_camera_topic)).unwrapped
        self._reset(cfg.seed)

    def reset(self, seed: int, timeout: float = 30.0) -> dict:
        """A new episode; safe to call from any thread (the simulation runs on the server's)."""
        loop = self._loop
        if loop is not None and loop.is_running() and threading.current_thread() is not self._thread:
            async def on_loop():
                return self._reset(seed)

            return asyncio.run_coroutine_threadsafe(on_loop(), loop).result(timeout)
        return self._reset(seed)

    def _reset(self, seed: int) -> dict:
        from envs.experts import ScriptedExpert

        self.env.reset(seed=int(seed))
        # The expert is stepped once per camera frame: its per-step deltas are per 1 / camera_hz.
        self.expert = ScriptedExpert(self.env.task, self.env.sim)
        self.success = False
        self._last_twist = None
        self._gripper = 1.0
        self.seed = int(seed)
        return {"success": True, "message": f"reset {self.config.task} with seed {seed}: {self.env.instruction}"}

    def _servo_step(self, now: float) -> None:
        """One servo period: integrate the newest twist if it is fresh, else hold (halt)."""
        from envs.scene import matrix_to_quat, quat_to_matrix

        cfg = self.config
        dt = 1.0 / cfg.servo_hz
        fresh = self._last_twist is not None and now - self._last_twist[0] <= cfg.command_timeout_s
        linear = self._last_twist[1] if fresh else np.zeros(3)
        angular = self._last_twist[2] if fresh else np.zeros(3)
        sim = self.env.sim
        pos, quat = sim.ee_pose()
        target_pos = pos + linear * dt
        target_rot = M.rotvec_to_matrix(angular * dt) @ quat_to_matrix(quat)
        sim.apply_action(target_pos, matrix_to_quat(target_rot), self._gripper)
        self.env.task.update(sim)
        self.success = self.success or bool(self.env.task.success(sim))
        self.applied.append((now, fresh, linear.copy(), angular.copy(), self._gripper))
        if not fresh:
            self.stats["servo_halted_periods"] += 1

    def _frame_messages(self, now: float) -> list[tuple[str, dict]]:
        """Pose, joints and status first, the image last: a new image completes a frame."""
        cfg = self.config
        env = self.env
        pos, quat = env.sim.ee_pose()
        opening = env.sim.gripper_opening()
        stamp = time.time()
        status = {"task": cfg.task, "instruction": env.instruction, "seed": self.seed, "frame": self.frame,
                  "success": self.success, "backend": cfg.backend, "stamp": stamp}
        if cfg.expert:
            status["expert_action"] = [float(v) for v in self.expert.act()]
        def image_message(camera: str) -> dict:
            image, frame_id = env.sim.render(camera), {"front": "camera", "wrist": "wrist_camera"}[camera]
            message_type = cfg.camera_type if camera == "front" else cfg.wrist_camera_type or cfg.camera_type
            if message_type.endswith("CompressedImage"):
                return M.compressed_image(image, stamp, frame_id, cfg.image_format, ros_version=cfg.ros_version)
            return M.raw_image(image, stamp, frame_id, ros_version=cfg.ros_version)

        messages = [
            (cfg.ee_pose_topic, M.pose_stamped(pos, quat, cfg.base_frame, stamp, cfg.ros_version)),
            (cfg.joint_states_topic, M.joint_state(["panda_finger_joint1", "panda_finger_joint2"],
                                                   [opening / 2, opening / 2], stamp, cfg.ros_version)),
            (cfg.status_topic, {"data": json.dumps(status)}),
        ]
        if cfg.wrist_camera_topic:
            messages.append((cfg.wrist_camera_topic, image_message("wrist")))
        return messages + [(cfg.camera_topic, image_message("front"))]

    async def _physics_loop(self) -> None:
        cfg = self.config
        period = 1.0 / cfg.servo_hz
        per_frame = int(round(cfg.servo_hz / cfg.camera_hz))
        next_tick = time.monotonic()
        for tick in itertools.count():
            now = time.monotonic()
            try:
                self._servo_step(now)
                if tick % per_frame == 0 and self.publish_frames:
                    self.frame += 1
                    self.frame_times.append(now)
                    for topic, msg in self._frame_messages(now):
                        self._publish(topic, msg)
            except Exception:  # a simulator fault must not kill the server silently
                log.exception("simulation step failed; the arm holds")
                self.stats["sim_errors"] += 1
            next_tick += period
            delay = next_tick - time.monotonic()
            if delay < -period:  # fell behind (loaded machine): do not try to catch up in a burst
                next_tick = time.monotonic()
                delay = 0.0
            await asyncio.sleep(max(0.0, delay))

    # -- publishing -----------------------------------------------------------------------------------
    def _publish(self, topic: str, msg: dict) -> None:
        now = time.monotonic()
        text = None
        for client in list(self._clients.values()):
            for sub_id, sub in list(client.subscriptions.get(topic, {}).items()):
                if sub.throttle_s and now - sub.last_sent < sub.throttle_s:
                    continue
                sub.last_sent = now
                if text is None:
                    text = rb.encode({"op": "publish", "topic": topic, "msg": msg})
                self._send_text(client, text, sub)
                break  # one delivery per client and topic, as rosbridge does for duplicate subscriptions

    def _send_text(self, client: _Client, text: str, sub: _Subscription | None = None) -> None:
        if sub is not None and sub.compression == "png":
            text = rb.encode(rb.png_compress(text))
        if sub is not None and sub.fragment_size and len(text) > sub.fragment_size:
            for frag in rb.fragments(text, sub.fragment_size, f"frag:{next(self._client_ids)}"):
                self._enqueue(client, rb.encode(frag))
        else:
            self._enqueue(client, text)

    def _enqueue(self, client: _Client, text: str) -> None:
        if client.queue.full():
            client.queue.get_nowait()  # drop the oldest: a slow reader never stalls the arm
            client.dropped += 1
            self.stats["dropped_outgoing"] += 1
        client.queue.put_nowait(text)

    def _reject(self, client: _Client, reason: str, msg_id: str | None = None) -> None:
        self.stats["rejected"] += 1
        self.rejections.append(reason)
        now = time.monotonic()
        if now - self._last_reject_log > 0.5:  # at most two log lines a second under a flood
            log.warning("rejected a message from %s: %s (%d rejected so far)", client.name, reason,
                        self.stats["rejected"])
            self._last_reject_log = now
        self._enqueue(client, rb.encode(rb.status("error", reason[:500], msg_id)))

    # -- incoming -------------------------------------------------------------------------------------
    def handle_text(self, client: _Client, text, depth: int = 0) -> None:
        """Process one incoming frame; any fault becomes a rejection, never a command."""
        self.stats["received"] += 1
        msg_id = None
        try:
            message = rb.decode(text, self.config.max_message_bytes)
            msg_id = rb.message_id(message)
            op = message["op"]
            if op in ("fragment", "png"):
                if depth > 0:
                    raise rb.ProtocolError(f"{op} inside a fragment or png message is not allowed")
                inner = (client.fragments.add(message) if op == "fragment"
                         else rb.png_decompress(message, self.config.max_message_bytes))
                if inner is not None:
                    self.handle_text(client, inner, depth + 1)
                return
            handler = getattr(self, f"_op_{op}", None)
            if handler is None:
                raise rb.ProtocolError(f"unknown op {op[:40]!r}")
            handler(client, message)
        except (rb.ProtocolError, M.MessageError) as err:
            self._reject(client, str(err), msg_id)
        except Exception as err:  # never let a crafted message take the server down
            log.exception("unexpected error handling a message")
            self._reject(client, f"internal error: {type(err).__name__}", msg_id)

    def _op_advertise(self, client: _Client, message: dict) -> None:
        topic = rb.name_field(message, "topic")
        client.advertised[topic] = rb.name_field(message, "type")

    def _op_unadvertise(self, client: _Client, message: dict) -> None:
        client.advertised.pop(rb.name_field(message, "topic"), None)

    def _op_subscribe(self, client: _Client, message: dict) -> None:
        topic = rb.name_field(message, "topic")
        rb.optional_str(message, "type")
        compression = rb.optional_str(message, "compression", "none") or "none"
        if compression not in rb.COMPRESSIONS:
            raise rb.ProtocolError(f"subscribe: compression {compression!r} is not supported; use one of "
                                   f"{', '.join(rb.COMPRESSIONS)}")
        throttle = rb.optional_int(message, "throttle_rate", 0)
        rb.optional_int(message, "queue_length", 0)
        fragment_size = message.get("fragment_size")
        fragment_size = rb.optional_int(message, "fragment_size", 0, 1) if fragment_size is not None else None
        subs = client.subscriptions.setdefault(topic, {})
        if len(subs) >= 64 or sum(len(s) for s in client.subscriptions.values()) >= 1024:
            raise rb.ProtocolError("subscribe: too many subscriptions on this connection")
        subs[rb.message_id(message)] = _Subscription(rb.message_id(message), compression, throttle / 1000.0,
                                                     fragment_size)

    def _op_unsubscribe(self, client: _Client, message: dict) -> None:
        topic = rb.name_field(message, "topic")
        subs = client.subscriptions.get(topic, {})
        sub_id = rb.message_id(message)
        if sub_id is None or sub_id not in subs:
            subs.clear()
        else:
            del subs[sub_id]
        if not subs:
            client.subscriptions.pop(topic, None)

    def _op_set_level(self, client: _Client, message: dict) -> None:
        level = rb.optional_str(message, "level")
        if level not in rb.STATUS_LEVELS:
            raise rb.ProtocolError(f"set_level: level must be one of {', '.join(rb.STATUS_LEVELS)}")

    def _op_publish(self, client: _Client, message: dict) -> None:
        cfg = self.config
        topic = rb.name_field(message, "topic")
        msg = message.get("msg")
        if not isinstance(msg, dict):
            raise rb.ProtocolError("publish: field 'msg' must be an object")
        if topic == cfg.twist_topic:
            linear, angular, frame = M.parse_twist_stamped(msg, "TwistStamped")
            if frame and frame != cfg.base_frame:
                raise M.MessageError(f"TwistStamped.header.frame_id {frame!r}: this arm takes twists in "
                                     f"{cfg.base_frame!r}")
            linear, angular = self._limit_speed(linear, angular)
            now = time.monotonic()
            self._last_twist = (now, linear, angular)
            self.commands.append((now, linear.copy(), angular.copy()))
            self.stats["twists"] += 1
        elif topic == cfg.gripper_topic:
            from envs.scene import GRIPPER_MAX_WIDTH

            self._gripper = M.parse_gripper_command(msg, cfg.gripper_type, GRIPPER_MAX_WIDTH, "gripper command")
            self.gripper_commands.append((time.monotonic(), self._gripper))
            self.stats["gripper_commands"] += 1
        elif topic in (cfg.camera_topic, cfg.wrist_camera_topic, cfg.joint_states_topic, cfg.ee_pose_topic,
                       cfg.status_topic):
            raise rb.ProtocolError(f"publish: {topic} is published by the arm itself")
        self._publish(topic, msg)

    def _limit_speed(self, linear: np.ndarray, angular: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        # Servo scales an over-limit command down along its own direction (the motion keeps its heading).
        cfg = self.config
        out = []
        for vec, limit, name in ((linear, cfg.max_linear_speed, "linear"), (angular, cfg.max_angular_speed, "angular")):
            peak = float(np.max(np.abs(vec)))
            if peak > limit:
                self.stats[f"scaled_{name}"] += 1
                vec = vec * (limit / peak)
            out.append(vec)
        return out[0], out[1]

    def _op_call_service(self, client: _Client, message: dict) -> None:
        service = rb.name_field(message, "service")
        msg_id = rb.message_id(message)
        args = message.get("args", {})
        if args is None:
            args = {}
        if not isinstance(args, (dict, list)):
            raise rb.ProtocolError("call_service: field 'args' must be an object or a list")
        response = {"op": "service_response", "service": service, "result": False}
        if msg_id is not None:
            response["id"] = msg_id
        if service == self.config.reset_service:
            seed = args.get("seed", self.seed) if isinstance(args, dict) else self.seed
            if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**62:
                raise M.MessageError(f"{service}: seed must be an integer in 0..2**62, got {seed!r}")
            response.update(result=True, values=self._reset(seed))
        else:
            response["values"] = f"no service {service[:80]!r} on this server"
        self._enqueue(client, rb.encode(response))

    def _op_advertise_service(self, client: _Client, message: dict) -> None:
        rb.name_field(message, "service")
        raise rb.ProtocolError("advertise_service: this simulated arm does not host client services")

    # -- websocket plumbing ------------------------------------------------------------------------------
    async def _sender(self, client: _Client) -> None:
        import websockets

        try:
            while True:
                text = await client.queue.get()
                await client.ws.send(text)
        except (websockets.ConnectionClosed, asyncio.CancelledError):
            pass

    async def _handler(self, ws) -> None:
        import websockets

        if len(self._clients) >= self.config.max_clients:
            await ws.close(1013, "too many clients")
            return
        cid = next(self._client_ids)
        client = _Client(ws, f"client {cid} ({ws.remote_address[0]}:{ws.remote_address[1]})",
                         asyncio.Queue(self.config.send_queue), fragments=rb.FragmentBuffer(self.config.max_message_bytes))
        self._clients[cid] = client
        self.stats["connections"] += 1
        sender = asyncio.ensure_future(self._sender(client))
        log.info("%s connected", client.name)
        try:
            async for text in ws:
                self.handle_text(client, text)
        except websockets.ConnectionClosedError as err:
            if err.rcvd is not None and err.rcvd.code == 1009 or (err.sent is not None and err.sent.code == 1009):
                self.stats["rejected"] += 1
                self.rejections.append("message too big: connection closed (1009)")
                log.warning("%s sent a message over %d bytes: connection closed", client.name,
                            self.config.max_message_bytes)
        finally:
            sender.cancel()
            self._clients.pop(cid, None)
            log.info("%s disconnected", client.name)

    async def _serve(self) -> None:
        import websockets

        cfg = self.config
        async with websockets.serve(self._handler, cfg.host, cfg.port, max_size=cfg.max_message_bytes,
                                    max_queue=64, ping_interval=None,
                                    compression=None) as server:  # JPEG frames do not deflate
            self.port = server.sockets[0].getsockname()[1]
            physics = asyncio.ensure_future(self._physics_loop())
            self._ready.set()
            print(f"simulated arm ({cfg.task}, {cfg.backend}): '{self.env.instruction}' serving rosbridge v2 on "
                  f"ws://{cfg.host}:{self.port}", flush=True)
            await self._stop.wait()
            physics.cancel()
            for client in list(self._clients.values()):
                await client.ws.close()

    def _setup(self) -> None:
        self._make_env()

    @property
    def address(self) -> str:
        return f"{self.config.host}:{self.config.port}"

    def stop(self) -> None:
        if not super().stop():
            log.error("the simulated arm server thread did not stop within 10 s")
            return  # never close the simulator under a running thread
        if self.env is not None:
            self.env.close()
            self.env = None

    @property
    def url(self) -> str:
        return f"ws://{self.config.host}:{self.port}"

    def __enter__(self) -> "SimArmServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    """key=value overrides of `SimServerConfig` (e.g. task=PickCube backend=pybullet port=9091)."""
    import sys

    from envs.rendering import configure_mujoco_gl

    args = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in args):
        print(__doc__)
        print("settings (key=value):")
        for f in fields(SimServerConfig):
            print(f"  {f.name}={f.default!r}")
        return
    values: dict[str, Any] = {}
    types = {f.name: type(f.default) for f in fields(SimServerConfig)}
    for arg in args:
        key, sep, value = arg.partition("=")
        if not sep:
            raise SystemExit(f"arguments are key=value settings; got {arg!r} (see --help)")
        if key not in types:
            raise SystemExit(f"unknown setting {key!r}; valid: {', '.join(sorted(types))}")
        kind = types[key]
        try:
            values[key] = (value.lower() in ("1", "true", "yes") if kind is bool
                           else kind(value) if kind in (int, float) else value)
        except ValueError:
            raise SystemExit(f"setting {key}={value!r} must be a {kind.__name__}") from None
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    configure_mujoco_gl()
    server = SimArmServer(SimServerConfig.from_dict(values))
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        if server.env is not None:
            server.env.close()


if __name__ == "__main__":
    main()
