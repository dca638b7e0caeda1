"""Fuzz: >= 10,000 random and malformed rosbridge messages against the simulated arm's server and
against the robot's bridge client. Pass = nothing crashes and no unsafe command gets through."""
import asyncio
import base64
import json
import threading
import time

import numpy as np
import pytest

from tests.conftest import SMALL

pytest.importorskip("roslibpy")

from robots import messages as M  # noqa: E402
from robots.ros_robot import RosBridgeRobot  # noqa: E402
from robots.sim_server import SimArmServer  # noqa: E402

N_SERVER = 10_000
N_BRIDGE = 10_000
TWIST = "/servo_node/delta_twist_cmds"
GRIPPER = "/embodied/gripper_command"
TOPICS = [TWIST, GRIPPER, "/embodied/estop", "/camera/color/image_raw/compressed", "/joint_states",
          "/embodied/ee_pose", "/embodied/sim/status", "/other"]
WEIRD = [None, True, False, 0, -1, 1e308, -1e308, "NaN", "inf", "", "x" * 300, [], {}, [1, 2], {"x": 1},
         2**70, -2**70, 3.5, "\u0000", "💥"]


def pick(rng, seq):
    return seq[int(rng.integers(len(seq)))]


def weird(rng):
    return WEIRD[rng.integers(len(WEIRD))]


def random_json(rng, depth=0):
    kind = rng.integers(6 if depth < 3 else 3)
    if kind == 0:
        return weird(rng)
    if kind == 1:
        return float(rng.normal() * 10.0 ** rng.integers(0, 12))
    if kind == 2:
        return "".join(chr(c) for c in rng.integers(32, 0x2FF, size=rng.integers(0, 20)))
    if kind == 3:
        return [random_json(rng, depth + 1) for _ in range(rng.integers(0, 4))]
    return {str(weird(rng)) if rng.random() < 0.3 else k: random_json(rng, depth + 1)
            for k in [pick(rng, ["op", "topic", "msg", "id", "data", "x", "twist"]) for _ in range(rng.integers(0, 4))]}


def twist_msg(rng):
    vec = lambda: {k: (weird(rng) if rng.random() < 0.2 else float(rng.normal() * 10.0 ** rng.integers(-2, 6)))  # noqa: E731
                   for k in "xyz" if rng.random() > 0.05}
    msg = {"header": {"stamp": {"sec": 1, "nanosec": 0}, "frame_id": "panda_link0" if rng.random() < 0.9 else "odd"},
           "twist": {"linear": vec(), "angular": vec()}}
    if rng.random() < 0.1:
        msg["twist"] = weird(rng)
    return msg


def server_message(rng, i):
    """One frame for the server: text (mostly JSON) or bytes."""
    r = rng.random()
    if r < 0.04:
        return bytes(rng.integers(0, 256, size=rng.integers(1, 64), dtype=np.uint8))
    if r < 0.08:
        return "".join(chr(c) for c in rng.integers(1, 0x7F, size=rng.integers(1, 80)))
    if r < 0.10:
        return "[" * 5000 + "]" * 5000  # deep nesting
    if r < 0.12:
        return '{"op": "publish", "topic": "%s", "msg": {"twist": {"linear": {"x": NaN, "y": 1e400, "z": 0}, ' \
               '"angular": {"x": 0, "y": 0, "z": Infinity}}}}' % TWIST
    if r < 0.20:
        return json.dumps(random_json(rng))
    if r < 0.50:
        return json.dumps({"op": "publish", "topic": TWIST if rng.random() < 0.8 else GRIPPER,
                           "msg": twist_msg(rng) if rng.random() < 0.7 else random_json(rng)})
    if r < 0.58:
        return json.dumps({"op": "publish", "topic": GRIPPER,
                           "msg": {"data": weird(rng) if rng.random() < 0.5 else float(rng.normal() * 3)}})
    if r < 0.66:
        return json.dumps({"op": pick(rng, ["subscribe", "unsubscribe", "advertise", "unadvertise"]),
                           "topic": pick(rng, TOPICS) if rng.random() < 0.7 else weird(rng),
                           "type": weird(rng) if rng.random() < 0.3 else "x/Y",
                           "compression": pick(rng, ["none", "png", "cbor", "zip"]) if rng.random() < 0.5 else weird(rng),
                           "throttle_rate": weird(rng), "fragment_size": weird(rng), "id": f"s{i}"})
    if r < 0.76:
        return json.dumps({"op": "fragment", "id": weird(rng) if rng.random() < 0.2 else f"f{rng.integers(30)}",
                           "data": weird(rng) if rng.random() < 0.2 else '{"op": "publish", "topic"',
                           "num": int(rng.integers(-2, 5)), "total": pick(rng, [1, 2, 3, 10**9])})
    if r < 0.80:
        return json.dumps({"op": "png", "data": base64.b64encode(bytes(rng.integers(0, 256, 40, dtype=np.uint8))).decode()
                           if rng.random() < 0.5 else weird(rng)})
    if r < 0.86:
        return json.dumps({"op": "call_service", "service": "/embodied/sim/reset" if rng.random() < 0.1 else "/nope",
                           "args": pick(rng, [{"seed": weird(rng)}, weird(rng)]), "id": f"c{i}"})
    if r < 0.92:
        return json.dumps({"op": pick(rng, ["status", "set_level", "advertise_service", "service_response", "op",
                                             "publish"]), "level": weird(rng), "service": weird(rng), "msg": weird(rng),
                           "topic": weird(rng)})
    # well-formed twists: they are commands, and must stay within the servo limits when applied
    scale = 10.0 ** rng.integers(-3, 3)
    return json.dumps({"op": "publish", "topic": TWIST, "msg": M.twist_stamped(
        rng.normal(size=3) * scale, rng.normal(size=3) * scale, "panda_link0", 1.0)})


