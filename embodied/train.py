"""`python -m embodied.train policy=openvla`: train a VLA policy, checkpoint it, evaluate it.

With no other argument this is the embedded default: MuJoCo demonstrations of `tabletop10` are
collected into `data/rlds` when missing, the tiny OpenVLA is trained on them, then evaluated in
the suite (MuJoCo; `eval.backends=[mujoco,pybullet]` adds the cross-engine figure), and the success
table is printed. On a CPU the default trains in `cpu_processes` (2) DDP processes, which the command
starts itself through torchrun's launcher, one torch thread each: a single process keeps one core busy
(two torch threads ran 17x slower than one), and the data readers need little of the other.

    python -m embodied.train policy=rt2 data=sim_tabletop10 max_steps=20000
    python -m embodied.train output_dir=runs/a resume=true                 # continue a run
    python -m embodied.train finetune=lora init_from=runs/a/final data.datasets=my_robot data.data_dir=data/rlds
    torchrun --nproc_per_node=2 -m embodied.train output_dir=runs/ddp      # DDP (gloo on CPU, nccl on GPU)

The run directory holds the resolved config (`.hydra/`, `config.yaml`), `dataset_statistics.json`,
`metrics.jsonl`, wandb's offline files, `checkpoints/step_*` (atomic, last N kept, each a
`save_pretrained` directory plus the optimizer/scheduler/RNG/data state), `final/` (a deployable
checkpoint), `adapter/` under LoRA, and `eval/<backend>/` (results.json, results.md, plot, videos).
"""
from __future__ import annotations

import datetime
import json
import math
import os
import sys
import time
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

import hydra
import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from tqdm.auto import tqdm

from embodied.checkpointing import (TRAINER_STATE, latest_checkpoint, load_training_state, read_counters,
                                    save_checkpoint, save_training_state)
from embodied.config_keys import from_mapping

CHECKPOINT_DIR, FINAL_DIR, ADAPTER_DIR, METRICS_FILE = "checkpoints", "final", "adapter", "metrics.jsonl"
SIM_DATASET_PREFIX = "embodied_"


class NonFiniteLossError(RuntimeError):
    pass


# -- distributed ------------------------------------------------------------------------------------

