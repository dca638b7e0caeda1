"""`python -m embodied.train`: exact resume after SIGKILL, DDP with torchrun, bad input."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from embodied.checkpointing import checkpoint_name

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from embodied.data.synthetic import write_platform_dataset

    root = tmp_path_factory.mktemp("rlds")
    write_platform_dataset(root, name="embodied_synthetic", num_episodes=6, length=(8, 14), image_size=16)
    return root


# The trainer's tests run OpenVLA's own architecture (no recipe: one camera, towers trained from random weights)
# on small synthetic episodes; the default's recipe is tested on its own (test_the_default_starts_from_...).
PLAIN_POLICY = {"recipe": "none"}


def overrides(data_dir, out, **extra):
    values = {"data.datasets": "embodied_synthetic", "data.data_dir": str(data_dir), "data.batch_size": 4,
              "data.shuffle_buffer": 64, "policy.observation_image_size": 32, "wandb.mode": "disabled",
              "eval.final": "false", "collect.enabled": "false", "log_every": 1, "schedule.warmup_steps": 2,
              "output_dir": str(out), "num_threads": 1, **PLAIN_POLICY}
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def run_train(args, **kwargs):
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "embodied.train", *args], capture_output=True, text=True,
                          cwd=ROOT, env=env, timeout=600, **kwargs)


def losses(run_dir):
    lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    return {r["step"]: r["loss"] for r in map(json.loads, lines) if "loss" in r}


@pytest.fixture(scope="module")
def uninterrupted(data_dir, tmp_path_factory):
    out = tmp_path_factory.mktemp("run_a")
    proc = run_train(overrides(data_dir, out, max_steps=10, **{"checkpoint.every": 4}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out


def test_run_writes_config_statistics_checkpoints(uninterrupted):
    out = uninterrupted
    assert (out / "config.yaml").exists() and (out / ".hydra" / "config.yaml").exists()
    assert (out / "dataset_statistics.json").exists()
    kept = sorted(p.name for p in (out / "checkpoints").iterdir())
    assert kept == [checkpoint_name(8), checkpoint_name(10)]  # the last 2
    assert (out / "final" / "model.safetensors").exists() and (out / "final" / "dataset_statistics.json").exists()
    curve = losses(out)
    assert sorted(curve) == list(range(1, 11))
    assert curve[10] < curve[1], f"loss did not go down: {curve}"


def test_sigkill_then_resume_reproduces_the_loss_curve(data_dir, uninterrupted, tmp_path):
    out = tmp_path / "run_b"
    args = overrides(data_dir, out, max_steps=10, **{"checkpoint.every": 4})
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "embodied.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # kill mid-run, after the step-4 checkpoint and before the next one
            if (out / "metrics.jsonl").exists() and max(losses(out), default=0) >= 6:
                break
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    assert 6 <= max(losses(out)) < 10
    resumed = run_train(args + ["resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert losses(out) == losses(uninterrupted)  # bit for bit, every step


def compose(data_dir, out, **extra):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    with initialize_config_dir(str(ROOT / "embodied" / "conf"), version_base="1.3"):
        return hydra_compose("train", overrides=overrides(data_dir, out, **extra))


def test_the_default_starts_from_the_shipped_pretraining(tmp_path):
    import torch
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from embodied.train import build_policy, pretrained_vision_source
    from embodied.vision_pretraining import load_pretrained_vision, resolve_checkpoint

    def default(*extra):
        with initialize_config_dir(str(ROOT / "embodied" / "conf"), version_base="1.3"):
            return hydra_compose("train", overrides=[f"output_dir={tmp_path}", *extra])

    cfg = default()
    assert cfg.policy.wrist_image and cfg.policy.object_slots == 10 and not cfg.policy.train_vision
    assert cfg.collect.wrist_camera and cfg.data.wrist_image  # demonstrations and evaluation carry the wrist camera
    # the LLM reads the instruction, the state and the named objects, no image patch nor per-slot token
    assert not cfg.policy.image_patches and not cfg.policy.slot_tokens and cfg.policy.named_objects == 4
    policy = build_policy(cfg, None, torch.device("cpu"))
    # the readout refit on episode frames (chosen by its name only: `auto` never picks a derived asset)
    source = resolve_checkpoint(pretrained_vision_source(cfg, policy))
    assert source.name == "tabletop10-tiny-wrist-episodes"
    assert load_pretrained_vision(policy, source, announce=False)["refit_from"] == "tabletop10-tiny-wrist"
    # the wrist's yaw is regressed with a squared loss (its turns are rare), the rest with L1
    assert policy.config.regression_losses == ["l1"] * 5 + ["mse", "l1"]
    # multi-step instructions clause by clause, a clause ending at rest or when the fingers let go of what they held
    assert policy.config.instruction_clauses and policy.config.clause_release_opening == 0.1
    assert cfg.cpu_processes == 2 and cfg.max_steps == 4500  # both cores of a laptop, through torchrun
    # a run that asks for its own pretraining renders and trains one, once the recipe's is no longer named
    with pytest.raises(ValueError, match="set only one of them .vision_pretraining.checkpoint=null runs one"):
        pretrained_vision_source(default("vision_pretraining.layouts=100"), policy)
    assert pretrained_vision_source(default("vision_pretraining.layouts=100", "vision_pretraining.checkpoint=null"),
                                    policy) is None
    # the recipe with image patches and slot tokens: the still layouts' readout, which `auto` finds
    patches = default("recipe=openvla_patches")
    assert patches.policy.image_patches and patches.policy.slot_tokens and patches.policy.instruction_clauses
    assert patches.cpu_processes == 2 and patches.max_steps == 4500
    patches_policy = build_policy(patches, None, torch.device("cpu"))
    assert Path(pretrained_vision_source(patches, patches_policy)).name == "tabletop10-tiny-wrist"
    refit = {k: v.clone() for k, v in policy.object_readout.state_dict().items()}
    load_pretrained_vision(policy, pretrained_vision_source(patches, patches_policy), announce=False)
    assert any(not torch.equal(v, policy.object_readout.state_dict()[k]) for k, v in refit.items())
    # without located objects nothing is loaded (the plain policy's towers train from their own start)
    plain = default("recipe=none")
    assert not plain.policy.wrist_image and plain.policy.object_slots == 0 and plain.policy.train_vision
    assert plain.cpu_processes == 1 and plain.max_steps == 3600
    assert pretrained_vision_source(plain, build_policy(plain, None, torch.device("cpu"))) is None
    # the recipe is openvla's: another policy keeps its own settings
    rt2 = default("policy=rt2")
    assert rt2.policy.name == "rt2" and rt2.policy.object_slots == 0 and rt2.vision_pretraining.checkpoint is None
    # a fine-tune's own settings win over this file's and the recipe's: OpenVLA's LoRA recipe, no collection
    lora = default("finetune=lora", f"init_from={tmp_path}")
    assert lora.policy.lora.enabled and lora.optimizer.lr == 5e-4 and lora.schedule.name == "constant"
    assert lora.schedule.warmup_steps == 0 and not lora.collect.enabled
    assert lora.policy.object_slots == 10 and lora.cpu_processes == 2  # the recipe still applies
    assert cfg.optimizer.lr == 1e-3 and cfg.schedule.name == "cosine" and cfg.collect.enabled


def test_located_objects_without_a_pretraining_that_fits_are_refused(data_dir, tmp_path):
    from embodied.train import train

    # the recipe at another image size: the shipped pretraining was made for 112 px
    cfg = compose(data_dir, tmp_path, max_steps=1, **{"recipe": "openvla_patches", "data.wrist_image": "false"})
    with pytest.raises(ValueError, match=r"none of the shipped pretrainings .* fits this policy.*recipe=none"):
        train(cfg, tmp_path)


def test_resume_with_another_architecture_is_refused(data_dir, uninterrupted, tmp_path):
    from embodied.train import train

    cfg = compose(data_dir, tmp_path, max_steps=12, policy="rt2",
                  resume=str(uninterrupted / "checkpoints" / checkpoint_name(10)))
    with pytest.raises(ValueError, match="different policy architecture"):
        train(cfg, tmp_path)


def test_nan_loss_stops_with_the_step_and_keeps_the_last_good_checkpoint(data_dir, tmp_path):
    from embodied.train import NonFiniteLossError, train

    cfg = compose(data_dir, tmp_path, max_steps=40, **{"optimizer.lr": 1e4, "optimizer.grad_clip": 1e6,
                                                       "schedule.warmup_steps": 0, "checkpoint.every": 1})
    with pytest.raises(NonFiniteLossError, match=r"loss is (nan|inf) at step \d+") as error:
        train(cfg, tmp_path)
    kept = sorted((tmp_path / "checkpoints").iterdir())
    assert kept and f"last good checkpoint is {kept[-1]}" in str(error.value)


def test_missing_dataset_and_unknown_group_errors(tmp_path):
    from hydra.errors import MissingConfigException

    from embodied.train import train

    cfg = compose(tmp_path, tmp_path / "out", **{"data.datasets": "embodied_missing", "collect.enabled": "false"})
    with pytest.raises(FileNotFoundError, match=f"embodied_missing not found under {tmp_path}"):
        train(cfg, tmp_path / "out")
    with pytest.raises(MissingConfigException, match="openvlaa") as error:
        compose(tmp_path, tmp_path / "x", policy="openvlaa")
    assert "openvla" in str(error.value) and "rt2" in str(error.value)


def test_a_seed_sweep_with_hydra_multirun_compares_as_one_group(data_dir, tmp_path):
    out = tmp_path / "sweep"
    proc = run_train(["-m", "seed=0,1", *overrides(data_dir, out, max_steps=3, **{
        "eval.final": "true", "eval.tasks": "[ReachTarget]", "eval.episodes_per_task": 1, "eval.num_envs": 1,
        "eval.videos_per_task": 0})])
    assert proc.returncode == 0, proc.stderr[-3000:]
    # one run directory per job, each with its own seed
    assert losses(out / "0") != losses(out / "1")
    for job, seed in (("0", 0), ("1", 1)):
        assert f"seed: {seed}" in (out / job / "config.yaml").read_text().splitlines()
    compare = subprocess.run([sys.executable, "-m", "embodied.compare", f"sweep={out}/*/eval/mujoco"],
                             capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert compare.returncode == 0, compare.stderr[-3000:]
    assert "| **sweep: mean of 2** |" in compare.stdout


def test_two_processes_killed_with_sigkill_resume_the_same_losses(data_dir, tmp_path):
    """The default trains in two processes: SIGKILL to the whole command (launcher and both ranks) mid-run,
    then `resume=true`, repeats the uninterrupted two-process run's losses."""
    def args(out):
        return overrides(data_dir, out, max_steps=10, cpu_processes=2, **{"checkpoint.every": 4})

    whole = tmp_path / "whole"
    assert run_train(args(whole)).returncode == 0
    out = tmp_path / "killed"
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, "-m", "embodied.train", *args(out)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 300
    try:
        while time.time() < deadline:  # after the step-4 checkpoint, before the step-8 one
            if (out / "metrics.jsonl").exists() and max(losses(out), default=0) >= 6:
                break
            assert proc.poll() is None, proc.stderr.read()[-3000:]
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGKILL)  # the launcher and its workers at once, as the OOM killer or a scheduler
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert 6 <= max(losses(out)) < 10
    resumed = run_train(args(out) + ["resume=true"])
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "resuming from" in resumed.stdout + resumed.stderr
    assert losses(out) == losses(whole)


