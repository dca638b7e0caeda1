"""Checkpointing helpers, run logging and `python -m embodied.train_worldmodel` (train, save, resume)."""
from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch

from embodied.checkpointing import (latest_checkpoint, list_checkpoints, load_training_state, read_counters,
                                    save_checkpoint, save_training_state)
from embodied.logging_utils import RunLogger

CONF_DIR = str(Path(__file__).resolve().parents[1] / "embodied" / "conf")
pytestmark = pytest.mark.usefixtures("one_thread")


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.Linear(3, 2)

    def save_pretrained(self, directory):
        from safetensors.torch import save_file

        Path(directory).mkdir(parents=True)
        save_file(self.state_dict(), str(Path(directory) / "model.safetensors"))


def _trained():
    model = Tiny()
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    sched = torch.optim.lr_scheduler.StepLR(opt, 1, gamma=0.5)
    model.layer(torch.randn(4, 3)).pow(2).sum().backward()
    opt.step()
    sched.step()
    return model, opt, sched


def test_checkpoints_keep_last_and_restore_optimizer_scheduler_and_rng(tmp_path):
    model, opt, sched = _trained()
    data_rng = np.random.default_rng(5)
    for step in (10, 20, 30):
        def write(tmp, step=step):
            model.save_pretrained(tmp / "model")
            save_training_state(tmp, {"main": opt}, {"main": sched}, step=step, data_rng=data_rng.bit_generator.state)
        save_checkpoint(tmp_path, step, write, keep_last=2)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step_000000020", "step_000000030"]
    assert not list(tmp_path.glob(".*"))  # no temporary directory left behind
    ckpt = latest_checkpoint(tmp_path)
    expected = (random.random(), np.random.rand(), torch.rand(1))
    _, opt2, sched2 = _trained()
    counters = load_training_state(ckpt, {"main": opt2}, {"main": sched2})
    assert (random.random(), np.random.rand(), torch.rand(1)) == expected  # RNGs rewound to the save
    assert counters["step"] == 30
    assert sched2.state_dict()["last_epoch"] == sched.state_dict()["last_epoch"]
    assert torch.equal(opt2.state_dict()["state"][0]["exp_avg"], opt.state_dict()["state"][0]["exp_avg"])
    resumed = np.random.default_rng()
    resumed.bit_generator.state = counters["data_rng"]
    assert resumed.integers(1 << 30) == data_rng.integers(1 << 30)
    with pytest.raises(KeyError, match="no optimizer state 'other'"):
        load_training_state(ckpt, {"other": opt2})


def test_checkpoint_without_training_state_is_refused_and_not_left_behind(tmp_path):
    with pytest.raises(RuntimeError, match="would have no trainer_state.pt"):
        save_checkpoint(tmp_path, 1, {"model": Tiny()})
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(TypeError, match="has no save_pretrained"):
        save_checkpoint(tmp_path, 1, {"model": object()})


def test_run_logger_writes_metrics_and_checks_mode(tmp_path):
    with RunLogger(tmp_path, mode="disabled") as logger:
        logger.log({"loss": 1.5, "flag": True}, step=3)
    assert json.loads((tmp_path / "metrics.jsonl").read_text()) == {"step": 3, "loss": 1.5}
    with pytest.raises(ValueError, match="unknown wandb mode 'cloud'"):
        RunLogger(tmp_path, mode="cloud")


def _cfg(data_dir: Path, output_dir: Path, *overrides: str):
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("train_worldmodel", overrides=[
            "worldmodel=tiny", f"data.datasets={data_dir}", "data.val_split=train", f"data.val_datasets={data_dir}",
            "data.collect_if_missing=false", "wandb.mode=disabled", "train.progress=false",
            "train.tokenizer.steps=4", "train.dynamics.steps=4", "train.dynamics.batch_size=2",
            "train.detector.steps=2", "train.latent_actions.steps=3", "train.latent_actions.batch_size=4",
            "checkpoint.every=2", "checkpoint.keep_last=2", "train.log_every=1",
            f"output_dir={output_dir}", *overrides])