class Distributed:
    """torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK), or a single process."""

    def __init__(self, device: torch.device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        self.enabled = self.world > 1
        if self.enabled and not torch.distributed.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            # rank 0 alone collects, pretrains and evaluates while the others wait at a barrier (torchrun's
            # agent stops them if it fails), which can take longer than the default 30 minutes
            torch.distributed.init_process_group(backend, timeout=datetime.timedelta(hours=4))

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.enabled:
            torch.distributed.barrier()

    def broadcast(self, value):
        if not self.enabled:
            return value
        box = [value]
        torch.distributed.broadcast_object_list(box, src=0)
        return box[0]

    def mean(self, values: dict[str, float]) -> dict[str, float]:
        if not self.enabled or not values:
            return values
        keys = sorted(values)
        t = torch.tensor([values[k] for k in keys], dtype=torch.float64)
        torch.distributed.all_reduce(t)
        return {k: float(v) / self.world for k, v in zip(keys, t)}

    def close(self) -> None:
        if self.enabled and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()


def pick_device(name: str, local_rank: int) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise RuntimeError("device=cuda but no CUDA device is available; use device=cpu")
        return torch.device("cuda", local_rank)
    if name != "cpu":
        raise ValueError(f"unknown device {name!r}; valid: auto, cpu, cuda")
    return torch.device("cpu")


# -- data ---------------------------------------------------------------------------------------------

def data_config(cfg: DictConfig, rank: int, skip_frames: int = 0):
    from embodied.data import DataConfig

    values = OmegaConf.to_container(cfg.data, resolve=True)
    values.update(seed=int(cfg.seed) + rank, deterministic=bool(cfg.deterministic), skip_frames=int(skip_frames))
    return DataConfig.from_dict(values)


def _note_reused_collection(dataset_dir: Path, collect_cfg: DictConfig) -> None:
    """Say so when cached demonstrations were collected with other settings than the run's `collect` block."""
    found = sorted(dataset_dir.glob("*/metadata.json"))
    if not found:
        return
    from embodied.collect import CollectConfig

    from envs.experts import expert_revision

    metadata = json.loads(found[-1].read_text())
    # datasets from before an option existed lack it: they were collected with its default
    recorded = {**asdict(CollectConfig()), **metadata.get("collect_config", {})}
    keys = [k for k in collect_cfg if k not in ("enabled", "suite", "backend", "num_envs")]  # what changes the data
    differ = {k: (recorded.get(k), collect_cfg.get(k)) for k in keys
              if collect_cfg.get(k) is not None and recorded.get(k) != collect_cfg.get(k)}
    details = [f"{k}={old} (the config asks {new})" for k, (old, new) in differ.items()]
    revision, current = metadata.get("expert_revision"), expert_revision()
    if revision != current:
        details.append(f"expert scripts {revision or 'of a revision it does not record'} (this checkout's: "
                       f"{current})")
    if details:
        print(f"[train] reusing {found[-1].parent}, collected with {', '.join(details)}; delete it to collect anew",
              flush=True)


def ensure_sim_data(cfg: DictConfig) -> None:
    """Collect the platform's own demonstrations when a sim dataset of the config is missing."""
    from embodied.data.mixtures import parse_datasets

    missing = []
    data_dir = Path(cfg.data.data_dir or ".")
    for name, _ in parse_datasets(OmegaConf.to_container(cfg.data.datasets, resolve=True)
                                  if isinstance(cfg.data.datasets, DictConfig) or OmegaConf.is_list(cfg.data.datasets)
                                  else str(cfg.data.datasets)):
        if not (data_dir / name).exists() and not Path(name).exists():
            missing.append(name)
        elif name.startswith(SIM_DATASET_PREFIX):
            _note_reused_collection(data_dir / name, cfg.collect)
    if not missing:
        return
    ours = [n for n in missing if n.startswith(SIM_DATASET_PREFIX)]
    if not cfg.collect.enabled or len(ours) != len(missing):
        raise FileNotFoundError(f"dataset(s) {', '.join(missing)} not found under {data_dir.resolve()}"
                                + ("" if cfg.collect.enabled else " (collect.enabled=false)"))
    from embodied.collect import CollectConfig, collect

    options = OmegaConf.to_container(cfg.collect, resolve=True)
    # policy.instruction_clauses null (a new policy's default: off) labels no clauses
    options["clause_instructions"] = bool(options.get("clause_instructions"))
    for name in ours:
        backend = name.rsplit("_", 1)[-1]
        suite = name[len(SIM_DATASET_PREFIX):].rsplit("_", 1)[0]
        # the dataset's name decides the suite and engine; every other collect.* key is a CollectConfig field
        config = from_mapping(CollectConfig, {**options, "suite": suite, "backend": backend, "episodes_by_task":
                                              options.get("episodes_by_task") or {}}, "collect key", ignore=("enabled",))
        by_task, min_steps = config.episodes_by_task, config.min_steps_per_task
        print(f"[train] {name} is missing from {data_dir}: collecting {config.episodes_per_task} scripted "
              f"episodes per task of {suite} on {backend}"
              + "".join(f", {n} of {task}" for task, n in by_task.items())
              + (f", more until each task has {min_steps} steps" if min_steps else ""), flush=True)
        collect(config, data_dir)


# -- model --------------------------------------------------------------------------------------------

def build_policy(cfg: DictConfig, statistics: dict, device: torch.device):
    import policies

    policy_cfg = OmegaConf.to_container(cfg.policy, resolve=True)
    lora = policy_cfg.get("lora") or {}
    if lora.get("enabled") and not cfg.init_from:
        raise ValueError("finetune=lora needs init_from=<checkpoint directory> (the policy to adapt)")
    if cfg.init_from:
        policy_cfg["pretrained"] = str(cfg.init_from)
    policy = policies.make_policy(policy_cfg, statistics=statistics, device=device)
    return policy.to(device)


def pretrained_vision_source(cfg: DictConfig, policy) -> str | None:
    """The finished vision pretraining this run loads: `vision_pretraining.checkpoint`, where `auto` is the
    shipped one made for a policy with object tokens (unless `vision_pretraining.layouts` asks for a new one)."""
    from embodied.vision_pretraining import VisionPretrainingConfig, shipped_checkpoint

    if "vision_pretraining" not in cfg:
        return None
    pretraining = VisionPretrainingConfig.from_dict(OmegaConf.to_container(cfg.vision_pretraining, resolve=True))
    if pretraining.checkpoint != "auto":
        return pretraining.checkpoint
    if pretraining.layouts > 0:
        return None
    found = shipped_checkpoint(policy)
    return None if found is None else str(found)


def base_policy(model):
    """The policy inside DDP/FSDP and peft wrappers."""
    model = getattr(model, "module", model)
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def architecture(policy) -> dict[str, Any]:
    config = policy.config.to_dict()
    return {k: config.get(k) for k in ("policy_type", "size", "vision_towers", "llm", "action_chunk", "decoding",
                                       "action_dim")}


def check_same_architecture(checkpoint: Path, policy) -> None:
    saved = json.loads((checkpoint / "run_architecture.json").read_text())
    ours = json.loads(json.dumps(architecture(policy)))
    if saved != ours:
        diff = sorted(k for k in set(saved) | set(ours) if saved.get(k) != ours.get(k))
        raise ValueError(f"cannot resume from {checkpoint}: it holds a different policy architecture "
                         f"(differs in {', '.join(diff)}: checkpoint {saved.get(diff[0])!r} vs config "
                         f"{ours.get(diff[0])!r}); start a new output_dir or match the policy config")


def make_schedule(optimizer, cfg: DictConfig):
    floor = float(cfg.schedule.min_lr_ratio) if "min_lr_ratio" in cfg.schedule else 0.0
    return warmup_schedule(optimizer, cfg.schedule.name, int(cfg.schedule.warmup_steps), int(cfg.max_steps), floor)


def warmup_schedule(optimizer, name: str, warmup: int, total: int, floor: float = 0.0):
    """Linear warmup over `warmup` steps, then constant, cosine or linear decay to `floor` x the lr at `total`."""
    if name not in ("constant", "cosine", "linear"):
        raise ValueError(f"unknown schedule {name!r}; valid: constant, cosine, linear")

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        if name == "constant":
            return 1.0
        progress = min(1.0, (step - warmup) / max(1, total - warmup))
        shape = 0.5 * (1 + math.cos(math.pi * progress)) if name == "cosine" else 1 - progress
        return floor + (1 - floor) * shape

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def wrap_distributed(policy, cfg: DictConfig, dist: Distributed, device: torch.device):
    if not dist.enabled:
        return policy
    if cfg.distributed == "fsdp":
        if device.type != "cuda":
            raise ValueError("distributed=fsdp needs CUDA devices; use distributed=ddp on the CPU")
        from torch.distributed.fsdp import FullyShardedDataParallel, MixedPrecision

        bf16 = MixedPrecision(param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32)
        return FullyShardedDataParallel(policy, device_id=device, use_orig_params=True, sync_module_states=True,
                                        mixed_precision=bf16 if resolve_precision(cfg, device) == "bf16" else None)
    if cfg.distributed != "ddp":
        raise ValueError(f"unknown distributed={cfg.distributed!r}; valid: ddp, fsdp")
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(policy, device_ids=[device.index] if device.type == "cuda" else None,
                                   find_unused_parameters=True)


def resolve_precision(cfg: DictConfig, device: torch.device) -> str:
    precision = cfg.precision
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision not in ("bf16", "fp32"):
        raise ValueError(f"unknown precision {precision!r}; valid: auto, bf16, fp32")
    return precision


# -- checkpoints --------------------------------------------------------------------------------------

def save_policy(model, directory: Path) -> None:
    """A deployable policy (LoRA adapters merged into a copy) or, with LoRA, the adapter alone too."""
    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):  # peft
        inner.save_pretrained(directory / ADAPTER_DIR)
    else:
        inner.save_pretrained(directory)


