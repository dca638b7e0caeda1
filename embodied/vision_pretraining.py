"""Localization pretraining of a policy's vision towers on rendered layouts.

Trained only through action tokens, from-scratch towers do not learn to read object positions from
a few hundred demonstrated layouts (benchmarks/RESULTS.md, "Keyframe head"). Before policy training,
this stage renders many more layouts of the suite's tasks (`envs.layouts`: a reset and a render each,
no episode) and trains the towers, through an object readout (`policies.openvla.ObjectReadout`: its
own projector, then spatial soft-argmax heatmaps per object slot), to regress where each
object is. A policy with `object_slots` keeps the readout, frozen, and reads its positions as tokens;
otherwise the readout is discarded. A policy with `named_objects` also has its instruction grounding
(`policies.openvla.InstructionGrounding`) trained here, on the rendered layouts' instructions and the clauses
of the multi-step ones (text only), to say which located object each object the instruction names is
(`python -m embodied.vision_pretraining DIR` trains a finished pretraining's grounding further, in place).
Either way the policy's projector starts from the readout's, so the patches the LLM reads start from
features that locate objects. The run directory gets
`vision_pretraining.json` with the held-out error per slot, next to two references: every slot's
mean position, and the same model fed shuffled images (the robot state kept). A policy with
`wrist_image` is pretrained on layouts rendered with the wrist camera too; its readout also reads the
wrist image's patches, placed with the gripper's pose.

The stage's result (towers, projector, readout, grounding) is saved to `vision_pretrained.safetensors`
next to the report, and `vision_pretraining.checkpoint=<that directory>` starts another run from it
instead of rendering and training again, as OpenVLA starts from pretrained DINOv2 and SigLIP.
Directories under `policies/pretrained/` can be named by their folder name alone.
"""
from __future__ import annotations

import json
import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, fields
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from embodied.config_keys import from_mapping
from policies.openvla import POSITION_CENTRE, POSITION_SCALE

# Positions are regressed relative to the workspace centre, in units of 10 cm.
CENTRE, SCALE = np.array(POSITION_CENTRE, dtype=np.float32), POSITION_SCALE
SEED_SALT = 7_340_033  # layout seeds never coincide with the suite's evaluation (0) or collection (1) seeds
WEIGHTS_FILE = "vision_pretrained.safetensors"
REPORT_FILE = "vision_pretraining.json"
PRETRAINED_PARTS = ("vision", "projector", "object_readout", "grounding")  # what this stage trains
ASSETS_DIR = Path(__file__).resolve().parents[1] / "policies" / "pretrained"


@dataclass
class VisionPretrainingConfig:
    layouts: int = 0               # rendered layouts, spread evenly over the suite's tasks (0: off)
    steps: int = 6000              # optimizer steps (~6 min on 2 CPU cores)
    batch_size: int = 32
    lr: float = 1.0e-3
    warmup_steps: int = 100
    arm_steps: int = 10            # the arm moves up to this many 3 cm steps before a layout is rendered
    expert_fraction: float = 0.0   # of the layouts, those where the scripted expert moves the arm instead (~4x slower to render)
    heldout_fraction: float = 0.05
    num_workers: int = 2           # rendering processes
    threads: int | None = None     # torch threads while training (null: every core; 1 on a machine shared with other jobs)
    checkpoint: str | None = None  # load a finished pretraining instead: a directory, a name under policies/pretrained/, or auto
    suite: str = "tabletop10"
    backend: str = "mujoco"
    randomization: Any = "default"
    seed: int = 0

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VisionPretrainingConfig":
        config = from_mapping(cls, values, "vision_pretraining key")
        if config.layouts < 0 or config.steps <= 0 or config.batch_size <= 0:
            raise ValueError(f"vision_pretraining needs layouts >= 0 and steps, batch_size > 0; got layouts="
                             f"{config.layouts}, steps={config.steps}, batch_size={config.batch_size}")
        if not 0 <= config.expert_fraction <= 1:
            raise ValueError(f"vision_pretraining.expert_fraction must be in [0, 1], got {config.expert_fraction}")
        if config.threads is not None and config.threads < 1:
            raise ValueError(f"vision_pretraining.threads must be >= 1 or null, got {config.threads}")
        if not 0 < config.heldout_fraction < 1:
            raise ValueError(f"vision_pretraining.heldout_fraction must be in (0, 1), got {config.heldout_fraction}")
        if config.checkpoint and config.checkpoint != "auto" and config.layouts > 0:
            raise ValueError(f"vision_pretraining.checkpoint={config.checkpoint!r} loads a finished pretraining, and "
                             f"vision_pretraining.layouts={config.layouts} would run one: set only one of them "
                             f"(vision_pretraining.checkpoint=null runs one)")
        return config


