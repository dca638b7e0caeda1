"""Named suites, the Wilson interval, and the evaluation harness end to end."""
import json
import subprocess
import sys

import numpy as np
import pytest

from embodied.evaluation import EvalConfig, ScriptedPolicy, evaluate, wilson_interval
from envs.suites import INITIAL_STATES_PER_TASK, SUITES, get_suite


def test_suite_initial_states_are_fixed_and_distinct():
    suite = get_suite("tabletop10")
    assert len(suite.tasks) == 10
    seeds = suite.episode_seeds("PickCube")
    assert len(seeds) == INITIAL_STATES_PER_TASK == 50
    assert len(set(seeds)) == 50
    assert seeds == get_suite("tabletop10").episode_seeds("PickCube")
    assert seeds[:5] == suite.episode_seeds("PickCube", 5)
    assert seeds != suite.episode_seeds("StackCube")
    assert seeds != suite.episode_seeds("PickCube", seed=1)
    with pytest.raises(ValueError, match="not in suite"):
        SUITES["tabletop_pick_place"].episode_seeds("OpenDrawer")


def test_wilson_interval():
    lo, hi = wilson_interval(9, 10)
    assert lo == pytest.approx(0.5958, abs=1e-3) and hi == pytest.approx(0.9821, abs=1e-3)
    assert wilson_interval(0, 10)[0] == pytest.approx(0.0, abs=1e-12)
    assert wilson_interval(10, 10)[1] == pytest.approx(1.0)
    assert wilson_interval(10, 10)[0] == pytest.approx(0.7225, abs=1e-3)