def write_checkpoint(run_dir: Path, model, optimizer, scheduler, step: int, frames: int, keep_last: int,
                     run_info: dict) -> Path:
    def write(tmp: Path) -> None:
        save_policy(model, tmp)
        (tmp / "run_architecture.json").write_text(json.dumps(architecture(base_policy(model)), indent=2))
        save_training_state(tmp, optimizer, scheduler, step=step, frames=frames, **run_info)

    return save_checkpoint(run_dir / CHECKPOINT_DIR, step, write, keep_last)


def load_checkpoint_weights(model, checkpoint: Path) -> None:
    from safetensors.torch import load_file

    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        from peft import set_peft_model_state_dict

        adapter = checkpoint / ADAPTER_DIR / "adapter_model.safetensors"
        set_peft_model_state_dict(inner, load_file(str(adapter)))
    else:
        from policies.openvla import WEIGHTS_NAME

        missing, unexpected = inner.load_state_dict(load_file(str(checkpoint / WEIGHTS_NAME)), strict=False)
        if missing or unexpected:
            raise ValueError(f"{checkpoint}: weights do not match the policy (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")


def find_resume_checkpoint(cfg: DictConfig, run_dir: Path) -> Path | None:
    if cfg.resume in (False, None, "false", ""):
        return None
    if cfg.resume is True or cfg.resume == "true":
        found = latest_checkpoint(run_dir / CHECKPOINT_DIR)
        if found is None:
            print(f"[train] resume=true but {run_dir / CHECKPOINT_DIR} has no checkpoint yet: starting fresh",
                  flush=True)
        return found
    path = Path(str(cfg.resume))
    if (path / CHECKPOINT_DIR).is_dir():
        path = latest_checkpoint(path / CHECKPOINT_DIR) or path
    if not (path / TRAINER_STATE).exists():
        raise FileNotFoundError(f"resume={cfg.resume}: {path} is not a training checkpoint (no {TRAINER_STATE})")
    return path


