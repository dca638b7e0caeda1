"""Deployment speed on loopback: control loop, policy server, watchdog.

    python benchmarks/robots_deploy.py [--steps 100] [--clients 1,2,4,8] [--seconds 4] [--trials 20]

1. Control loop against the simulated arm (robots.sim_server, MuJoCo, 128 px) over rosbridge with
   roslibpy: achieved rate vs the nominal control rate, and the latency from a camera frame
   leaving the server to the twist it caused arriving back at the server (policy + bridge round
   trip; `random` policy, so this is the bridge's own cost), vs one control period.
2. Policy server (embodied.serve, msgpack, 224 px images): requests/s and latency with N
   concurrent clients, vs the same policy called in-process.
3. Watchdog: time from the last camera frame to the halt (zero twist received by the arm), vs the
   required bound of two control periods.

Everything runs in one process on 127.0.0.1, side by side, and prints a Markdown table.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import threading
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.rendering import configure_mujoco_gl  # noqa: E402

configure_mujoco_gl()

from embodied.deploy import run_episode  # noqa: E402
from embodied.policy_loader import RandomPolicy  # noqa: E402
from embodied.serve import PolicyServer, RemotePolicy  # noqa: E402
from robots.ros_robot import RosBridgeRobot  # noqa: E402
from robots.sim_server import SimArmServer  # noqa: E402

HZ = 10.0
SAFETY = {"workspace_low": [0.05, -0.6, 0.0], "workspace_high": [0.85, 0.6, 0.7]}


def pct(values, q):
    return float(np.percentile(np.asarray(values), q)) if values else float("nan")


def control_loop(steps: int, image_size: int = 128) -> dict:
    server = SimArmServer({"port": 0, "image_size": image_size, "randomization": "none"}).start()
    robot = RosBridgeRobot({"port": server.port, "image_size": image_size, "control_hz": HZ,
                            "status_topic": "/embodied/sim/status", "safety": SAFETY})
    robot.connect()
    try:
        robot.get_observation(timeout=5)
        robot.arm()
        frames_before = len(server.frame_times)
        record = run_episode(robot, RandomPolicy(0), "reach", steps, stop_on_success=False, show_progress=False)
        frames = list(server.frame_times)[frames_before:]
        commands = [t for t, lin, ang in list(server.commands) if np.any(lin) or np.any(ang)]
        # latency: for each frame, the first non-zero twist the server received after it
        latencies = []
        j = 0
        for k, t_frame in enumerate(frames):
            t_next = frames[k + 1] if k + 1 < len(frames) else float("inf")
            while j < len(commands) and commands[j] < t_frame:
                j += 1
            if j < len(commands) and commands[j] < t_next:
                latencies.append((commands[j] - t_frame) * 1000)
        summary = record.stats.summary()
        return {"steps": len(record), "rate_hz": summary["rate_hz"], "latency_ms": latencies,
                "policy_ms": record.stats.values["policy_ms"], "stop": record.stop_reason}
    finally:
        robot.disconnect()
        server.stop()


def policy_server(clients: list[int], seconds: float, image_size: int = 224) -> list[dict]:
    policy = RandomPolicy(0)
    obs = {"image": np.random.default_rng(0).integers(0, 255, (image_size, image_size, 3), dtype=np.uint8),
           "state": np.zeros(8, np.float32)}
    t0 = time.perf_counter()
    n_local = 0
    while time.perf_counter() - t0 < 1.0:
        policy.predict_action(obs, "reach")
        n_local += 1
    local_rate = n_local / (time.perf_counter() - t0)
    server = PolicyServer(policy, port=0).start()
    rows = []
    try:
        for n in clients:
            lat: list[float] = []
            server_ms: list[float] = []
            lock = threading.Lock()
            start = threading.Barrier(n + 1)

            def worker():
                remote = RemotePolicy(server.url)
                start.wait()
                end = time.perf_counter() + seconds
                mine, theirs = [], []
                while time.perf_counter() < end:
                    t = time.perf_counter()
                    remote.predict_action(obs, "reach")
                    mine.append((time.perf_counter() - t) * 1000)
                    theirs.append(remote.last_timing["server_ms"])
                remote.close()
                with lock:
                    lat.extend(mine)
                    server_ms.extend(theirs)

            threads = [threading.Thread(target=worker) for _ in range(n)]
            for t in threads:
                t.start()
            start.wait()
            began = time.perf_counter()
            for t in threads:
                t.join()
            elapsed = time.perf_counter() - began
            rows.append({"clients": n, "req_s": len(lat) / elapsed, "p50_ms": pct(lat, 50), "p95_ms": pct(lat, 95),
                         "server_p50_ms": pct(server_ms, 50), "local_rate": local_rate})
    finally:
        server.stop()
    return rows


def watchdog(trials: int) -> dict:
    server = SimArmServer({"port": 0, "image_size": 64, "randomization": "none"}).start()
    robot = RosBridgeRobot({"port": server.port, "image_size": 64, "control_hz": HZ, "safety": SAFETY})
    robot.connect()
    detect, halt_at_arm = [], []
    try:
        for _ in range(trials):
            server.publish_frames = True
            time.sleep(0.3)
            robot.get_observation(timeout=5)
            robot.arm()
            robot.send_action([0.01, 0, 0, 0, 0, 0, 1])
            server.publish_frames = False
            last = server.frame_times[-1]
            for _ in range(20):  # the policy keeps asking for motion
                robot.send_action([0.01, 0, 0, 0, 0, 0, 1])
                if robot.safety.halted:
                    break
                time.sleep(0.02)
            deadline = time.monotonic() + 1
            while not robot.safety.halted and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.05)
            detect.append((robot.halt_events[-1]["time"] - last) * 1000)
            zeros = [t for t, lin, ang in list(server.commands) if t > last and not np.any(lin) and not np.any(ang)]
            halt_at_arm.append((zeros[0] - last) * 1000 if zeros else float("nan"))
    finally:
        robot.disconnect()
        server.stop()
    return {"detect_ms": detect, "arm_ms": halt_at_arm}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--clients", default="1,2,4,8")
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--trials", type=int, default=20)
    args = parser.parse_args()

    loop = control_loop(args.steps)
    period_ms = 1000 / HZ
    print("### Control loop (simulated arm over rosbridge, loopback, random policy)\n")
    print("| steps | rate (Hz) | rate / nominal 10 Hz | frame→twist p50 (ms) | p95 (ms) | max (ms) | p95 / period |")
    print("|---|---|---|---|---|---|---|")
    lat = loop["latency_ms"]
    print(f"| {loop['steps']} | {loop['rate_hz']:.2f} | {loop['rate_hz'] / HZ:.3f} | {pct(lat, 50):.1f} | "
          f"{pct(lat, 95):.1f} | {max(lat):.1f} | {pct(lat, 95) / period_ms:.3f} |\n")

    rows = policy_server([int(c) for c in args.clients.split(",")], args.seconds)
    print("### Policy server (msgpack, 224x224 image, random policy)\n")
    print(f"In-process calls of the same policy: {rows[0]['local_rate']:.0f} /s.\n")
    print("| clients | requests/s | vs 1 client | client p50 (ms) | client p95 (ms) | server p50 (ms) |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['clients']} | {r['req_s']:.0f} | {r['req_s'] / rows[0]['req_s']:.2f} | {r['p50_ms']:.2f} | "
              f"{r['p95_ms']:.2f} | {r['server_p50_ms']:.2f} |")

    wd = watchdog(args.trials)
    bound = 2 * period_ms
    print(f"\n### Watchdog: last camera frame → halt ({args.trials} trials, bound 2 periods = {bound:.0f} ms)\n")
    print("| measured at | mean (ms) | max (ms) | max / bound |")
    print("|---|---|---|---|")
    for name, values in (("robot (halt latched, zero twist sent)", wd["detect_ms"]),
                         ("arm (zero twist received)", wd["arm_ms"])):
        print(f"| {name} | {statistics.mean(values):.1f} | {max(values):.1f} | {max(values) / bound:.3f} |")


if __name__ == "__main__":
    main()