def test_ddp_two_processes_through_torchrun_from_the_plain_command(data_dir, tmp_path):
    """`cpu_processes=2` (the openvla recipe's): the plain command starts itself again in two DDP processes
    through torchrun's launcher, with the same overrides and run directory."""
    out = tmp_path / "ddp"
    proc = run_train(overrides(data_dir, out, max_steps=4, cpu_processes=2, **{
        "checkpoint.every": 2, "vision_pretraining.layouts": 20, "vision_pretraining.steps": 3,
        "vision_pretraining.batch_size": 4, "vision_pretraining.num_workers": 1}))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"[train] 2 DDP processes on the CPU (cpu_processes=2) in {out}" in proc.stdout
    assert "2 process(es)" in proc.stdout
    from embodied.train import processes_to_launch

    with pytest.raises(ValueError, match="cpu_processes must be >= 1, got 0"):
        processes_to_launch(compose(data_dir, tmp_path / "refused", cpu_processes=0))
    # rank 0 pretrained the towers on rendered layouts; DDP gave its weights to rank 1
    assert proc.stdout.count("vision pretraining: held-out localization error") == 1
    assert json.loads((out / "vision_pretraining.json").read_text())["layouts"] == 20
    assert sorted(losses(out)) == [1, 2, 3, 4]
    assert (out / "final" / "model.safetensors").exists()

    # a later run starts from that pretraining instead of rendering and training again
    import torch
    from safetensors.torch import load_file

    from embodied.train import train

    again = tmp_path / "again"
    train(compose(data_dir, again, max_steps=1, **{"vision_pretraining.checkpoint": str(out),
                                                   "policy.train_vision": "false"}), again)
    assert json.loads((again / "vision_pretraining.json").read_text())["loaded_from"] == str(out)
    pretrained, final = load_file(out / "vision_pretrained.safetensors"), load_file(again / "final" / "model.safetensors")
    towers = [key for key in pretrained if key.startswith("vision.")]
    assert towers and all(torch.equal(final[key], pretrained[key]) for key in towers)