# -- logging ------------------------------------------------------------------------------------------

class RunLog:
    """metrics.jsonl (the exact per-step record) plus wandb (offline by default)."""

    def __init__(self, cfg: DictConfig, run_dir: Path, resume_step: int, wandb_id: str | None):
        self.path = run_dir / METRICS_FILE
        if self.path.exists():  # drop what was logged after the checkpoint we resume from
            kept = [line for line in self.path.read_text().splitlines()
                    if line and json.loads(line).get("step", 0) <= resume_step]
            self.path.write_text("".join(line + "\n" for line in kept))
        self.file = open(self.path, "a")
        self.wandb = None
        self.wandb_id = wandb_id
        if cfg.wandb.mode != "disabled":
            import wandb

            os.environ.setdefault("WANDB_SILENT", "true")
            self.wandb = wandb.init(project=cfg.wandb.project, name=cfg.wandb.name, mode=cfg.wandb.mode,
                                    dir=str(run_dir), id=wandb_id, resume="allow",
                                    config=OmegaConf.to_container(cfg, resolve=True))
            self.wandb_id = self.wandb.id

    def log(self, step: int, values: dict[str, Any]) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        if self.wandb is not None:
            self.wandb.log({k: v for k, v in values.items() if isinstance(v, (int, float))}, step=step)

    def close(self) -> None:
        self.file.close()
        if self.wandb is not None:
            self.wandb.finish()


# -- evaluation ---------------------------------------------------------------------------------------

def evaluate_policy(policy, cfg: DictConfig, out_dir: Path, backends=None, episodes: int | None = None) -> dict:
    from embodied.evaluation import CheckpointPolicy, EvalConfig, evaluate

    results = {}
    was_training = policy.training
    policy.eval()
    try:
        for backend in backends or cfg.eval.backends:
            eval_cfg = EvalConfig(suite=cfg.eval.suite, backend=backend,
                                  episodes_per_task=int(episodes or cfg.eval.episodes_per_task),
                                  tasks=list(cfg.eval.tasks) if cfg.eval.tasks else None,
                                  num_envs=int(cfg.eval.num_envs), seed=0,
                                  randomization=OmegaConf.to_container(cfg.eval.randomization)
                                  if isinstance(cfg.eval.randomization, DictConfig) else cfg.eval.randomization,
                                  image_size=int(policy.config.observation_image_size),
                                  wrist_camera=bool(getattr(policy.config, "wrist_image", False)),
                                  videos_per_task=int(cfg.eval.videos_per_task))
            results[backend] = evaluate(CheckpointPolicy(policy, name=str(out_dir.parent)), eval_cfg,
                                        out_dir / backend)
    finally:
        policy.train(was_training)
    return results


