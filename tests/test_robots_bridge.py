"""RosBridgeRobot (roslibpy) against the simulated arm on a real websocket on 127.0.0.1.

Each safety behaviour is checked on the server side: the twists the simulated arm received.
"""
import json
import time

import numpy as np
import pytest

from tests.conftest import SMALL

pytest.importorskip("roslibpy")

from robots.ros_robot import ObservationTimeout, RosBridgeRobot  # noqa: E402
from robots.sim_server import SimArmServer  # noqa: E402

HZ = 10.0


def wait_until(predicate, timeout=3.0, step=0.01):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(step)
    return predicate()


@pytest.fixture(scope="module")
def server():
    srv = SimArmServer({"port": 0, "task": "ReachTarget", "backend": "mujoco", "image_size": SMALL,
                        "randomization": "none"}).start()
    yield srv
    srv.stop()


def make_robot(port, **overrides):
    safety = {"workspace_low": [0.1, -0.6, 0.0], "workspace_high": [0.8, 0.6, 0.7], **overrides.pop("safety", {})}
    cfg = {"port": port, "status_topic": "/embodied/sim/status", "image_size": SMALL, "control_hz": HZ,
           "safety": safety, **overrides}
    robot = RosBridgeRobot(cfg)
    robot.connect()
    return robot


@pytest.fixture
def robot(server):
    server.publish_frames = True
    server.reset(0)
    r = make_robot(server.port)
    yield r
    r.disconnect()


def twists_since(server, t0):
    return [(t, lin, ang) for t, lin, ang in list(server.commands) if t >= t0]


def test_round_trip_observation_and_clamped_command(server, robot):
    obs = robot.get_observation()
    assert obs["image"].shape == (SMALL, SMALL, 3) and obs["image"].dtype == np.uint8
    assert obs["state"].shape == (8,) and np.all(np.isfinite(obs["state"]))
    assert obs["instruction"] == server.env.instruction
    start_x = float(obs["state"][0])
    robot.arm()
    t0 = time.monotonic()
    sent = robot.send_action([0.3, 0, 0, 0, 0, 0, 1])  # 0.3 m asked, 0.05 m per step allowed
    np.testing.assert_allclose(sent, [0.05, 0, 0, 0, 0, 0, 1], atol=1e-6)
    assert robot.last_report.clamped == ["translation"]
    assert wait_until(lambda: len(twists_since(server, t0)) >= 3)
    # the server saw the clamped velocity (0.05 m per 0.1 s step), never the requested one
    peak = max(float(np.max(np.abs(lin))) for _, lin, _ in twists_since(server, t0))
    assert peak == pytest.approx(0.05 * HZ, rel=1e-6)
    # and after one control period, the stream ends with a zero twist
    assert wait_until(lambda: not np.any(list(server.commands)[-1][1]), timeout=1.0)
    # the arm moved about one step along x
    time.sleep(0.3)
    moved = float(robot.get_observation()["state"][0]) - start_x
    assert 0.02 < moved < 0.07


def test_workspace_box_observed_on_the_server(server):
    first = make_robot(server.port)
    x = float(first.get_observation()["state"][0])
    first.disconnect()
    robot = make_robot(server.port, safety={"workspace_high": [x + 0.01, 0.6, 0.7]})
    try:
        robot.get_observation()
        robot.arm()
        t0 = time.monotonic()
        sent = robot.send_action([0.05, 0, 0, 0, 0, 0, 1])
        assert sent[0] == pytest.approx(0.01, abs=2e-3) and "workspace" in robot.last_report.clamped
        assert wait_until(lambda: len(twists_since(server, t0)) >= 2)
        peak = max(float(lin[0]) for _, lin, _ in twists_since(server, t0))
        assert peak == pytest.approx(float(sent[0]) * HZ, rel=1e-5) and peak < 0.05 * HZ / 2
    finally:
        robot.disconnect()


