"""`python -m embodied.collect`: scripted experts → RLDS builder dirs that plain tfds reads."""
import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]
TASKS = ("ReachTarget", "PressButton")
IMAGE = 32

# Reads builder dirs with nothing but tensorflow-datasets, and proves no project code was imported.
PLAIN_TFDS_READER = textwrap.dedent("""
    import json, sys
    import tensorflow_datasets as tfds
    import tensorflow as tf
    paths = sys.stdin.read().split()  # sent once the datasets exist: the import overlaps the collection
    out = {}
    for path in paths:
        builder = tfds.builder_from_directory(path)
        episodes = []
        for episode in builder.as_dataset(split="train"):
            meta = {k: (v.numpy().decode() if v.dtype.name == "string" else v.numpy().item())
                    for k, v in episode["episode_metadata"].items()}
            steps = list(episode["steps"].as_numpy_iterator())
            episodes.append({"metadata": meta, "length": len(steps),
                             "image_shape": list(steps[0]["observation"]["image"].shape),
                             "state_shape": list(steps[0]["observation"]["state"].shape),
                             "actions": [s["action"].tolist() for s in steps],
                             "instruction": steps[0]["language_instruction"].decode(),
                             "is_first": [bool(s["is_first"]) for s in steps],
                             "is_last": [bool(s["is_last"]) for s in steps],
                             "reward": [float(s["reward"]) for s in steps]})
        out[builder.info.name] = {"episodes": episodes,
                                  "num_shards": len(builder.info.splits["train"].shard_lengths)}
    project = sorted(m for m in sys.modules if m.split(".")[0] in ("embodied", "envs", "policies", "worldmodel"))
    print(json.dumps({"datasets": out, "project_modules": project}))
""")


def _clean_env():
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    return env