def test_train_worldmodel_trains_saves_and_resumes(tmp_path):
    from embodied.data.synthetic import write_platform_dataset
    from embodied.train_worldmodel import train
    from worldmodel.model import WorldModel

    data_dir, _ = write_platform_dataset(tmp_path / "data", num_episodes=3, length=(6, 8), image_size=32)
    out = tmp_path / "run"
    summary = train(_cfg(data_dir, out), out)
    world = WorldModel.from_pretrained(summary["worldmodel_dir"])
    assert world.image_size == 32 and world.detector is not None
    assert world.latent_actions is None  # the latent action model is an opt-in stage
    assert set(world.statistics) == {"embodied_synthetic"}
    assert len(list_checkpoints(out / "checkpoints")) == 2
    latest = latest_checkpoint(out / "checkpoints")
    assert read_counters(latest)["stage"] == "detector" and latest.name == "step_000000010"
    assert {"tokenizer", "dynamics", "detector"} <= {p.name for p in latest.iterdir()}
    tokenizer_before = {k: v.clone() for k, v in world.tokenizer.state_dict().items()}
    lines = len((out / "metrics.jsonl").read_text().splitlines())

    # a longer detector stage: the run resumes inside that stage, earlier stages are not retrained
    summary = train(_cfg(data_dir, out, "train.detector.steps=4"), out)
    new = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()[lines:]]
    assert new and all(not k.startswith(("tokenizer/", "dynamics/")) for row in new for k in row if k != "step")
    assert [row["step"] for row in new if "detector/loss" in row] == [11, 12]
    resumed = WorldModel.from_pretrained(summary["worldmodel_dir"])
    for k, v in resumed.tokenizer.state_dict().items():
        assert torch.equal(v, tokenizer_before[k])
    assert latest_checkpoint(out / "checkpoints").name == "step_000000012"

    # a checkpoint of a different model is refused before any data is read
    with pytest.raises(ValueError, match="cannot resume from .*its tokenizer config"):
        train(_cfg(data_dir, out, "worldmodel.tokenizer.channels=16"), out)


def test_train_worldmodel_retrains_some_parts_on_a_saved_world_model(tmp_path):
    from embodied.data.synthetic import write_platform_dataset
    from embodied.train_worldmodel import train
    from worldmodel.model import WorldModel

    data_dir, _ = write_platform_dataset(tmp_path / "data", num_episodes=3, length=(6, 8), image_size=32)
    first = train(_cfg(data_dir, tmp_path / "a"), tmp_path / "a")
    base = WorldModel.from_pretrained(first["worldmodel_dir"])
    assert base.detector.config.spatial_state  # the default detector compares the state with each cell
    # only the detector, with another architecture (one that reads each episode's first real frame too, without
    # the state at each cell); tokenizer and dynamics are taken as they are
    out = tmp_path / "b"
    summary = train(_cfg(data_dir, out, "stages=[detector]", f"init_from={first['worldmodel_dir']}",
                         "worldmodel.detector.channels=8", "worldmodel.detector.reference_frame=true",
                         "worldmodel.detector.spatial_state=false", "train.detector.steps=3"), out)
    world = WorldModel.from_pretrained(summary["worldmodel_dir"])
    assert summary["stages"] == ["detector"] and world.detector.config.channels == 8
    assert not world.detector.config.spatial_state
    assert world.detector.config.reference_frame and "episode_balanced_accuracy" in summary["detector_val"]
    for part in ("tokenizer", "dynamics"):
        for (name, a), b in zip(getattr(base, part).state_dict().items(), getattr(world, part).state_dict().values()):
            assert torch.equal(a, b), f"{part}.{name} changed"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "detector/loss" in r] == [1, 2, 3]
    assert not any(k.startswith(("tokenizer/", "dynamics/")) for r in rows for k in r)

    # a latent action model added to that world model (the optional stage): every other part is kept
    out = tmp_path / "lam"
    summary = train(_cfg(data_dir, out, "stages=[latent_actions]", f"init_from={summary['worldmodel_dir']}"), out)
    with_lam = WorldModel.from_pretrained(summary["worldmodel_dir"])
    assert with_lam.latent_actions is not None and with_lam.latent_actions.config.n_latent_actions == 8
    assert with_lam.detector.config.channels == 8
    assert {"accuracy_inferred", "accuracy_random", "accuracy_copy", "perplexity"} <= set(summary["latent_actions_val"])
    for part in ("tokenizer", "dynamics", "detector"):
        for (name, a), b in zip(getattr(world, part).state_dict().items(),
                                getattr(with_lam, part).state_dict().values()):
            assert torch.equal(a, b), f"{part}.{name} changed"
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "latent_actions/loss" in r] == [1, 2, 3]
    assert "latent_actions/val_accuracy_inferred" in rows[-1]
    frames = np.zeros((3, 32, 32, 3), np.uint8)
    assert with_lam.infer_latent_actions(frames).shape == (2,)

    with pytest.raises(ValueError, match=r"leaves out \['tokenizer'\]: pass init_from="):
        train(_cfg(data_dir, tmp_path / "c", "stages=[dynamics,detector]"), tmp_path / "c")
    with pytest.raises(ValueError, match=r"init_from=.* is used only for the parts that stages= leaves out"):
        train(_cfg(data_dir, tmp_path / "c", f"init_from={first['worldmodel_dir']}"), tmp_path / "c")
    with pytest.raises(ValueError, match=r"spatial_state=true compares the imagined robot state .* \(state_dim=0\)"):
        train(_cfg(data_dir, tmp_path / "c", "worldmodel.dynamics.state_dim=0"), tmp_path / "c")
    with pytest.raises(ValueError, match=r"unknown stage\(s\) \['policy'\]"):
        train(_cfg(data_dir, tmp_path / "c", "stages=[policy]"), tmp_path / "c")
    with pytest.raises(FileNotFoundError, match="no tokenizer/ to take the tokenizer from"):
        train(_cfg(data_dir, tmp_path / "c", "stages=[dynamics]", f"init_from={tmp_path}"), tmp_path / "c")