def test_estop_from_a_ros_topic_halts_and_latches(server, robot):
    from websockets.sync.client import connect

    robot.get_observation()
    robot.arm()
    robot.send_action([0.0, 0.03, 0, 0, 0, 0, 1])
    with connect(f"ws://127.0.0.1:{server.port}") as operator:
        operator.send(json.dumps({"op": "advertise", "topic": "/embodied/estop", "type": "std_msgs/Bool"}))
        t_estop = time.monotonic()  # before the publish: the whole relay can finish before send() returns
        operator.send(json.dumps({"op": "publish", "topic": "/embodied/estop", "msg": {"data": True}}))
        assert wait_until(lambda: robot.safety.estopped, timeout=2.0)
    assert "ROS topic /embodied/estop" in robot.safety.stop_reason
    # the server got a zero twist after the e-stop, and no motion since
    assert wait_until(lambda: any(not np.any(lin) for _, lin, _ in twists_since(server, t_estop)), timeout=1.0)
    t1 = time.monotonic()
    sent = robot.send_action([0.05, 0, 0, 0, 0, 0, 1])
    assert not np.any(sent[:6])
    time.sleep(0.2)
    assert all(not np.any(lin) and not np.any(ang) for _, lin, ang in twists_since(server, t1))
    with pytest.raises(RuntimeError, match="emergency stop is latched"):
        robot.arm()


def test_watchdog_halts_within_two_periods_of_a_stale_observation(server, robot):
    robot.get_observation()
    robot.arm()
    server.publish_frames = False  # the camera and state stop
    try:
        last_frame = server.frame_times[-1]
        for _ in range(3):  # the policy keeps asking for motion
            robot.send_action([0.02, 0, 0, 0, 0, 0, 1])
            time.sleep(0.05)
        assert wait_until(lambda: robot.halt_events, timeout=1.0)
        event = robot.halt_events[-1]
        assert event["reason"].startswith("stale observation") and robot.safety.halted
        # halt (zero twist sent) within two control periods of the last frame the robot received
        assert event["time"] - event["observation_time"] <= 2.0 / HZ
        def zeros_after():
            return [t for t, lin, ang in twists_since(server, last_frame) if not np.any(lin) and not np.any(ang)]

        assert wait_until(zeros_after, timeout=2.0)
        zero_after = zeros_after()
        assert zero_after[0] - last_frame <= 2.0 / HZ + 0.05  # + delivery on a loaded machine
        t1 = time.monotonic()
        assert not np.any(robot.send_action([0.02, 0, 0, 0, 0, 0, 1])[:6])
        time.sleep(0.15)
        assert all(not np.any(lin) for _, lin, _ in twists_since(server, t1))
        with pytest.raises(ObservationTimeout, match="no new camera image from ws://127.0.0.1"):
            robot.get_observation(timeout=0.2)
    finally:
        server.publish_frames = True


def test_dry_run_publishes_nothing(server):
    robot = make_robot(server.port, dry_run=True)
    try:
        robot.get_observation()
        robot.arm()
        twists, grips = server.stats["twists"], server.stats["gripper_commands"]
        sent = robot.send_action([0.01, 0.0, 0.0, 0.0, 0.0, 0.1, 0.0])
        time.sleep(0.25)
        assert server.stats["twists"] == twists and server.stats["gripper_commands"] == grips
        logged = [p for p in robot.published if p[1] == "twist" and np.any(p[2])]
        assert logged and np.allclose(logged[0][2][:3], np.asarray(sent[:3]) * HZ)
    finally:
        robot.disconnect()