def success_table(results: dict[str, dict]) -> str:
    backends = list(results)
    tasks = list(next(iter(results.values()))["tasks"])
    lines = ["| task | " + " | ".join(backends) + " |", "|---|" + "---|" * len(backends)]
    for task in tasks:
        lines.append(f"| {task} | " + " | ".join(f"{results[b]['tasks'][task]['success_rate']:.0%}" for b in backends)
                     + " |")
    lines.append("| **overall** | " + " | ".join(f"{results[b]['overall']['success_rate']:.1%}" for b in backends)
                 + " |")
    return "\n".join(lines)


# -- the loop -----------------------------------------------------------------------------------------

def train(cfg: DictConfig, run_dir: Path) -> dict[str, Any]:
    device = pick_device(cfg.device, int(os.environ.get("LOCAL_RANK", "0")))
    dist = Distributed(device)
    try:
        return _train(cfg, run_dir, device, dist)
    finally:
        dist.close()


def _train(cfg: DictConfig, run_dir: Path, device: torch.device, dist: Distributed) -> dict[str, Any]:
    from embodied.data import RLDSDataset

    run_dir = Path(dist.broadcast(str(run_dir)))
    if cfg.num_threads == "auto":
        torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
    elif cfg.num_threads:
        torch.set_num_threads(int(cfg.num_threads))
    if cfg.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    torch.manual_seed(int(cfg.seed) + dist.rank)
    np.random.seed(int(cfg.seed) + dist.rank)

    if dist.main:
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
        ensure_sim_data(cfg)
    dist.barrier()

    resume_from = find_resume_checkpoint(cfg, run_dir)
    counters = {"step": 0, "frames": 0, "wandb_id": None}
    if resume_from is not None:
        counters.update(read_counters(resume_from))

    dataset = RLDSDataset(data_config(cfg, dist.rank, skip_frames=int(counters["frames"])))
    if dist.main:
        dataset.save_statistics(run_dir)
    policy = build_policy(cfg, dataset.statistics, device)
    inner = base_policy(policy)
    if getattr(inner.config, "keyframe_loss_weight", 0) > 0 and not dataset.config.keyframe_states:
        # the policy (perhaps from init_from) trains its keyframe head: the batches must carry the targets
        dataset = RLDSDataset(replace(dataset.config, keyframe_states=True, statistics=dataset.statistics))
    if resume_from is not None:
        check_same_architecture(resume_from, inner)
        load_checkpoint_weights(policy, resume_from)
    elif not cfg.init_from and (shipped := pretrained_vision_source(cfg, inner)) is not None:
        from embodied.vision_pretraining import load_pretrained_vision

        load_pretrained_vision(inner, shipped, run_dir if dist.main else None, announce=dist.main)
    elif int(cfg.get("vision_pretraining", {}).get("layouts", 0)) > 0 and not cfg.init_from:
        from embodied.vision_pretraining import VisionPretrainingConfig, pretrain_vision

        pretraining = VisionPretrainingConfig.from_dict(OmegaConf.to_container(cfg.vision_pretraining, resolve=True))
        if dist.main:  # the other processes get these weights when DDP/FSDP wraps the model (rank 0 broadcasts)
            pretrain_vision(inner, pretraining, run_dir)
        dist.barrier()
    elif getattr(inner, "object_readout", None) is not None and not cfg.init_from:
        shipped = ("none of the shipped pretrainings under policies/pretrained/ fits this policy (size, image size, "
                   "cameras); " if cfg.vision_pretraining.get("checkpoint") == "auto" else "")
        raise ValueError(f"policy.object_slots reads objects located by a readout that only vision pretraining trains: "
                         f"{shipped}set vision_pretraining.layouts > 0 (e.g. 20000), vision_pretraining.checkpoint to "
                         f"its result, or init_from a checkpoint that has one (recipe=none: the policy without them)")
    precision = resolve_precision(cfg, device)
    if precision == "bf16" and hasattr(inner.config, "autocast"):
        inner.config.autocast = "bfloat16"
    if cfg.policy.get("gradient_checkpointing"):
        inner.enable_gradient_checkpointing()

    trainable = [p for p in policy.parameters() if p.requires_grad]
    if not trainable:
        raise ValueError("the policy has no trainable parameters under this finetune config")
    optimizer = torch.optim.AdamW(trainable, lr=float(cfg.optimizer.lr), betas=tuple(cfg.optimizer.betas),
                                  weight_decay=float(cfg.optimizer.weight_decay))
    scheduler = make_schedule(optimizer, cfg)
    if resume_from is not None:
        load_training_state(resume_from, optimizer, scheduler)
        if dist.enabled:  # each process continues its own random stream
            torch.manual_seed(int(cfg.seed) + dist.rank + 1000 * int(counters["step"]))
    model = wrap_distributed(policy, cfg, dist, device)
    model.train()

    step, frames = int(counters["step"]), int(counters["frames"])
    log = RunLog(cfg, run_dir, step, counters.get("wandb_id")) if dist.main else None
    if dist.main:
        n_train = sum(p.numel() for p in trainable)
        n_all = sum(p.numel() for p in policy.parameters())
        print(f"[train] {inner.config.policy_type} ({cfg.policy.size}): {n_all / 1e6:.2f}M parameters, "
              f"{n_train / 1e6:.2f}M trained; {dataset!r}; {dist.world} process(es) on {device}; run dir {run_dir}"
              + (f"; resuming from {resume_from} at step {step}" if resume_from else ""), flush=True)
    batches = iter(dataset)
    accum = int(cfg.grad_accum)
    max_steps = int(cfg.max_steps)
    bar = tqdm(total=max_steps, initial=step, desc="train", unit="step", disable=not dist.main, dynamic_ncols=True)
    run_info = {"wandb_id": log.wandb_id if log else None}
    last_saved = None
    window = {"data": 0.0, "total": 0.0, "samples": 0, "metrics": []}
    try:
        while step < max_steps:
            start = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            metrics_acc: list[dict] = []
            wait = 0.0
            for micro in range(accum):
                t0 = time.perf_counter()
                batch = next(batches)
                wait += time.perf_counter() - t0
                frames += len(batch["instruction"])
                sync = micro == accum - 1 or not dist.enabled
                context = model.no_sync() if not sync and hasattr(model, "no_sync") else _null()
                with context:
                    loss, metrics = model(batch)
                    if not torch.isfinite(loss):
                        raise NonFiniteLossError(f"loss is {float(loss.detach())} at step {step + 1}; the last good checkpoint "
                                                 f"is {last_saved or latest_checkpoint(run_dir / CHECKPOINT_DIR)}")
                    (loss / accum).backward()
                metrics_acc.append(metrics)
            grad_norm = torch.nn.utils.clip_grad_norm_(trainable, float(cfg.optimizer.grad_clip))
            optimizer.step()
            scheduler.step()
            step += 1
            metrics = {k: float(np.mean([m[k] for m in metrics_acc])) for k in metrics_acc[0]}
            metrics = dist.mean(metrics)
            elapsed = time.perf_counter() - start
            window["data"] += wait
            window["total"] += elapsed
            window["samples"] += len(batch["instruction"]) * accum * dist.world
            if dist.main:
                record = {**metrics, "lr": scheduler.get_last_lr()[0], "grad_norm": float(grad_norm)}
                bar.update(1)
                bar.set_postfix(loss=f"{metrics['loss']:.3f}", acc=f"{metrics.get('action_accuracy', 0):.2f}")
                if step % int(cfg.log_every) == 0 or step == max_steps:
                    record.update(samples_per_s=window["samples"] / max(window["total"], 1e-9),
                                  data_wait_fraction=window["data"] / max(window["total"], 1e-9))
                    window = {"data": 0.0, "total": 0.0, "samples": 0, "metrics": []}
                log.log(step, record)
            if int(cfg.checkpoint.every) and step % int(cfg.checkpoint.every) == 0 and step < max_steps:
                if dist.main:
                    last_saved = write_checkpoint(run_dir, model, optimizer, scheduler, step, frames,
                                                  int(cfg.checkpoint.keep_last), run_info)
                dist.barrier()
            if int(cfg.eval.every) and step % int(cfg.eval.every) == 0 and step < max_steps and dist.main:
                results = evaluate_policy(inner, cfg, run_dir / "eval" / f"step_{step}", backends=[cfg.eval.backends[0]])
                log.log(step, {f"eval/{b}/success": r["overall"]["success_rate"] for b, r in results.items()})
    finally:
        bar.close()
    summary: dict[str, Any] = {"run_dir": str(run_dir), "steps": step}
    if dist.main:
        write_checkpoint(run_dir, model, optimizer, scheduler, step, frames, int(cfg.checkpoint.keep_last), run_info)
        final = export_final(model, run_dir)
        summary["final"] = str(final)
        if cfg.eval.final:
            results = evaluate_policy(base_policy(final_policy(model)), cfg, run_dir / "eval")
            summary["eval"] = {b: r["overall"]["success_rate"] for b, r in results.items()}
            table = success_table(results)
            (run_dir / "results.md").write_text(table + "\n")
            log.log(step, {f"eval/{b}/success": r["overall"]["success_rate"] for b, r in results.items()})
            print("\n" + table + "\n", flush=True)
        log.close()
        print(f"[train] wrote {run_dir} (final checkpoint: {final})", flush=True)
    dist.barrier()
    return summary