def test_fuzz_the_sim_server():
    from websockets.sync.client import connect

    srv = SimArmServer({"port": 0, "task": "ReachTarget", "image_size": SMALL, "randomization": "none",
                        "max_message_bytes": 100_000}).start()
    rng = np.random.default_rng(0)
    url = f"ws://127.0.0.1:{srv.port}"
    sent = 0
    def open_ws():
        return connect(url, max_size=None, close_timeout=0.2).__enter__()

    ws = open_ws()
    try:
        while sent < N_SERVER:
            if sent % 2500 == 7:  # an oversized frame: the server closes with 1009, the fuzzer reconnects
                # Messages still queued unread when the server fails the connection are dropped with it (a
                # slow machine leaves a few dozen): let the server catch up first, so that the count below
                # checks the server's reading, not this race.
                caught_up = time.monotonic() + 10
                while srv.stats["received"] < sent - sent // 2500 and time.monotonic() < caught_up:
                    time.sleep(0.01)
                ws.send("x" * 150_000)
                sent += 1
                ws.close()
                ws = open_ws()
                continue
            ws.send(server_message(rng, sent))
            sent += 1
            if sent % 200 == 0:  # drain replies so neither side stalls on buffers
                while True:
                    try:
                        ws.recv(timeout=0)
                    except TimeoutError:
                        break
        deadline = time.monotonic() + 20
        while srv.stats["received"] < N_SERVER and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)
        assert srv._thread.is_alive()
        assert srv.stats["received"] >= N_SERVER - 4  # all but the oversized frames were read
        assert srv.stats["rejected"] > N_SERVER * 0.5
        cfg = srv.config
        for _, linear, angular in list(srv.commands):  # every accepted command: finite and within the servo limits
            assert np.all(np.isfinite(linear)) and np.all(np.isfinite(angular))
            assert np.max(np.abs(linear)) <= cfg.max_linear_speed + 1e-9
            assert np.max(np.abs(angular)) <= cfg.max_angular_speed + 1e-9
        for _, grip in list(srv.gripper_commands):
            assert 0.0 <= grip <= 1.0
        assert all(np.all(np.isfinite(lin)) for _, _, lin, _, _ in list(srv.applied))
        pos, quat = srv.env.sim.ee_pose()
        assert np.all(np.isfinite(pos)) and np.all(np.isfinite(quat))
        # still serving: a new client subscribes and gets the arm's pose
        with connect(url) as probe:
            probe.send(json.dumps({"op": "subscribe", "topic": "/embodied/ee_pose", "id": "probe"}))
            deadline = time.monotonic() + 3
            got = None
            while time.monotonic() < deadline and got is None:
                msg = json.loads(probe.recv(timeout=3))
                if msg.get("topic") == "/embodied/ee_pose":
                    got = msg
            assert got is not None and M.parse_pose_stamped(got["msg"])[0].shape == (3,)
    finally:
        ws.close()
        srv.stop()


