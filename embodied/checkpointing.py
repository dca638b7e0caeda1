"""Training checkpoints shared by the trainers: atomic save, keep the last N, exact resume.

A checkpoint is a directory `<root>/step_<NNNNNNNNN>/` holding whatever the trainer writes
into it (models via their own `save_pretrained`, safetensors) plus `trainer_state.pt`:
counters (step, frames seen, data-iterator position, wandb id, ...), optimizer and scheduler
state dicts and the RNG states (python, numpy, torch, CUDA). `trainer_state.pt` is read back
with `torch.load(weights_only=True)`, so nothing is unpickled.

The directory is written under a hidden temporary name and renamed into place, so a crash
never leaves a partial checkpoint that `latest_checkpoint` could pick up.

    def write(tmp):                                   # a callable, or {"name": model, ...}
        model.save_pretrained(tmp / "policy")
        save_training_state(tmp, optimizer, scheduler, step=step, frames=frames)
    path = save_checkpoint(run_dir / CHECKPOINT_DIR, step, write, keep_last=3)

    ckpt = latest_checkpoint(run_dir / CHECKPOINT_DIR)
    counters = load_training_state(ckpt, optimizer, scheduler)   # also restores the RNGs

Optimizers and schedulers are one object each, or a {name: object} mapping for trainers with
several (e.g. a world model's tokenizer and dynamics stages).
"""
from __future__ import annotations

import contextlib
import os
import random
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator, Mapping

import numpy as np
import torch

CHECKPOINT_DIR = "checkpoints"
TRAINER_STATE = "trainer_state.pt"
STEP_PATTERN = re.compile(r"^step_(\d+)$")


def checkpoint_name(step: int) -> str:
    return f"step_{int(step):09d}"


def checkpoint_step(path: str | os.PathLike) -> int:
    m = STEP_PATTERN.match(Path(path).name)
    if not m:
        raise ValueError(f"{path}: not a checkpoint directory (expected a name like step_000001000)")
    return int(m.group(1))


# -- RNG ---------------------------------------------------------------------------------------------

def capture_rng_state() -> dict[str, Any]:
    """Python, numpy (global), torch and CUDA generator states, in weights_only-loadable types."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng_state(state: Mapping[str, Any]) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# -- finding ---------------------------------------------------------------------------------------

def list_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root` (those with a trainer_state.pt), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir()
             if p.is_dir() and (m := STEP_PATTERN.match(p.name)) and (p / TRAINER_STATE).exists()]
    return [p for _, p in sorted(found)]


def latest_checkpoint(root: str | os.PathLike) -> Path | None:
    found = list_checkpoints(root)
    return found[-1] if found else None


# -- saving ----------------------------------------------------------------------------------------

def _state_dicts(objects) -> Any:
    if objects is None:
        return None
    if isinstance(objects, Mapping):
        return {name: obj.state_dict() for name, obj in objects.items()}
    return objects.state_dict()


def save_training_state(directory: str | os.PathLike, optimizer=None, scheduler=None, **counters) -> Path:
    """Write `trainer_state.pt` into `directory`: counters, optimizer/scheduler states and RNG states.

    `counters` must be weights_only-loadable: numbers, strings, None, tensors, and lists/tuples/
    dicts of those (e.g. a numpy Generator's `bit_generator.state`).
    """
    path = Path(directory) / TRAINER_STATE
    torch.save({"counters": dict(counters), "optimizer": _state_dicts(optimizer),
                "scheduler": _state_dicts(scheduler), "rng": capture_rng_state()}, path)
    return path


@contextlib.contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """A hidden temporary directory beside `final`: renamed to `final` (replacing it) when the block
    succeeds, removed when it raises, so readers never see a partial directory."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def save_checkpoint(root: str | os.PathLike, step: int, write: Callable[[Path], Any] | Mapping[str, Any],
                    keep_last: int | None = None) -> Path:
    """Create `<root>/step_<step>/` atomically and keep only the newest `keep_last` checkpoints.

    `write(tmp_dir)` fills the directory; a {name: model} mapping instead saves each model with
    `save_pretrained(tmp_dir / name)`. The caller writes `trainer_state.pt` (save_training_state)
    inside `write`; a directory without it is not treated as a checkpoint.
    """
    root = Path(root)
    final = root / checkpoint_name(step)
    with atomic_directory(final) as tmp:
        if callable(write):
            write(tmp)
        else:
            for name, model in write.items():
                if not hasattr(model, "save_pretrained"):
                    raise TypeError(f"model {name!r} ({type(model).__name__}) has no save_pretrained()")
                model.save_pretrained(tmp / name)
        if not (tmp / TRAINER_STATE).exists():
            raise RuntimeError(f"checkpoint {final} would have no {TRAINER_STATE}; call save_training_state "
                               "inside `write`")
    if keep_last is not None and int(keep_last) > 0:
        for old in list_checkpoints(root)[:-int(keep_last)]:
            shutil.rmtree(old, ignore_errors=True)
    return final


# -- loading ---------------------------------------------------------------------------------------

def _load_into(saved, targets, kind: str, path: Path) -> None:
    if targets is None:
        return
    if saved is None:
        raise KeyError(f"{path}: holds no {kind} state")
    if isinstance(targets, Mapping):
        if not isinstance(saved, Mapping):
            raise KeyError(f"{path}: holds one {kind} state, not named ones {sorted(targets)}")
        for name, target in targets.items():
            if name not in saved:
                raise KeyError(f"{path}: no {kind} state {name!r}; it has {sorted(saved)}")
            target.load_state_dict(saved[name])
    else:
        targets.load_state_dict(saved)


def read_counters(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """The counters of a checkpoint, without touching optimizers or RNGs."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {TRAINER_STATE}; not a complete training checkpoint")
    return dict(torch.load(path, map_location="cpu", weights_only=True)["counters"])


def load_training_state(checkpoint: str | os.PathLike, optimizer=None, scheduler=None,
                        restore_rng: bool = True) -> dict[str, Any]:
    """Restore optimizer(s)/scheduler(s) and the RNGs from `checkpoint`; returns its counters."""
    path = Path(checkpoint) / TRAINER_STATE
    if not path.exists():
        raise FileNotFoundError(f"{path}: no {TRAINER_STATE}; not a complete training checkpoint")
    state = torch.load(path, map_location="cpu", weights_only=True)
    _load_into(state.get("optimizer"), optimizer, "optimizer", path)
    _load_into(state.get("scheduler"), scheduler, "scheduler", path)
    if restore_rng:
        restore_rng_state(state["rng"])
    return dict(state["counters"])
