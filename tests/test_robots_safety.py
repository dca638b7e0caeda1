"""The safety layer on its own: clamps, workspace, gating, watchdog, e-stop, config errors."""
import os
import time

import numpy as np
import pytest

from robots.safety import KeyboardEstop, SafetyConfig, SafetyLayer

HOME = np.array([0.4, 0.0, 0.3])


def armed(**overrides) -> SafetyLayer:
    layer = SafetyLayer({"require_arming": True, **overrides})
    layer.arm()
    return layer


def test_translation_and_rotation_are_clamped_per_axis():
    layer = armed(max_translation_per_step=0.05, max_rotation_per_step=0.1)
    report = layer.filter([0.2, -0.01, -0.3, 0.5, 0.05, -0.4, 0.7], HOME)
    np.testing.assert_allclose(report.sent, [0.05, -0.01, -0.05, 0.1, 0.05, -0.1, 0.7], atol=1e-6)
    assert report.sent.dtype == np.float32
    assert set(report.clamped) == {"translation", "rotation"}
    assert report.blocked is None


def test_velocity_limit_tightens_the_step_limit():
    # 0.2 m/s at 10 Hz is 0.02 m per step, tighter than the 0.05 m step clamp
    layer = armed(max_linear_speed=0.2, max_angular_speed=0.5, control_hz=10.0)
    report = layer.filter([0.04, 0.0, 0.0, 0.2, 0.0, 0.0, 1.0], HOME)
    np.testing.assert_allclose(report.sent[:4], [0.02, 0.0, 0.0, 0.05], atol=1e-6)


def test_workspace_box_inside_and_outside():
    layer = armed(workspace_low=[0.3, -0.2, 0.1], workspace_high=[0.5, 0.2, 0.4])
    near_edge = np.array([0.49, 0.0, 0.3])
    report = layer.filter([0.05, 0, 0, 0, 0, 0, 1], near_edge)
    np.testing.assert_allclose(report.sent[0], 0.01, atol=1e-6)
    assert "workspace" in report.clamped
    # outside the box (z below the floor): only motion back towards it, at most one step
    below = np.array([0.4, 0.0, 0.0])
    report = layer.filter([0, 0, -0.05, 0, 0, 0, 1], below)
    np.testing.assert_allclose(report.sent[2], 0.05, atol=1e-6)


def test_gripper_clipped_and_non_finite_rejected():
    layer = armed()
    assert layer.filter([0, 0, 0, 0, 0, 0, 1.7], HOME).sent[6] == 1.0
    layer.filter([0, 0, 0, 0, 0, 0, 0.0], HOME)
    for bad in ([np.nan, 0, 0, 0, 0, 0, 1], [0, 0, np.inf, 0, 0, 0, 1], [0, 0, 0, 0, 0, 0, -np.inf]):
        report = layer.filter(bad, HOME)
        assert report.blocked == "non-finite action"
        np.testing.assert_array_equal(report.sent, [0, 0, 0, 0, 0, 0, 0.0])  # holds the last gripper (closed)
    assert layer.rejected == 3


def test_wrong_shape_raises_with_the_shape():
    with pytest.raises(ValueError, match=r"shape \(7,\).*got shape \(6,\)"):
        armed().filter(np.zeros(6), HOME)


def test_no_motion_before_arming_and_after_estop():
    layer = SafetyLayer({"require_arming": True})
    report = layer.filter([0.01, 0, 0, 0, 0, 0, 1], HOME)
    assert report.blocked == "not armed" and not report.sent[:6].any()
    layer.arm()
    assert layer.filter([0.01, 0, 0, 0, 0, 0, 1], HOME).blocked is None
    assert layer.emergency_stop("test") is True
    assert layer.emergency_stop("again") is False  # latched once
    report = layer.filter([0.01, 0, 0, 0, 0, 0, 1], HOME)
    assert report.blocked.startswith("emergency stop (test)") and not report.sent[:6].any()
    with pytest.raises(RuntimeError, match="emergency stop is latched"):
        layer.arm()
    layer.reset_estop()
    assert layer.filter([0.01, 0, 0, 0, 0, 0, 1], HOME).blocked == "not armed"  # reset does not re-arm
    layer.arm()
    assert layer.filter([0.01, 0, 0, 0, 0, 0, 1], HOME).blocked is None


def test_watchdog_stale_observation_and_lost_connection_latch():
    layer = armed(max_observation_age_s=0.1, watchdog_period_s=0.02, control_hz=10.0)
    now = 100.0
    assert layer.check_watchdog(now - 0.05, True, now) is None
    reason = layer.check_watchdog(now - 0.15, True, now)
    assert reason.startswith("stale observation")
    assert layer.halted
    # fresh observations do not clear a latched halt: rearm does
    assert layer.check_watchdog(now, True, now) is None
    assert layer.filter([0.01, 0, 0, 0, 0, 0, 1], HOME).blocked.startswith("watchdog halt (stale observation")
    layer.rearm()
    assert layer.filter([0.01, 0, 0, 0, 0, 0, 1], HOME).blocked is None
    assert layer.check_watchdog(now, False, now) == "connection lost"
    assert layer.halted


def test_action_from_a_stale_observation_is_not_sent():
    layer = armed(max_action_latency_s=0.3)
    assert layer.filter([0.01, 0, 0, 0, 0, 0, 1], HOME, observation_age=0.1).blocked is None
    report = layer.filter([0.01, 0, 0, 0, 0, 0, 1], HOME, observation_age=0.8)
    assert report.blocked == "stale action (observation 0.800 s old)" and not report.sent[:6].any()
    assert layer.blocked_counts == {"stale action": 1} and not layer.halted  # refused, not latched


def test_missing_position_blocks_motion():
    report = armed().filter([0.01, 0, 0, 0, 0, 0, 1], None)
    assert report.blocked == "no TCP position to check the workspace"


def test_config_errors_name_the_setting():
    with pytest.raises(ValueError, match=r"unknown safety setting\(s\) \['max_speed'\]"):
        SafetyConfig.from_dict({"max_speed": 1.0})
    with pytest.raises(ValueError, match="workspace_low .* must be below"):
        SafetyConfig(workspace_low=(0.5, 0, 0), workspace_high=(0.4, 1, 1))
    with pytest.raises(ValueError, match="max_translation_per_step must be a positive number"):
        SafetyConfig(max_translation_per_step=float("nan"))
    with pytest.raises(ValueError, match="two control periods"):
        SafetyConfig(control_hz=10.0, max_observation_age_s=0.2, watchdog_period_s=0.05)


def test_keyboard_key_latches_the_estop_through_a_terminal():
    master, slave = os.openpty()
    stream = os.fdopen(slave, "r")
    layer = armed()
    keyboard = KeyboardEstop(layer, keys=["space"], stream=stream)
    try:
        assert keyboard.start()
        os.write(master, b"x")  # another key does nothing
        time.sleep(0.15)
        assert not layer.estopped
        os.write(master, b" ")
        deadline = time.monotonic() + 2
        while not layer.estopped and time.monotonic() < deadline:
            time.sleep(0.01)
        assert layer.estopped and "key ' ' pressed" in layer.stop_reason
    finally:
        keyboard.stop()
        stream.close()
        os.close(master)