def resolve_checkpoint(spec: str | os.PathLike) -> Path:
    """A directory holding `vision_pretrained.safetensors`: a path, or the name of one under policies/pretrained/."""
    path = Path(spec).expanduser()
    for candidate in (path, ASSETS_DIR / str(spec)):
        if (candidate / WEIGHTS_FILE).is_file():
            return candidate
    shipped = sorted(p.parent.name for p in ASSETS_DIR.glob(f"*/{WEIGHTS_FILE}"))
    raise FileNotFoundError(f"vision_pretraining.checkpoint={str(spec)!r}: no {WEIGHTS_FILE} in {path} "
                            f"(shipped: {', '.join(shipped) or 'none'}; a run with vision_pretraining.layouts > 0 "
                            f"writes one to its run directory)")


def pretrained_parts(policy) -> dict[str, torch.nn.Module]:
    return {name: getattr(policy, name) for name in PRETRAINED_PARTS if getattr(policy, name, None) is not None}


def save_pretrained_vision(policy, directory: str | os.PathLike, report: Mapping[str, Any] | None = None) -> Path:
    """Write the stage's parts of `policy` (and its report) to `directory`; returns the weights file."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    state = {f"{name}.{key}": value.detach().cpu().contiguous()
             for name, part in pretrained_parts(policy).items() for key, value in part.state_dict().items()}
    save_file(state, directory / WEIGHTS_FILE, metadata={"format": "pt", "parts": ",".join(pretrained_parts(policy)),
                                                         "observation_image_size": str(policy.config.observation_image_size),
                                                         "wrist_image": str(bool(policy.config.wrist_image))})
    if report is not None:
        (directory / REPORT_FILE).write_text(json.dumps(report, indent=2))
    return directory / WEIGHTS_FILE


def _read_weights(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from safetensors import safe_open

    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as f:
        metadata = f.metadata() or {}
        saved = {key: f.get_tensor(key) for key in f.keys()}
    return saved, metadata


def _read_shapes(directory: Path) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The file's tensor shapes and metadata, without reading its tensors (to choose among files)."""
    from safetensors import safe_open

    with safe_open(str(directory / WEIGHTS_FILE), framework="pt") as f:
        return {key: tuple(f.get_slice(key).get_shape()) for key in f.keys()}, f.metadata() or {}


def _made_with(metadata: Mapping[str, str]) -> str:
    return (f"made for observation_image_size={metadata.get('observation_image_size')}, "
            f"wrist_image={metadata.get('wrist_image')}, parts {metadata.get('parts')}")


def _mismatch(policy, shapes: Mapping[str, tuple[int, ...]], metadata: Mapping[str, str]) -> str | None:
    """Why weights of these `shapes` cannot fill the policy's pretrained parts (the first key at fault), or None."""
    size = metadata.get("observation_image_size")
    if size is not None and int(size) != int(policy.config.observation_image_size):
        # the readout is calibrated on images of that size: another size would locate objects elsewhere
        return (f"was trained on {size} px images, this policy reads {policy.config.observation_image_size} px "
                f"(policy.observation_image_size)")
    for name, part in pretrained_parts(policy).items():
        ours = part.state_dict()
        theirs = {key[len(name) + 1:]: shape for key, shape in shapes.items() if key.startswith(name + ".")}
        if not theirs:
            return f"has no {name!r} weights, which this policy needs"
        for key, value in ours.items():
            if key not in theirs:
                return f"lacks {name}.{key}, which this policy has"
            if tuple(theirs[key]) != tuple(value.shape):
                return f"{name}.{key} has shape {tuple(theirs[key])}, this policy's {tuple(value.shape)}"
        extra = sorted(set(theirs) - set(ours))
        if extra:
            return f"has {name}.{extra[0]}, which this policy lacks"
    return None