def test_every_dataset_is_normalized_with_the_first_ones_statistics(tmp_path):
    # one robot, one scale: with data.shared_statistics (the default) a 5 mm step means the same to the dynamics
    # whichever dataset it came from; without it each dataset is normalized with its own bounds
    from embodied.data.synthetic import write_platform_dataset
    from embodied.train_worldmodel import train
    from worldmodel.model import WorldModel

    def steps(scale):
        return lambda e, t: np.r_[np.random.default_rng([e, t]).normal(scale=scale, size=6), t % 2]

    wide, _ = write_platform_dataset(tmp_path / "data", "embodied_wide", 3, (6, 8), 32, action_fn=steps(0.05))
    narrow, _ = write_platform_dataset(tmp_path / "data", "embodied_narrow", 3, (6, 8), 32, seed=1,
                                       action_fn=steps(0.005))
    both = f"[{wide},{narrow}]"
    for shared in (True, False):
        out = tmp_path / f"shared_{shared}"
        summary = train(_cfg(wide, out, f"data.datasets={both}", f"data.val_datasets={both}",
                             f"data.shared_statistics={str(shared).lower()}"), out)
        world = WorldModel.from_pretrained(summary["worldmodel_dir"])
        assert world.statistics_key == "embodied_wide"
        q99 = {name: np.asarray(world.statistics[name]["action"]["q99"]) for name in world.statistics}
        assert np.allclose(q99["embodied_narrow"], q99["embodied_wide"]) == shared
        assert q99["embodied_wide"][0] > 0.05