def final_policy(model):
    """The trained policy as a plain module: LoRA adapters merged into a copy when present."""
    import copy

    inner = getattr(model, "module", model)
    if hasattr(inner, "get_base_model"):
        from policies.lora import merge_lora

        return merge_lora(copy.deepcopy(inner))
    return inner


def export_final(model, run_dir: Path) -> Path:
    inner = getattr(model, "module", model)
    final = run_dir / FINAL_DIR
    if hasattr(inner, "get_base_model"):
        inner.save_pretrained(run_dir / ADAPTER_DIR)  # the adapter alone, loadable by plain peft
    final_policy(model).save_pretrained(final)
    return final


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def processes_to_launch(cfg: DictConfig) -> int:
    """How many processes a plain `python -m embodied.train` starts through torchrun: `cpu_processes` on a CPU
    (GPUs: start torchrun yourself, one process per GPU), 1 (none started) when already under torchrun."""
    processes = int(cfg.get("cpu_processes", 1))
    if processes < 1:
        raise ValueError(f"cpu_processes must be >= 1, got {processes}")
    if "WORLD_SIZE" in os.environ or processes == 1 or pick_device(cfg.device, 0).type != "cpu":
        return 1
    return processes


def launch_processes(processes: int, run_dir: Path) -> None:
    """This command again in `processes` DDP processes, through torchrun's own launcher (--standalone), with the
    same overrides and this run directory."""
    from torch.distributed.run import get_args_parser, run

    overrides = [o for o in HydraConfig.get().overrides.task if not o.lstrip("+~").startswith("output_dir=")]
    print(f"[train] {processes} DDP processes on the CPU (cpu_processes={processes}) in {run_dir}", flush=True)
    run(get_args_parser().parse_args(["--standalone", f"--nproc_per_node={processes}", "-m", "embodied.train",
                                      *overrides, f"output_dir={run_dir}"]))


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict | None:
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    processes = processes_to_launch(cfg)
    if processes > 1:
        try:
            return launch_processes(processes, run_dir)
        except Exception as error:  # torchrun's ChildFailedError: the processes printed their own errors
            print(f"[train] stopped: {error}", file=sys.stderr, flush=True)
            raise SystemExit(1)
    try:
        return train(cfg, run_dir)
    except NonFiniteLossError as error:
        print(f"[train] stopped: {error}", file=sys.stderr, flush=True)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