def shipped_checkpoint(policy) -> Path | None:
    """For `checkpoint=auto`: the pretraining under policies/pretrained/ that fits a policy reading located
    objects (`object_slots`), or None (no such policy, or no asset with its shapes). An asset derived from
    another (its report names `refit_from`: a readout refit on episode frames) is chosen only by its name."""
    if getattr(policy, "object_readout", None) is None:
        return None
    for weights in sorted(ASSETS_DIR.glob(f"*/{WEIGHTS_FILE}")):
        report = weights.parent / REPORT_FILE
        if report.is_file() and "refit_from" in json.loads(report.read_text()):
            continue
        if _mismatch(policy, *_read_shapes(weights.parent)) is None:
            return weights.parent
    return None


def load_pretrained_vision(policy, spec: str | os.PathLike, run_dir: Path | None = None,
                           announce: bool = True) -> dict[str, Any]:
    """Load a finished vision pretraining into `policy`'s towers, projector, readout and grounding.

    Every such part the policy has must be in the file with the same shapes (a readout or grounding the
    policy lacks is skipped, as pretraining discards it); the error names the first key at fault and the
    settings the file was made with. Returns the file's report (copied to `run_dir` with its source).
    `announce`: print where it came from (one process of several says it)."""
    directory = resolve_checkpoint(spec)
    saved, metadata = _read_weights(directory)
    problem = _mismatch(policy, {key: tuple(value.shape) for key, value in saved.items()}, metadata)
    if problem is not None:
        raise ValueError(f"{directory / WEIGHTS_FILE}: {problem} ({_made_with(metadata)})")
    with torch.no_grad():
        for name, part in pretrained_parts(policy).items():
            for key, value in part.state_dict().items():
                value.copy_(saved[f"{name}.{key}"].to(value.dtype))
    report_path = directory / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    if run_dir is not None:
        (Path(run_dir) / REPORT_FILE).write_text(json.dumps({**report, "loaded_from": str(directory)}, indent=2))
    summary = report.get("overall_cm", {}).get("heldout_error_cm")
    if announce:
        print(f"[train] vision pretraining loaded from {directory}"
              + (f" (held-out localization error {summary:.1f} cm)" if summary is not None else ""), flush=True)
    return report


def _render_chunk(args) -> dict[str, np.ndarray]:
    from envs.layouts import render_layouts

    task, seeds, backend, image_size, randomization, arm_steps, arm, wrist_camera = args
    return render_layouts(task, seeds, backend=backend, image_size=image_size, randomization=randomization,
                          arm_steps=arm_steps, arm=arm, wrist_camera=wrist_camera)