def test_the_default_datasets_are_collected_when_missing_with_failures_kept(tmp_path):
    # the default trains on perturbed experts' attempts, failures kept and actions recorded as executed (the
    # dynamics sees what any action does; the detector's threshold needs both outcomes), and on the experts'
    # demonstrations; a missing dataset that `data.collect` does not name is refused
    import tensorflow_datasets as tfds
    from hydra import compose, initialize_config_dir

    from embodied.data.errors import DatasetNotFoundError
    from embodied.train_worldmodel import ensure_data

    names = ("embodied_tabletop10_pybullet_perturbed", "embodied_tabletop10_pybullet")
    overrides = [f"data.data_dir={tmp_path}", "worldmodel=tiny"]
    for name in names:
        overrides += [f"data.collect.{name}.tasks=[PickCube]", f"data.collect.{name}.episodes_per_task=1",
                      f"+data.collect.{name}.num_envs=1", f"+data.collect.{name}.max_attempts_per_episode=1"]
    # 3 cm of noise fails the one pick on some CPUs only (physics differs in the last bits); 30 cm fails it on all
    overrides.append(f"data.collect.{names[0]}.action_noise=0.3")
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("train_worldmodel", overrides=overrides)
        missing = compose("train_worldmodel", overrides=overrides + ["data.datasets=[embodied_not_collected]"])
    ensure_data(cfg)
    succeeded, turned = {}, {}
    for name in names:
        (episode,) = tfds.builder_from_directory(str(tmp_path / name / "1.0.0")).as_dataset(split="train")
        succeeded[name] = bool(sum(float(step["reward"]) for step in episode["steps"]))
        turned[name] = max(float(np.abs(step["action"][3:5]).max()) for step in episode["steps"])
        # each dataset keeps its own collection summary, though both were collected into one directory
        assert json.loads((tmp_path / name / "1.0.0" / "collect_summary.json").read_text())["dataset"] == name
    # the expert picks the cube; perturbed it fails, the failure is kept, and its roll and pitch are the executed
    # (perturbed) ones, not the expert's few milliradians
    assert succeeded == {names[0]: False, names[1]: True}
    assert turned[names[0]] > 0.1 > 0.01 > turned[names[1]]
    with pytest.raises(DatasetNotFoundError, match="embodied_not_collected"):
        ensure_data(missing)


def test_the_detector_threshold_is_calibrated_on_both_outcomes():
    # the held-out calibration episodes are drawn from the successes and from the failures apart, so that the
    # threshold sees both even when failures are few (the default's data: about 1 in 8 episodes)
    from types import SimpleNamespace

    from embodied.train_worldmodel import detector_data
    from worldmodel.data import Episode
    from worldmodel.dynamics import DynamicsModel
    from worldmodel_helpers import TOK, dyn_config

    rng = np.random.default_rng(0)
    episodes = []
    for i in range(13):  # 10 successes, 3 failures
        n = 5
        rewards = np.zeros(n, np.float32)
        rewards[-1] = float(i < 10)
        episodes.append(Episode("d", np.zeros((n, 32, 32, 3), np.uint8), np.zeros((n, 7), np.float32),
                                rng.uniform(-1, 1, (n, 7)).astype(np.float32), rewards, f"episode {i}",
                                tokens=rng.integers(0, TOK.codebook_size, (n, TOK.grid, TOK.grid)).astype(np.int16)))
    torch.manual_seed(0)
    dynamics = DynamicsModel(dyn_config()).eval()
    det_cfg = SimpleNamespace(rollout_method="maskgit", rollout_steps=2)
    for seed in range(3):
        data = detector_data(dynamics, episodes, det_cfg, SimpleNamespace(calibration_fraction=0.4,
                                                                          random_action_negatives=1.0), seed=seed,
                             show_progress=False)
        outcomes = [bool(y.any()) for y in data["cal_labels"]]
        assert (outcomes.count(True), outcomes.count(False)) == (4, 1)  # 40% of each outcome, rounded
        # the detector trains on the other 8 episodes and 8 random-action replays of them
        assert len(data["labels"]) == 16 * 5 and data["labels"].sum() == 6  # 6 successes' last frames
    # the scarce failures decide the threshold: a larger share of them may be held out
    data = detector_data(dynamics, episodes, det_cfg, SimpleNamespace(calibration_fraction=0.4,
                                                                      failure_calibration_fraction=0.7,
                                                                      random_action_negatives=0.0), seed=0,
                         show_progress=False)
    outcomes = [bool(y.any()) for y in data["cal_labels"]]
    assert (outcomes.count(True), outcomes.count(False)) == (4, 2)
    assert len(data["labels"]) == 7 * 5 and data["labels"].sum() == 6