class HostileBridge:
    """A rosbridge 'server' that floods the robot with malformed messages on the topics it
    subscribes to (and valid frames in between), recording every command the robot publishes."""

    def __init__(self, n_messages, seed=1):
        self.n, self.rng = n_messages, np.random.default_rng(seed)
        self.twists, self.grippers, self.other = [], [], []
        self.sent = 0
        self.done = threading.Event()
        self.ready = threading.Event()
        self.image = np.full((SMALL, SMALL, 3), 90, np.uint8)

    def valid_frame(self):
        t = time.time()
        return [("/embodied/ee_pose", M.pose_stamped([0.4, 0.0, 0.3], [1, 0, 0, 0], "panda_link0", t)),
                ("/joint_states", M.joint_state(["panda_finger_joint1", "panda_finger_joint2"], [0.04, 0.04], t)),
                ("/camera/color/image_raw/compressed", M.compressed_image(self.image, t))]

    def bad_message(self, topics):
        rng = self.rng
        topic = pick(rng, topics) if rng.random() < 0.9 else pick(rng, ["close", "ready", "/x", ""])
        r = rng.random()
        if r < 0.01:
            return bytes(rng.integers(0, 256, size=rng.integers(1, 64), dtype=np.uint8))  # a binary frame
        if r < 0.05:
            return "".join(chr(c) for c in rng.integers(1, 0x7F, size=rng.integers(1, 60)))
        if r < 0.10:
            return json.dumps(random_json(rng))
        if r < 0.15:
            return json.dumps({"op": pick(rng, ["status", "fragment", "png", "service_response", "nope"]),
                               "msg": weird(rng), "id": weird(rng), "values": weird(rng)})
        if r < 0.30:  # images: garbage data, wrong formats, huge declared sizes
            return json.dumps({"op": "publish", "topic": topic, "msg": {
                "format": pick(rng, ["jpeg", "png", "bmp", ""]) if rng.random() < 0.8 else weird(rng),
                "data": base64.b64encode(bytes(rng.integers(0, 256, rng.integers(0, 200), dtype=np.uint8))).decode()
                if rng.random() < 0.7 else weird(rng), "height": weird(rng), "width": weird(rng)}})
        if r < 0.50:  # poses: NaN/inf via literals, non-unit quaternions, wrong types, far outside the box
            pos = [weird(rng) if rng.random() < 0.3 else float(rng.normal() * 10.0 ** rng.integers(0, 4)) for _ in "xyz"]
            quat = [weird(rng) if rng.random() < 0.2 else float(rng.normal()) for _ in "xyzw"]
            return json.dumps({"op": "publish", "topic": topic, "msg": {
                "header": {"frame_id": pick(rng, ["panda_link0", "world"])},
                "pose": {"position": dict(zip("xyz", pos)), "orientation": dict(zip("xyzw", quat))}}})
        if r < 0.55:
            return ('{"op": "publish", "topic": "/embodied/ee_pose", "msg": {"pose": {"position": '
                    '{"x": NaN, "y": 1e400, "z": 0}, "orientation": {"x": 0, "y": 0, "z": 0, "w": 1}}}}')
        if r < 0.70:  # joint states
            n = int(rng.integers(0, 4))
            return json.dumps({"op": "publish", "topic": topic, "msg": {
                "name": [pick(rng, ["panda_finger_joint1", "panda_finger_joint2", "j"]) for _ in range(n)]
                if rng.random() < 0.8 else weird(rng),
                "position": [weird(rng) if rng.random() < 0.3 else float(rng.normal()) for _ in range(n)]}})
        if r < 0.80:  # e-stop topic with non-bool data (true would be a real stop): rejected, no crash
            data = weird(rng)
            return json.dumps({"op": "publish", "topic": "/embodied/estop",
                               "msg": {"data": data if not isinstance(data, bool) else "true"}})
        return json.dumps({"op": "publish", "topic": topic, "msg": random_json(self.rng)})

    async def handler(self, ws):
        import websockets

        topics = []

        async def reader():
            async for text in ws:
                msg = json.loads(text)
                if msg.get("op") == "subscribe":
                    topics.append(msg["topic"])
                elif msg.get("op") == "publish" and msg["topic"] == TWIST:
                    self.twists.append(M.parse_twist_stamped(msg["msg"]))
                elif msg.get("op") == "publish" and msg["topic"] == GRIPPER:
                    self.grippers.append(msg["msg"]["data"])
                else:
                    self.other.append(msg)

        read = asyncio.ensure_future(reader())
        try:
            while len(topics) < 3:
                await asyncio.sleep(0.01)
            for _ in range(5):
                for topic, msg in self.valid_frame():
                    await ws.send(json.dumps({"op": "publish", "topic": topic, "msg": msg}))
            self.ready.set()
            await asyncio.sleep(0.2)  # the robot arms on a fresh frame
            topic_list = [t for t in topics if t != "/embodied/estop"]
            while self.sent < self.n:
                if self.sent % 50 == 0:
                    for topic, msg in self.valid_frame():
                        await ws.send(json.dumps({"op": "publish", "topic": topic, "msg": msg}))
                await ws.send(self.bad_message(topic_list))
                self.sent += 1
                if self.sent % 25 == 0:
                    await asyncio.sleep(0.002)  # keep frames flowing at a real rate
            await asyncio.sleep(0.3)
        except websockets.ConnectionClosed:
            pass
        finally:
            self.done.set()
            await asyncio.sleep(0.5)
            read.cancel()

    def run(self, port_box):
        import websockets

        async def main():
            async with websockets.serve(self.handler, "127.0.0.1", 0, max_size=None) as server:
                port_box.append(server.sockets[0].getsockname()[1])
                await asyncio.get_running_loop().run_in_executor(None, self.done.wait)
                await asyncio.sleep(0.6)

        asyncio.run(main())