def test_lora_finetune_saves_an_adapter_plain_peft_loads(data_dir, uninterrupted, tmp_path):
    import peft
    import torch

    import policies
    from embodied.train import train

    cfg = compose(data_dir, tmp_path, max_steps=3, finetune="lora", init_from=str(uninterrupted / "final"),
                  **{"checkpoint.every": 2})
    summary = train(cfg, tmp_path)
    assert summary["steps"] == 3
    assert (tmp_path / "adapter" / "adapter_config.json").exists()
    base = policies.load_pretrained(uninterrupted / "final")
    tuned = peft.PeftModel.from_pretrained(base, str(tmp_path / "adapter"))
    merged = policies.load_pretrained(tmp_path / "final")  # adapters merged: a deployable checkpoint
    # the default policy reads the robot state too (proprio token; its projector is trained with the adapter)
    observations = [{"image": np.zeros((32, 32, 3), np.uint8), "state": np.array([0.4, 0.0, 0.3, 1, 0, 0, 0, 1], np.float32)}
                    for _ in range(2)]
    with torch.no_grad():
        a = tuned.get_base_model().predict_actions(observations, ["reach target 0"] * 2)
        b = merged.predict_actions(observations, ["reach target 0"] * 2)
    assert abs(a - b).max() < 1e-4
    # Only the adapters and the projector moved: the vision towers are the base checkpoint's.
    for name, value in base.vision.state_dict().items():
        torch.testing.assert_close(merged.vision.state_dict()[name], value)