def render_suite_layouts(config: VisionPretrainingConfig, image_size: int, chunk: int = 200,
                         wrist_camera: bool = False) -> dict[str, np.ndarray]:
    """`config.layouts` layouts spread over the suite's tasks (the arm moved by the expert in the first
    `expert_fraction` of each task's), rendered by `num_workers` processes."""
    from envs.suites import get_suite

    suite = get_suite(config.suite)
    per_task = -(-config.layouts // len(suite.tasks))
    jobs = []
    for task in suite.tasks:
        seeds = suite.episode_seeds(task, per_task, seed=SEED_SALT + int(config.seed))
        n_expert = int(round(config.expert_fraction * per_task))
        for arm, part in (("expert", seeds[:n_expert]), ("random", seeds[n_expert:])):
            jobs += [(task, part[i:i + chunk], config.backend, image_size, config.randomization, config.arm_steps, arm,
                      wrist_camera)
                     for i in range(0, len(part), chunk)]
    parts = []
    bar = tqdm(total=per_task * len(suite.tasks), desc="render layouts", unit="layout", dynamic_ncols=True)
    with ProcessPoolExecutor(max_workers=max(1, int(config.num_workers))) as pool:
        for part in pool.map(_render_chunk, jobs):
            parts.append(part)
            bar.update(len(part["images"]))
    bar.close()
    return {key: np.concatenate([p[key] for p in parts]) for key in parts[0]}


def train_grounding(grounding, processor, texts: np.ndarray, named: np.ndarray, config: VisionPretrainingConfig,
                    steps: int | None = None) -> dict[str, Any]:
    """Train the instruction grounding (text only: it reads the prompt's tokens, not the images) to name the slot
    of each object an instruction or clause names (`envs.layouts.instruction_examples`; -1: none). Returns the
    report's grounding entries: the share of held-out examples whose every named object is right, overall and
    for the clauses of multi-step instructions alone."""
    from embodied.train import warmup_schedule
    from envs.layouts import SLOTS

    device = next(grounding.parameters()).device
    targets = torch.from_numpy(np.where(np.asarray(named) < 0, len(SLOTS), np.asarray(named)))  # "none": the last class
    ids, mask = processor.prompt_inputs([str(t) for t in texts])
    rng = np.random.default_rng(config.seed + 1)
    order = rng.permutation(len(targets))
    n_heldout = max(1, int(round(config.heldout_fraction * len(order))))
    heldout, train_idx = order[:n_heldout], order[n_heldout:]
    steps = config.steps if steps is None else steps
    optimizer = torch.optim.AdamW(grounding.parameters(), lr=config.lr, weight_decay=0.0)
    scheduler = warmup_schedule(optimizer, "cosine", min(config.warmup_steps, steps // 10), steps, floor=0.1)
    requires_grad = {id(p): p.requires_grad for p in grounding.parameters()}
    grounding.train().requires_grad_(True)
    losses = []
    try:
        for _ in tqdm(range(steps), desc="train grounding", unit="step", dynamic_ncols=True):
            idx = rng.choice(train_idx, config.batch_size)
            logits = grounding(ids[idx].to(device), mask[idx].to(device)).float()
            loss = F.cross_entropy(logits.flatten(0, 1), targets[idx].flatten().to(device))
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(grounding.parameters(), 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
    finally:
        optimizer.zero_grad(set_to_none=True)
        for p in grounding.parameters():
            p.requires_grad_(requires_grad[id(p)])
        grounding.eval()
    with torch.no_grad():
        chosen = torch.cat([grounding(ids[heldout[i:i + 256]].to(device), mask[heldout[i:i + 256]].to(device)).argmax(-1)
                            for i in range(0, len(heldout), 256)]).cpu()
    right = (chosen == targets[heldout]).all(1).numpy()
    is_clause = np.isin(np.asarray(texts)[heldout], _clause_texts(texts))
    return {"named_objects_heldout_accuracy": float(right.mean()),
            "named_objects_heldout_accuracy_clauses": float(right[is_clause].mean()) if is_clause.any() else None,
            "grounding_examples": int(len(targets)), "grounding_steps": int(steps),
            "grounding_first_loss": float(np.mean(losses[:10])), "grounding_final_loss": float(np.mean(losses[-10:]))}


def _clause_texts(texts) -> list[str]:
    """The texts among `texts` that are clauses of a multi-step instruction also among them."""
    from policies.instructions import split_instruction

    clauses = set()
    for text in set(map(str, texts)):
        parts = split_instruction(text)
        if len(parts) > 1:
            clauses.update(parts)
    return sorted(clauses)


def grounding_examples(config: VisionPretrainingConfig, per_task: int) -> tuple[np.ndarray, np.ndarray]:
    """(texts, named slots) of `per_task` layouts of every task of the suite (their instructions and clauses),
    from resets alone: the grounding reads no image."""
    from envs.env import TabletopEnv
    from envs.layouts import instruction_examples
    from envs.suites import get_suite

    suite = get_suite(config.suite)
    texts, named = [], []
    for task in tqdm(suite.tasks, desc="instructions", unit="task", dynamic_ncols=True):
        env = TabletopEnv(task, backend=config.backend, image_size=16, randomization=config.randomization)
        try:
            for seed in suite.episode_seeds(task, per_task, seed=SEED_SALT + int(config.seed)):
                env.reset(seed=int(seed))
                for text, slots in instruction_examples(env):
                    texts.append(text)
                    named.append(slots)
        finally:
            env.close()
    return np.array(texts), np.stack(named)


def retrain_grounding(spec: str | os.PathLike, per_task: int = 500, steps: int = 2000, seed: int = 0) -> dict[str, Any]:
    """Go on training a finished pretraining's instruction grounding (from its weights) on the suite's instructions
    and the clauses of its multi-step ones, and write it back with its report; the other parts are unchanged."""
    import policies

    directory = resolve_checkpoint(spec)
    saved, metadata = _read_weights(directory)
    if "grounding" not in metadata.get("parts", "").split(","):
        raise ValueError(f"{directory / WEIGHTS_FILE} has no instruction grounding ({_made_with(metadata)})")
    slots = saved["object_readout.slots"].shape[0] if "object_readout.slots" in saved else 0
    policy = policies.OpenVLAPolicy.from_size(
        "tiny", observation_image_size=int(metadata["observation_image_size"]),
        wrist_image=metadata.get("wrist_image") == "True", use_proprio=True, train_vision=False,
        object_slots=int(slots), named_objects=int(saved["grounding.queries"].shape[0]))
    load_pretrained_vision(policy, directory)
    report_path = directory / REPORT_FILE
    report = json.loads(report_path.read_text()) if report_path.is_file() else {}
    config = VisionPretrainingConfig.from_dict({**report.get("config", {}), "seed": seed})
    texts, named = grounding_examples(config, per_task)
    torch.manual_seed(seed)
    report.update(train_grounding(policy.grounding, policy.processor, texts, named, config, steps=steps))
    report["grounding_retrained"] = {"per_task": per_task, "steps": steps, "seed": seed}
    save_pretrained_vision(policy, directory, report)
    return report


def _errors_cm(prediction: np.ndarray, target: np.ndarray, present: np.ndarray) -> np.ndarray:
    distance = np.linalg.norm(prediction - target, axis=-1) * SCALE * 100
    return (distance * present).sum(0) / np.maximum(present.sum(0), 1)


def pretrain_vision(policy, config: VisionPretrainingConfig, run_dir: Path | None = None) -> dict[str, Any]:
    """Train `policy.vision` (and the policy's object readout, if it has one) to locate objects; start the
    policy's projector from the readout's. Returns (and writes to `run_dir`) the report."""
    from embodied.train import warmup_schedule
    from envs.layouts import MAX_NAMED, SLOTS
    from policies.openvla import ObjectReadout

    generator_state = torch.get_rng_state()  # restored at the end: policy training draws what it would without this stage
    torch.manual_seed(config.seed)
    device = policy.device
    readout = policy.object_readout
    if readout is None:
        readout = ObjectReadout(policy.vision.feature_dim, policy.llm.config.hidden_size, policy.vision.num_patches,
                                len(SLOTS), policy.config.projector, wrist=policy.config.wrist_image).to(device)
    elif len(readout.slots) != len(SLOTS):
        raise ValueError(f"policy.object_slots={len(readout.slots)} but vision pretraining locates {len(SLOTS)} "
                         f"slots ({', '.join(SLOTS)}); set policy.object_slots={len(SLOTS)}")
    grounding = policy.grounding
    if grounding is not None and len(grounding.queries) != MAX_NAMED:
        raise ValueError(f"policy.named_objects={len(grounding.queries)} but the suite's instructions name up to "
                         f"{MAX_NAMED} objects; set policy.named_objects={MAX_NAMED}")
    image_size = int(policy.config.observation_image_size)
    wrist = bool(policy.config.wrist_image)
    data = render_suite_layouts(config, image_size, wrist_camera=wrist)
    targets = ((data["positions"] - CENTRE) / SCALE).astype(np.float32)
    present = data["present"].astype(np.float32)
    order = np.random.default_rng(config.seed).permutation(len(targets))
    n_heldout = max(1, int(round(config.heldout_fraction * len(order))))
    heldout, train_idx = order[:n_heldout], order[n_heldout:]

    parts = [policy.vision, readout]
    params = [p for part in parts for p in part.parameters()]
    grad_before = {id(p): p.requires_grad for p in params}
    for p in params:
        p.requires_grad_(True)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=0.0)
    steps = config.steps
    scheduler = warmup_schedule(optimizer, "cosine", config.warmup_steps, steps, floor=0.1)

    def predict(idx: np.ndarray, shuffled: np.ndarray | None = None) -> torch.Tensor:
        """The readout's positions for layouts `idx`; `shuffled`: show these layouts' images instead."""
        shown = idx if shuffled is None else shuffled
        return policy.locate_objects(data["images"][shown], data["states"][idx],
                                     data["wrist_images"][shown] if wrist else None, readout=readout).float()

    def heldout_errors(shuffle: bool = False) -> np.ndarray:
        shown = heldout[np.random.default_rng(1).permutation(len(heldout))] if shuffle else heldout
        with torch.no_grad():
            predicted = np.concatenate([predict(heldout[i:i + 64], shown[i:i + 64]).cpu().numpy()
                                        for i in range(0, len(heldout), 64)])
        return _errors_cm(predicted, targets[heldout], present[heldout])

    threads = torch.get_num_threads()
    # no data readers run yet: every core, unless other jobs share them (oversubscribed threads spin and stall)
    torch.set_num_threads(config.threads or os.cpu_count() or 1)
    rng = np.random.default_rng(config.seed)
    for part in parts:
        part.train()
    bar = tqdm(total=steps, desc="pretrain vision", unit="step", dynamic_ncols=True)
    losses = []
    try:
        for step in range(steps):
            idx = rng.choice(train_idx, config.batch_size)
            predicted = predict(idx)
            target = torch.from_numpy(targets[idx]).to(device)
            mask = torch.from_numpy(present[idx]).to(device)
            loss = (((predicted - target) ** 2).sum(-1) * mask).sum() / mask.sum().clamp(min=1)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"vision pretraining loss is {loss.item()} at step {step + 1}")
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            optimizer.step()
            scheduler.step()
            losses.append(loss.item())
            bar.update(1)
            if (step + 1) % 10 == 0:
                bar.set_postfix(loss=f"{np.mean(losses[-10:]):.3f}")
    finally:
        bar.close()
        optimizer.zero_grad(set_to_none=True)
        torch.set_num_threads(threads)
        torch.set_rng_state(generator_state)
        for p in params:
            p.requires_grad_(grad_before[id(p)])
    for part in parts:
        part.eval()
    policy.projector.load_state_dict(readout.input.state_dict())
    mean_position = (targets[train_idx] * present[train_idx, :, None]).sum(0) / np.maximum(
        present[train_idx].sum(0), 1)[:, None]
    report = {
        "layouts": int(len(targets)), "heldout_layouts": int(n_heldout), "steps": steps,
        "slots": list(SLOTS), "heldout_present": present[heldout].sum(0).astype(int).tolist(),
        "heldout_error_cm": heldout_errors().round(2).tolist(),
        "shuffled_images_error_cm": heldout_errors(shuffle=True).round(2).tolist(),
        "mean_position_error_cm": _errors_cm(np.broadcast_to(mean_position, targets[heldout].shape),
                                             targets[heldout], present[heldout]).round(2).tolist(),
        "first_loss": float(np.mean(losses[:10])), "final_loss": float(np.mean(losses[-10:])),
        "config": {f.name: getattr(config, f.name) for f in fields(config)},
    }
    if grounding is not None:
        report.update(train_grounding(grounding, policy.processor, data["grounding_texts"], data["grounding_named"],
                                      config))
    weights = present[heldout].sum(0)
    summary = {key: float((np.asarray(report[key]) * weights).sum() / weights.sum())
               for key in ("heldout_error_cm", "shuffled_images_error_cm", "mean_position_error_cm")}
    report["overall_cm"] = summary
    print(f"[train] vision pretraining: held-out localization error {summary['heldout_error_cm']:.1f} cm "
          f"(shuffled images {summary['shuffled_images_error_cm']:.1f} cm, mean position "
          f"{summary['mean_position_error_cm']:.1f} cm) over {n_heldout} held-out layouts"
          + (f"; named objects right in {100 * report['named_objects_heldout_accuracy']:.1f}% of held-out instructions "
             f"and clauses" if grounding is not None else ""), flush=True)
    if run_dir is not None:
        # the readout is saved even when this policy discards it: the stage can then serve policies that keep one
        parts = SimpleNamespace(vision=policy.vision, projector=policy.projector, object_readout=readout,
                                grounding=policy.grounding, config=policy.config)
        save_pretrained_vision(parts, run_dir, report)
    return report


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Retrain a finished vision pretraining's instruction grounding "
                                                 "on the suite's instructions and their clauses, in place.")
    parser.add_argument("checkpoint", help="a pretraining directory, or a name under policies/pretrained/")
    parser.add_argument("--per-task", type=int, default=500, help="layouts per task (their instructions)")
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    result = retrain_grounding(args.checkpoint, args.per_task, args.steps, args.seed)
    print(json.dumps({k: v for k, v in result.items() if k.startswith(("named", "grounding"))}, indent=2))