def test_harness_writes_results_with_vector_envs(tmp_path):
    cfg = EvalConfig(suite="tabletop10", backend="pybullet", episodes_per_task=3, tasks=["ReachTarget", "PressButton"],
                     num_envs=2, image_size=64, videos_per_task=1)
    results = evaluate(ScriptedPolicy(), cfg, tmp_path, show_progress=False)
    on_disk = json.loads((tmp_path / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert set(on_disk) == {"suite", "backend", "policy", "seed", "tasks", "overall", "versions", "episode_seeds",
                            "randomization", "timing"}
    assert on_disk["timing"]["seconds_per_episode"] > 0 and on_disk["timing"]["num_envs"] == cfg.num_envs
    assert on_disk["episode_seeds"]["ReachTarget"] == get_suite("tabletop10").episode_seeds("ReachTarget", 3)
    assert on_disk["overall"]["episodes"] == 6
    for task in ("ReachTarget", "PressButton"):
        r = on_disk["tasks"][task]
        assert set(r) == {"success_rate", "ci95", "episodes", "mean_length"} | ({"stages"} if task == "PressButton" else set())
        assert r["episodes"] == 3 and r["success_rate"] == 1.0
        assert r["ci95"][0] < 1.0 and r["mean_length"] > 1
    assert on_disk["tasks"]["PressButton"]["stages"] == {"button_pressed": 1.0}
    assert {"mujoco", "pybullet", "embodied"} <= set(on_disk["versions"])
    assert (tmp_path / "success_rates.png").stat().st_size > 1000
    assert "| ReachTarget | 100.0% |" in (tmp_path / "results.md").read_text()
    videos = sorted(p.name for p in (tmp_path / "videos").iterdir())
    assert videos == ["PressButton_ep000_success.mp4", "ReachTarget_ep000_success.mp4"]
    episodes = [json.loads(line) for line in (tmp_path / "episodes.jsonl").read_text().splitlines()]
    assert [e["seed"] for e in episodes if e["task"] == "ReachTarget"] == get_suite("tabletop10").episode_seeds("ReachTarget", 3)
    assert all(e["instruction"].startswith(("reach the ", "press the ")) for e in episodes)
    assert [e["stages"] for e in episodes] == [{}] * 3 + [{"button_pressed": True}] * 3
    assert "| PressButton | 100.0% | [0.44, 1.00] | 3 |" in (tmp_path / "results.md").read_text()
    assert "button_pressed 100% |" in (tmp_path / "results.md").read_text()
    # In-process envs (SyncVectorEnv refuses to step a finished env): one env idles through the last
    # episode, and the episodes are the same as the worker processes'. Both runs switch their envs from
    # ReachTarget to PressButton (`set_task`) rather than starting new ones.
    sync = evaluate(ScriptedPolicy(), EvalConfig(**{**cfg.__dict__, "vector": "sync", "videos_per_task": 0}),
                    tmp_path / "sync", show_progress=False)
    assert sync["tasks"] == on_disk["tasks"]
    sync_episodes = [json.loads(line) for line in (tmp_path / "sync" / "episodes.jsonl").read_text().splitlines()]
    assert [(e["task"], e["seed"], e["length"]) for e in sync_episodes] == \
        [(e["task"], e["seed"], e["length"]) for e in episodes]


@pytest.mark.timeout(120)
def test_vector_env_matches_single_env():
    """An AsyncVectorEnv worker reproduces a single env's episode exactly."""
    from embodied.evaluation import make_vector_env
    from envs.env import TabletopEnv

    cfg = EvalConfig(backend="mujoco", image_size=32)
    # The single env renders first, so this process holds a GL context when the workers start
    # (forked workers would deadlock in their renderer then).
    single = TabletopEnv("PushCube", backend="mujoco", image_size=32)
    ref, _ = single.reset(seed=5)
    vec = make_vector_env("PushCube", cfg, 2)
    try:
        obs, _ = vec.reset(seed=[4, 5])
        np.testing.assert_array_equal(obs["image"][1], ref["image"])
        assert obs["instruction"][1] == ref["instruction"]
        actions = np.stack(vec.call("expert_action"))
        obs, *_ = vec.step(actions)
        ref, *_ = single.step(single.expert_action())
        np.testing.assert_array_equal(obs["state"][1], ref["state"])
    finally:
        vec.close()
        single.close()


def test_cli_random_policy(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "embodied.eval", "policy=random", "backend=mujoco",
                           "episodes_per_task=1", "tasks=[ReachTarget]", "image_size=32", "num_envs=1",
                           f"output_dir={out}"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"to {out}" in proc.stdout
    results = json.loads((out / "results.json").read_text())
    assert results["policy"] == "random" and results["overall"]["episodes"] == 1
    assert (out / ".hydra" / "config.yaml").exists()


def test_cli_bad_backend_lists_valid_ones(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "embodied.eval", "backend=gazebo", f"output_dir={tmp_path}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "valid backends: mujoco, pybullet" in proc.stderr


def test_cli_turns_on_the_wrist_camera_for_a_checkpoint_that_reads_it(tmp_path):
    from policies.openvla import OpenVLAPolicy
    from policy_helpers import tiny

    tiny(OpenVLAPolicy, wrist_image=True, decoding="parallel", action_chunk=2).save_pretrained(tmp_path / "policy")
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "embodied.eval", f"policy={tmp_path / 'policy'}", "backend=mujoco",
                           "episodes_per_task=1", "tasks=[ReachTarget]", "num_envs=1", "videos_per_task=0",
                           "binarize_gripper=true", "gripper_threshold=0.7", "gripper_switch_threshold=0.2",
                           "n_action_steps=1", "temporal_ensemble_coeff=0.01", "instruction_clauses=true",
                           "clause_still_steps=4", "clause_release_opening=0.1", f"output_dir={out}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads((out / "results.json").read_text())
    assert results["overall"]["episodes"] == 1
    # the override of the checkpoint's inference setting is recorded with the numbers it produced
    assert results["inference"] == {"n_action_steps": 1, "binarize_gripper": True, "gripper_threshold": 0.7,
                                    "gripper_switch_threshold": 0.2, "temporal_ensemble_coeff": 0.01,
                                    "instruction_clauses": True, "clause_hold_tolerance": 0.003,
                                    "clause_still_steps": 4, "clause_done_threshold": None,
                                    "clause_release_opening": 0.1}
    proc = subprocess.run([sys.executable, "-m", "embodied.eval", f"policy={tmp_path / 'policy'}", "backend=mujoco",
                           "episodes_per_task=1", "tasks=[ReachTarget]", "num_envs=1", "videos_per_task=0",
                           "wrist_camera=false", f"output_dir={tmp_path / 'refused'}"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0 and "no 'wrist_image' key" in proc.stderr


def test_compare_groups_seeds_and_refuses_other_initial_states(tmp_path, capsys):
    from embodied.compare import main as compare
    from embodied.evaluation import RandomPolicy

    def run(name, **kw):
        cfg = EvalConfig(**{"suite": "tabletop10", "backend": "mujoco", "episodes_per_task": 2,
                            "tasks": ["ReachTarget", "PressButton"], "num_envs": 1, "image_size": 16,
                            "videos_per_task": 0, **kw})
        policy = ScriptedPolicy() if name.startswith("expert") else RandomPolicy(seed=len(name))
        evaluate(policy, cfg, tmp_path / name, show_progress=False)

    for name in ("expert", "random_a", "random_b"):
        run(name)
    table = compare([str(tmp_path / "expert"), f"random={tmp_path}/random_*", "--plot", str(tmp_path / "c.png"),
                     "--output", str(tmp_path / "c.md")])
    rows = table.splitlines()
    assert rows[0] == "| run | ReachTarget | PressButton | overall (95% CI) |"
    assert rows[2].startswith(f"| {tmp_path / 'expert'} | 100% | 100% | 100.0% (")
    assert rows[3].startswith(f"| {tmp_path / 'random_a'} | 0% | 0% | 0% |")
    assert rows[5].startswith("| **random: mean of 2** | 0% | 0% | 0.0% (0%-")
    assert (tmp_path / "c.png").stat().st_size > 1000 and table in (tmp_path / "c.md").read_text()
    # how far the episodes got, per stage: the expert pressed every button, the random arm none
    assert f"| stage reached | {tmp_path / 'expert'} | random (2) |" in table
    assert "| PressButton: button_pressed | 100% | 0% |" in table
    # a directory whose name holds "=" (Hydra's override-named runs) is a path, not LABEL=PATH
    (tmp_path / "seed=1").mkdir()
    (tmp_path / "random_a").rename(tmp_path / "seed=1" / "eval")
    assert f"| {tmp_path / 'seed=1' / 'eval'} | 0% | 0% |" in compare([str(tmp_path / "seed=1" / "eval")])
    # a difference of initial states is not a difference of policies: refused, naming the evaluation
    run("expert_more", episodes_per_task=3)
    with pytest.raises(ValueError, match=r"expert_more: ReachTarget ran other initial states"):
        compare([str(tmp_path / "expert"), str(tmp_path / "expert_more")])
    with pytest.raises(FileNotFoundError, match="matches nothing"):
        compare([f"x={tmp_path}/nothing_*"])
    with pytest.raises(FileNotFoundError, match="no results.json there"):
        compare([str(tmp_path)])
    (tmp_path / "other.json").write_text('{"suite": "tabletop10"}')
    with pytest.raises(ValueError, match=r"other.json: not an evaluation's results \(no backend, episode_seeds"):
        compare([str(tmp_path / "other.json")])