def test_reusing_demonstrations_collected_with_other_settings_is_said(tmp_path, capsys):
    from omegaconf import OmegaConf

    from embodied.train import _note_reused_collection

    version = tmp_path / "embodied_tabletop10_mujoco" / "1.0.0"
    version.mkdir(parents=True)
    (version / "metadata.json").write_text(json.dumps({"collect_config": {"episodes_per_task": 10, "image_size": 112}}))
    asked = OmegaConf.create({"episodes_per_task": 30, "image_size": 112, "action_noise": 0.01, "rotation_noise": 0.05})
    _note_reused_collection(version.parent, asked)
    out = capsys.readouterr().out
    assert "episodes_per_task=10 (the config asks 30)" in out and "action_noise=0.0 (the config asks 0.01)" in out
    assert "rotation_noise=0.0 (the config asks 0.05)" in out
    assert "image_size" not in out
    assert "expert scripts of a revision it does not record" in out
    from envs.experts import expert_revision

    (version / "metadata.json").write_text(json.dumps({"collect_config": {"episodes_per_task": 10, "image_size": 112},
                                                       "expert_revision": "0123456789ab"}))
    same = OmegaConf.create({"enabled": True, "suite": "tabletop10", "num_envs": 4, "episodes_per_task": 10,
                             "image_size": 112})
    _note_reused_collection(version.parent, same)
    out = capsys.readouterr().out
    assert f"expert scripts 0123456789ab (this checkout's: {expert_revision()})" in out and "episodes" not in out
    (version / "metadata.json").write_text(json.dumps({"collect_config": {"episodes_per_task": 10, "image_size": 112},
                                                       "expert_revision": expert_revision()}))
    _note_reused_collection(version.parent, same)
    assert capsys.readouterr().out == ""


def test_keyframe_head_trains_and_lora_from_its_checkpoint_keeps_training_it(data_dir, tmp_path):
    from embodied.train import train

    cfg = compose(data_dir, tmp_path / "full", max_steps=3, **{"policy.keyframe_loss_weight": 1.0,
                                                              "policy.keyframe_token": "true"})
    train(cfg, tmp_path / "full")
    logged = [json.loads(line) for line in (tmp_path / "full" / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["keyframe_loss"]) for r in logged if "loss" in r)
    # the LoRA config does not ask for keyframe targets: the checkpoint's head does, so the batches carry them
    cfg = compose(data_dir, tmp_path / "lora", max_steps=2, finetune="lora", init_from=str(tmp_path / "full" / "final"))
    train(cfg, tmp_path / "lora")
    logged = [json.loads(line) for line in (tmp_path / "lora" / "metrics.jsonl").read_text().splitlines()]
    assert all("keyframe_loss" in r for r in logged if "loss" in r)