def test_fuzz_the_robot_bridge():
    hz = 10.0
    bridge = HostileBridge(N_BRIDGE)
    port_box = []
    thread = threading.Thread(target=bridge.run, args=(port_box,), daemon=True)
    thread.start()
    while not port_box:
        time.sleep(0.01)
    robot = RosBridgeRobot({"port": port_box[0], "image_size": SMALL, "control_hz": hz,
                            "safety": {"max_observation_age_s": 0.15}})
    rng = np.random.default_rng(2)
    robot.connect()
    try:
        assert bridge.ready.wait(10)
        robot.get_observation(timeout=5)
        robot.arm()
        sent_actions = []
        while not bridge.done.is_set():
            try:  # act on fresh frames, as a control loop does (stale actions are never sent)
                robot.get_observation(timeout=0.1)
            except TimeoutError:
                pass
            action = rng.normal(size=7) * pick(rng, [0.01, 1.0, 100.0])
            if rng.random() < 0.1:
                action[rng.integers(7)] = pick(rng, [np.nan, np.inf, -np.inf])
            sent_actions.append(robot.send_action(action))
            if robot.safety.halted:  # a burst of garbage may starve the camera: rearm on a fresh frame
                try:
                    robot.get_observation(timeout=0.5)
                    robot.arm()
                except Exception:
                    pass
            time.sleep(0.01)
        assert bridge.sent == N_BRIDGE
        assert robot._thread.is_alive()
        assert sum(robot.rejected_messages.values()) > N_BRIDGE * 0.5
        assert not robot.safety.estopped  # non-bool data on the e-stop topic is rejected, never a stop... or a go
        limit = robot.safety.config.step_translation_limit * hz
        rot_limit = robot.safety.config.step_rotation_limit
        assert any(np.any(lin) for lin, _, _ in bridge.twists), "the robot published no motion at all"
        for linear, angular, frame in bridge.twists:
            assert frame == "panda_link0"
            assert np.all(np.isfinite(linear)) and np.all(np.isfinite(angular))
            assert np.max(np.abs(linear)) <= limit + 1e-6
            # the twist's rotation over one step is a clamped roll-pitch-yaw
            assert np.max(np.abs(M.rotvec_to_rpy(angular / hz))) <= rot_limit + 1e-6
        assert all(isinstance(g, float) and 0.0 <= g <= 1.0 for g in bridge.grippers)
        for a in sent_actions:
            assert np.all(np.isfinite(a))
    finally:
        robot.disconnect()
        bridge.done.set()
        thread.join(timeout=5)