@pytest.fixture(scope="module")
def collected(tmp_path_factory):
    """MuJoCo through the CLI (2 envs stepped as one vector env; `vector=sync` keeps them in one process,
    which is cheaper than worker processes here) while PyBullet is collected in-process alongside."""
    from embodied.collect import CollectConfig, collect

    outputs = {b: tmp_path_factory.mktemp(f"collect_{b}") for b in ("mujoco", "pybullet")}
    reader = subprocess.Popen([sys.executable, "-c", PLAIN_TFDS_READER], cwd=outputs["pybullet"], env=_clean_env(),
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    command = [sys.executable, "-m", "embodied.collect", "suite=tabletop10", "backend=mujoco", "episodes_per_task=1",
               f"tasks=[{','.join(TASKS)}]", f"image_size={IMAGE}", "num_envs=2", "vector=sync",
               f"output_dir={outputs['mujoco']}"]
    cli = subprocess.Popen(command, cwd=REPO, env={**_clean_env(), "PYTHONPATH": str(REPO)},
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        collect(CollectConfig(backend="pybullet", episodes_per_task=1, tasks=list(TASKS), image_size=IMAGE,
                              num_envs=1), outputs["pybullet"], show_progress=False)
    finally:
        stdout, stderr = cli.communicate(timeout=400)
    assert cli.returncode == 0, f"collect failed:\n{stdout}\n{stderr[-4000:]}"
    builder_dirs = [str(outputs[b] / f"embodied_tabletop10_{b}" / "1.0.0") for b in ("mujoco", "pybullet")]
    read_out, read_err = reader.communicate("\n".join(builder_dirs), timeout=300)
    assert reader.returncode == 0, read_err[-4000:]
    return {"outputs": outputs, "cli": (stdout, stderr), "plain": json.loads(read_out.strip().splitlines()[-1])}


def test_cli_reports_progress_and_where_it_wrote(collected):
    stdout, stderr = collected["cli"]
    builder_dir = collected["outputs"]["mujoco"] / "embodied_tabletop10_mujoco" / "1.0.0"
    assert f"to {builder_dir}" in stdout
    assert "collect tabletop10/mujoco" in stderr and "100%" in stderr  # the progress bar
    for task in TASKS:
        assert re.search(rf"{task}: 1 episodes \(\d+ steps\) kept", stdout)
    assert (collected["outputs"]["mujoco"] / ".hydra" / "config.yaml").exists()


@pytest.mark.parametrize("backend", ["mujoco", "pybullet"])
def test_collect_writes_rlds_that_plain_tfds_reads(collected, backend):
    from envs.suites import get_suite

    out = collected["outputs"][backend]
    name = f"embodied_tabletop10_{backend}"
    builder_dir = out / name / "1.0.0"
    assert (builder_dir / "dataset_info.json").exists() and (builder_dir / "features.json").exists()
    shards = sorted(p.name for p in builder_dir.glob("*.tfrecord-*"))
    assert shards and all(s.startswith(f"{name}-train.tfrecord-") and s.endswith(f"-of-{len(shards):05d}")
                          for s in shards)
    assert collected["plain"]["project_modules"] == []  # read with tfds alone
    episodes = collected["plain"]["datasets"][name]["episodes"]
    assert sorted(e["metadata"]["task"] for e in episodes) == sorted(TASKS)
    suite = get_suite("tabletop10")
    for episode in episodes:
        meta = episode["metadata"]
        assert (meta["suite"], meta["backend"], meta["success"]) == ("tabletop10", backend, 1)
        assert meta["seed"] in suite.episode_seeds(meta["task"], 3, seed=1)  # never an evaluation state
        randomization = json.loads(meta["randomization"])
        assert randomization and "friction" in json.dumps(randomization)
        assert meta["instruction"] == episode["instruction"] and episode["instruction"]
        assert episode["image_shape"] == [IMAGE, IMAGE, 3] and episode["state_shape"] == [8]
        n = episode["length"]
        assert episode["is_first"] == [True] + [False] * (n - 1) and episode["is_last"] == [False] * (n - 1) + [True]
        assert episode["reward"][-1] == 1.0
        actions = np.asarray(episode["actions"])
        assert actions.shape == (n, 7) and np.all(np.abs(actions[:, :3]) <= 0.05 + 1e-6)
        assert set(np.unique(actions[:, 6])) <= {0.0, 1.0}
    summary = json.loads((builder_dir / "collect_summary.json").read_text())
    assert summary["episodes"] == len(episodes) == len(TASKS)
    assert summary["steps"] == sum(e["length"] for e in episodes)
    from envs.experts import expert_revision

    assert json.loads((builder_dir / "metadata.json").read_text())["expert_revision"] == expert_revision()


def test_the_project_loader_reads_what_tfds_reads(collected):
    from embodied.data import RLDSSource

    path = collected["outputs"]["pybullet"] / "embodied_tabletop10_pybullet"
    ours = list(RLDSSource(path, split="train[:100%]").episodes())
    plain = collected["plain"]["datasets"]["embodied_tabletop10_pybullet"]["episodes"]
    assert len(ours) == len(plain)
    for got, expected in zip(ours, plain):
        np.testing.assert_array_equal(got["action"], np.asarray(expected["actions"], np.float32))
        assert got["image"].shape == (expected["length"], IMAGE, IMAGE, 3)
        assert got["instruction"][0] == expected["instruction"]


def test_collect_rejects_bad_arguments(tmp_path):
    from embodied.collect import CollectConfig, collect

    with pytest.raises(ValueError, match="task 'Juggle' is not in suite 'tabletop10'"):
        collect(CollectConfig(tasks=["Juggle"]), tmp_path, show_progress=False)
    with pytest.raises(ValueError, match="unknown backend 'bullet'"):
        collect(CollectConfig(backend="bullet"), tmp_path, show_progress=False)


def test_action_noise_perturbs_execution_but_records_the_experts_labels(tmp_path):
    """DART: the executed action is noisy, the recorded one is the closed-loop expert's answer to the
    perturbed state, so it never exceeds the expert's 3 cm step (noisy executed actions would)."""
    from embodied.collect import CollectConfig, collect
    from embodied.data import RLDSSource

    runs = {}
    for noise in (0.0, 0.02):
        out = tmp_path / f"noise_{noise}"
        collect(CollectConfig(backend="pybullet", episodes_per_task=2, tasks=["ReachTarget"], image_size=IMAGE,
                              num_envs=1, vector="sync", action_noise=noise), out, show_progress=False)
        runs[noise] = list(RLDSSource(out / "embodied_tabletop10_pybullet", split="train[:100%]").episodes())
    clean, noisy = runs[0.0], runs[0.02]
    assert len(clean) == len(noisy) == 2
    assert any(len(a["action"]) != len(b["action"]) or not np.allclose(a["state"], b["state"])
               for a, b in zip(clean, noisy))
    for episode in noisy:
        assert np.linalg.norm(episode["action"][:, :3], axis=1).max() <= 0.03 + 1e-5
    # keep_failures writes failed attempts too, labelled: heavy noise makes the expert miss its 60 steps
    out = tmp_path / "failures"
    summary = collect(CollectConfig(backend="pybullet", episodes_per_task=3, tasks=["ReachTarget"], image_size=IMAGE,
                                    num_envs=1, vector="sync", action_noise=0.3, keep_failures=True), out,
                      show_progress=False)
    import tensorflow_datasets as tfds

    builder = tfds.builder_from_directory(str(out / "embodied_tabletop10_pybullet" / "1.0.0"))
    episodes = [(bool(e["episode_metadata"]["success"]), [float(s["reward"]) for s in e["steps"]])
                for e in builder.as_dataset(split="train")]
    successes = summary["tasks"]["ReachTarget"]["successes"]
    assert len(episodes) == 3 and successes < 3
    failed = [rewards for ok, rewards in episodes if not ok]
    assert len(failed) == 3 - successes
    assert all(len(r) == 60 and sum(r) == 0 for r in failed)  # ran to the task's step limit, never rewarded
    with pytest.raises(ValueError, match="action_noise must be >= 0, got -0.1"):
        collect(CollectConfig(tasks=["ReachTarget"], action_noise=-0.1), tmp_path / "bad", show_progress=False)


def test_action_label_executed_records_the_noisy_commanded_action(tmp_path):
    """action_label=executed writes what the arm was commanded, noise included (what moved the next frame,
    e.g. for a latent action model), so it exceeds the expert's 3 cm step; the expert's labels never do."""
    from embodied.collect import CollectConfig, collect
    from embodied.data import RLDSSource
    from envs.env import ACTION_HIGH, ACTION_LOW

    out = tmp_path / "executed"
    collect(CollectConfig(backend="pybullet", episodes_per_task=1, tasks=["ReachTarget"], image_size=IMAGE,
                          num_envs=1, vector="sync", action_noise=0.04, rotation_noise=0.1, action_label="executed",
                          keep_failures=True), out, show_progress=False)
    (episode,) = RLDSSource(out / "embodied_tabletop10_pybullet", split="train[:100%]").episodes()
    actions = episode["action"]
    assert np.linalg.norm(actions[:, :3], axis=1).max() > 0.03 + 1e-5
    assert np.abs(actions[:, 3:5]).max() > 0.05  # the expert's roll and pitch stay under 0.002 rad
    assert (actions >= ACTION_LOW - 1e-6).all() and (actions <= ACTION_HIGH + 1e-6).all()  # clipped, as executed
    with pytest.raises(ValueError, match="rotation_noise must be >= 0, got -1"):
        collect(CollectConfig(tasks=["ReachTarget"], rotation_noise=-1), tmp_path / "bad", show_progress=False)
    with pytest.raises(ValueError, match="action_label must be 'expert' or 'executed', got 'noisy'"):
        collect(CollectConfig(tasks=["ReachTarget"], action_label="noisy"), tmp_path / "bad", show_progress=False)


def test_min_steps_per_task_evens_out_short_and_long_tasks(tmp_path):
    """A short task keeps taking episodes (in seed order, the same ones whatever the number of workers)
    until its kept steps reach the floor; a task already past it keeps `episodes_per_task`."""
    from embodied.collect import CollectConfig, collect

    kept = {}
    for num_envs, vector in ((1, "sync"), (2, "sync")):
        summary = collect(CollectConfig(backend="pybullet", episodes_per_task=1, min_steps_per_task=20,
                                        tasks=["ReachTarget", "PushCube"], image_size=IMAGE, num_envs=num_envs,
                                        vector=vector), tmp_path / f"envs_{num_envs}", show_progress=False)
        kept[num_envs] = {t: (r["episodes"], r["steps"], r["seeds"]) for t, r in summary["tasks"].items()}
    reach_episodes, reach_steps, _ = kept[1]["ReachTarget"]
    assert reach_steps >= 20 and reach_episodes >= 2  # 7-9-step episodes
    assert reach_steps - 20 < reach_steps / reach_episodes  # stopped at the first episode that crossed the floor
    assert kept[1]["PushCube"][0] == 1 and kept[1]["PushCube"][1] >= 20  # one push already has > 20 steps
    assert kept[1] == kept[2]
    with pytest.raises(ValueError, match="min_steps_per_task must be >= 0, got -1"):
        collect(CollectConfig(tasks=["ReachTarget"], min_steps_per_task=-1), tmp_path / "bad", show_progress=False)


def test_episodes_by_task_keeps_more_of_the_tasks_it_names(tmp_path):
    """Named tasks keep their own count, the first seeds of the same stream (a smaller collection's
    episodes are a prefix of a larger one's); the others keep episodes_per_task."""
    from embodied.collect import CollectConfig, collect
    from envs.suites import get_suite

    summary = collect(CollectConfig(backend="pybullet", episodes_per_task=1, episodes_by_task={"ReachTarget": 3},
                                    tasks=["ReachTarget", "PressButton"], image_size=IMAGE, num_envs=2,
                                    vector="sync"), tmp_path / "more", show_progress=False)
    reach, press = summary["tasks"]["ReachTarget"], summary["tasks"]["PressButton"]
    assert (reach["episodes"], press["episodes"]) == (3, 1)
    assert summary["episodes"] == 4
    assert reach["seeds"] == get_suite("tabletop10").episode_seeds("ReachTarget", 9, seed=1)[:3]  # the expert never misses a reach
    with pytest.raises(ValueError, match="episodes_by_task names 'PickCube', which this collection does not cover; "
                                         "its tasks: ReachTarget"):
        collect(CollectConfig(tasks=["ReachTarget"], episodes_by_task={"PickCube": 2}), tmp_path / "bad",
                show_progress=False)
    with pytest.raises(ValueError, match=r"episodes_by_task\['ReachTarget'\] must be an integer >= 1, got 0"):
        collect(CollectConfig(tasks=["ReachTarget"], episodes_by_task={"ReachTarget": 0}), tmp_path / "bad",
                show_progress=False)


def test_steps_after_success_records_the_expert_past_the_threshold(tmp_path):
    """The pick's lift is not cut where the cube passes 10 cm: the expert's next steps are recorded too, and
    the episode still counts as reaching its goal. The env alone ends that many steps after the first success."""
    from embodied.collect import CollectConfig, collect
    from embodied.data import RLDSSource
    from envs.env import TabletopEnv
    from envs.suites import get_suite

    seed = get_suite("tabletop10").episode_seeds("PickCube", 1, seed=1)[0]
    lengths, lifts = {}, {}
    for extra in (0, 4):
        env = TabletopEnv("PickCube", backend="pybullet", image_size=16, steps_after_success=extra)
        _, info = env.reset(seed=seed)
        rewards, heights, successes = [], [], []
        while True:
            _, reward, terminated, truncated, info = env.step(env.expert_action())
            rewards.append(reward), heights.append(env.sim.object_pose("cube")[0][2]), successes.append(info["success"])
            if terminated or truncated:
                break
        env.close()
        first = successes.index(True)
        assert terminated and len(rewards) == first + 1 + extra and all(successes[first:])
        assert rewards[-1] == 1.0 and sum(rewards) == 1.0
        lengths[extra], lifts[extra] = len(rewards), heights[-1]
    assert lifts[4] > lifts[0] + 0.03  # the expert lifted on, towards its 18 cm

    # per task: a pressed button ends its episode at once (the expert would back away from it next)
    env = TabletopEnv("PressButton", backend="pybullet", image_size=16, steps_after_success={"PickCube": 4})
    env.reset(seed=1)
    for _ in range(env.max_episode_steps):
        _, reward, terminated, truncated, info = env.step(env.expert_action())
        if terminated or truncated:
            break
    assert terminated and reward == 1.0 and env.steps_after_success == 0
    env.set_task("PickCube")  # collection keeps its env workers across tasks
    assert env.steps_after_success == 4
    env.close()

    summary = collect(CollectConfig(backend="pybullet", episodes_per_task=1, tasks=["PickCube"], image_size=IMAGE,
                                    num_envs=1, vector="sync", steps_after_success={"PickCube": 4}), tmp_path,
                      show_progress=False)
    assert summary["tasks"]["PickCube"]["steps"] == lengths[4] and summary["tasks"]["PickCube"]["successes"] == 1
    actions = np.asarray(next(RLDSSource("embodied_tabletop10_pybullet", tmp_path).episodes())["action"])
    assert (actions[-4:, 2] > 0.01).sum() >= 2  # recorded past the success: still lifting
    for bad, message in ((-1, "steps_after_success must be an integer >= 0 or a {task: n} mapping, got -1"),
                         ({"PickCube": -1}, r"steps_after_success\['PickCube'\] must be an integer >= 0, got -1"),
                         ({"PushCub": 4}, "steps_after_success names 'PushCub', which this collection does not cover")):
        with pytest.raises(ValueError, match=message.replace("{", r"\{").replace("}", r"\}")):
            collect(CollectConfig(tasks=["PickCube"], steps_after_success=bad), tmp_path / "bad", show_progress=False)


def test_clause_instructions_label_each_step_and_end_each_clause_s_chunks_standing_still(tmp_path):
    """ButtonThenTray's steps say "press the ... button" until the button is lit and the expert has stood still
    (clause_pause), then "put the ... cube in the tray"; the metadata keeps the whole instruction. Read for
    training, a chunk stops where its clause ends, trained to stand still there (hold), as a one-step task's
    chunk does at its goal."""
    import tensorflow_datasets as tfds

    from embodied.collect import CollectConfig, collect
    from embodied.data import RLDSDataset
    from policies.instructions import split_instruction

    collect(CollectConfig(backend="pybullet", episodes_per_task=1, tasks=["ButtonThenTray"], image_size=IMAGE,
                          num_envs=1, vector="sync", clause_instructions=True, clause_pause=4), tmp_path,
            show_progress=False)
    builder = tfds.builder_from_directory(str(tmp_path / "embodied_tabletop10_pybullet" / "1.0.0"))
    episode = next(iter(builder.as_dataset(split="train")))
    whole = episode["episode_metadata"]["instruction"].numpy().decode()
    steps = [s.decode() for s in episode["steps"].map(lambda s: s["language_instruction"]).as_numpy_iterator()]
    first, second = split_instruction(whole)
    switch = steps.index(second)
    assert 10 < switch < len(steps) - 10 and steps == [first] * switch + [second] * (len(steps) - switch)
    actions = np.stack(list(episode["steps"].map(lambda s: s["action"]).as_numpy_iterator()))
    assert np.abs(actions[switch - 4:switch, :6]).max() == 0 and np.abs(actions[switch - 5, :3]).max() > 0.005

    data = RLDSDataset(dict(datasets=str(tmp_path / "embodied_tabletop10_pybullet" / "1.0.0"), split="train[:100%]",
                            batch_size=8, image_size=IMAGE, shuffle=False, repeat=False, action_chunk=4,
                            chunk_padding="hold", statistics_cache_dir=tmp_path / "cache", show_progress=False))
    frames = {}
    for batch in data:
        for i, t in enumerate(batch["timestep"].tolist()):
            frames[t] = (batch["instruction"][i], batch["action"][i].numpy(), batch["action_mask"][i].numpy())
    assert [frames[t][0] for t in range(len(steps))] == steps
    stats = data.statistics["embodied_tabletop10_pybullet"]["action"]
    from embodied.data.statistics import unnormalize

    before = unnormalize(frames[switch - 2][1], stats)  # two steps of the first clause, then two held
    assert frames[switch - 2][2].all() and np.abs(before[2:, :6]).max() < 0.002
    np.testing.assert_allclose(before[2:, 6], before[1, 6], atol=1e-6)  # the last gripper command kept
    across = unnormalize(frames[switch - 5][1], stats)  # a chunk wholly inside the first clause moves
    assert np.abs(across[:, :3]).max() > 0.005

    # clause_done_frames: the second clause's first 3 steps again, under the first clause's prompt, labelled
    # clause_done and trained on no action; every other frame as before, labelled not done
    data = RLDSDataset(dict(data.config.__dict__, clause_done_frames=3))
    seen = [(t, batch["instruction"][i], batch["action_mask"][i].numpy(), float(batch["clause_done"][i]))
            for batch in data for i, t in enumerate(batch["timestep"].tolist())]
    assert len(seen) == len(steps) + 3
    done = [(t, mask, label) for t, prompt, mask, label in seen if prompt == first and t >= switch]
    assert [t for t, _, _ in done] == [switch, switch + 1, switch + 2]
    assert all(label == 1.0 and not mask.any() for _, mask, label in done)
    assert sum(label for *_, label in seen) == 3
    with pytest.raises(ValueError, match="clause_done_frames must be >= 0, got -1"):
        RLDSDataset(dict(data.config.__dict__, clause_done_frames=-1))
    with pytest.raises(ValueError, match="clause_done_frames masks the added frames' actions"):
        RLDSDataset(dict(data.config.__dict__, action_chunk=1))


def test_dagger_policy_drives_the_arm_and_the_expert_labels_every_state_it_reaches(tmp_path):
    """DAgger: an (untrained) policy's actions are executed, every frame is labelled with the expert's answer
    to the state the policy reached, and failed episodes are kept."""
    from policy_helpers import tiny

    from embodied.collect import CollectConfig, collect
    from embodied.data import RLDSSource
    from envs.env import TabletopEnv
    from policies.openvla import OpenVLAPolicy

    tiny(OpenVLAPolicy).save_pretrained(tmp_path / "policy")
    config = dict(backend="pybullet", episodes_per_task=2, tasks=["ReachTarget"], image_size=IMAGE, num_envs=1,
                  vector="sync", dagger_policy=str(tmp_path / "policy"))
    summary = collect(CollectConfig(**config), tmp_path / "data", show_progress=False)
    report = summary["tasks"]["ReachTarget"]
    assert report["episodes"] == 2 and report["successes"] == 0  # kept although the policy failed both
    episodes = list(RLDSSource(tmp_path / "data" / "embodied_tabletop10_pybullet", split="train[:100%]").episodes())
    env = TabletopEnv("ReachTarget", backend="pybullet", image_size=16, randomization="default")
    try:
        for episode, seed in zip(episodes, report["seeds"]):
            assert len(episode["action"]) == env.max_episode_steps and not episode["ends_at_goal"]
            env.reset(seed=seed)
            target = env.sim.object_pose("target")[0]
            ee = episode["state"][:, :3]
            # the reach expert's answer from each reached state: 3 cm at most straight at the target
            to_target = target - ee
            distance = np.linalg.norm(to_target, axis=1, keepdims=True)
            np.testing.assert_allclose(episode["action"][:, :3], to_target * np.minimum(1.0, 0.03 / distance), atol=2e-3)
            # ... while the arm went where the policy sent it, not where the labels point
            assert np.linalg.norm(ee[-1] - target) > 0.05
    finally:
        env.close()
    with pytest.raises(ValueError, match="trained with image_size=32, but this collection renders image_size=48"):
        collect(CollectConfig(**{**config, "image_size": 48}), tmp_path / "other", show_progress=False)
    with pytest.raises(ValueError, match="set dagger_policy=<checkpoint directory>"):
        collect(CollectConfig(tasks=["ReachTarget"], expert_mix=0.5), tmp_path / "other", show_progress=False)