def test_unarmed_and_non_finite_actions_never_move_the_arm(server, robot):
    robot.get_observation()
    t0 = time.monotonic()
    assert not np.any(robot.send_action([0.05, 0, 0, 0, 0, 0, 1])[:6])  # not armed yet
    robot.arm()
    assert not np.any(robot.send_action([np.nan, 0.01, 0, 0, 0, 0, 1])[:6])
    assert not np.any(robot.send_action([0.01, 0, np.inf, 0, 0, 0, 1])[:6])
    assert wait_until(lambda: len(twists_since(server, t0)) >= 3)
    received = twists_since(server, t0)
    assert all(np.all(np.isfinite(lin)) and not np.any(lin) for _, lin, _ in received)
    assert robot.safety.rejected == 2


def test_connection_drop_halts_within_two_periods():
    srv = SimArmServer({"port": 0, "task": "ReachTarget", "image_size": SMALL, "randomization": "none"}).start()
    robot = make_robot(srv.port)
    try:
        robot.get_observation()
        robot.arm()
        robot.send_action([0.01, 0, 0, 0, 0, 0, 1])
        dropped = time.monotonic()
        srv.stop()
        assert wait_until(lambda: robot.halt_events, timeout=2.0)
        reason = robot.halt_events[-1]["reason"]
        assert reason in ("connection lost",) or reason.startswith("stale observation")
        assert robot.halt_events[-1]["time"] - dropped <= 2.0 / HZ + 0.1  # + the server's own shutdown
        assert not np.any(robot.send_action([0.02, 0, 0, 0, 0, 0, 1])[:6])
    finally:
        robot.disconnect()


def test_a_failing_policy_stops_the_arm_and_keeps_the_steps(server, robot):
    from embodied.deploy import run_episode

    class FailsOnThirdCall:
        calls = 0

        def predict_action(self, observation, instruction):
            self.calls += 1
            if self.calls == 3:
                raise RuntimeError("model fell over")
            return np.array([0.01, 0, 0, 0, 0, 0, 1], np.float32)

    robot.get_observation()
    robot.arm()
    record = run_episode(robot, FailsOnThirdCall(), "reach", max_steps=10, show_progress=False)
    assert len(record) == 2 and len(record.images) == 2
    assert record.stop_reason == "error: RuntimeError: model fell over" and isinstance(record.error, RuntimeError)
    assert not robot.safety.armed
    time.sleep(0.15)
    assert not np.any(list(server.commands)[-1][1])  # the last command the arm got is a stop


def test_png_compression_and_fragments_both_ways(server):
    from websockets.sync.client import connect

    from robots import messages as M
    from robots import rosbridge as rb

    with connect(f"ws://127.0.0.1:{server.port}") as ws:
        ws.send(json.dumps({"op": "subscribe", "id": "p", "topic": "/embodied/ee_pose", "compression": "png",
                            "fragment_size": 100}))
        frags, deadline = rb.FragmentBuffer(), time.monotonic() + 3
        text = None
        while text is None and time.monotonic() < deadline:
            msg = json.loads(ws.recv(timeout=3))
            if msg["op"] == "fragment":
                text = frags.add(msg)
        outer = json.loads(text)
        assert outer["op"] == "png"
        inner = json.loads(rb.png_decompress(outer))
        assert inner["topic"] == "/embodied/ee_pose" and M.parse_pose_stamped(inner["msg"])[0].shape == (3,)
        # the other way: a twist sent png-compressed, then one split into fragments
        t0 = time.monotonic()
        twist = {"op": "publish", "topic": "/servo_node/delta_twist_cmds",
                 "msg": M.twist_stamped([0.0, 0.0, 0.0123], [0, 0, 0], "panda_link0", 1.0)}
        ws.send(json.dumps(rb.png_compress(json.dumps(twist))))
        twist["msg"]["twist"]["linear"]["z"] = 0.0456
        for frag in rb.fragments(json.dumps(twist), 40, "f1"):
            ws.send(json.dumps(frag))
        assert wait_until(lambda: len(twists_since(server, t0)) >= 2)
        assert [round(float(lin[2]), 4) for _, lin, _ in twists_since(server, t0)][:2] == [0.0123, 0.0456]
