"""`load_policy(spec)`: one place that turns a `policy=` value into something that acts.

    random                    uniform actions within the action bounds, seeded
    scripted                  the simulated arm's scripted expert, read from its status topic
                              (rehearsal with `robot=sim_panda` only: it needs privileged state)
    ws://host:port            a remote policy server (`python -m embodied.serve`)
    <directory> | <hub id>    a checkpoint, through `policies.load_pretrained`

Every policy has `predict_action(observation: dict, instruction: str) -> np.ndarray (7,)`, the action for
this control step (a chunked checkpoint runs its chunks open-loop, as the evaluation harness does), `reset()`,
called at every episode start, and `metadata()`. A policy whose actions depend on its episode so far also has
`session()`: an independent episode stream on the same weights, one per robot the policy server serves.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import numpy as np

from envs.env import ACTION_HIGH, ACTION_LOW


class RandomPolicy:
    """Uniform random actions within the action bounds, seeded."""

    name = "random"

    def __init__(self, seed: int = 0, low=ACTION_LOW, high=ACTION_HIGH):
        self.seed = int(seed)
        self.low = np.asarray(low, dtype=np.float32)
        self.high = np.asarray(high, dtype=np.float32)
        self.rng = np.random.default_rng(self.seed)

    def predict_action(self, observation: Mapping[str, Any], instruction: str | None = None) -> np.ndarray:
        return self.rng.uniform(self.low, self.high).astype(np.float32)

    def reset(self) -> None:
        self.rng = np.random.default_rng(self.seed)

    def session(self) -> "RandomPolicy":
        return RandomPolicy(self.seed, self.low, self.high)

    def metadata(self) -> dict:
        return {"policy": self.name, "seed": self.seed, "action_dim": 7}


class SimExpertPolicy:
    """The simulated arm's scripted expert: its next action arrives with every frame in the
    status message (`observation["sim"]["expert_action"]`)."""

    name = "scripted"

    def predict_action(self, observation: Mapping[str, Any], instruction: str | None = None) -> np.ndarray:
        sim = observation.get("sim")
        if not isinstance(sim, Mapping) or "expert_action" not in sim:
            raise RuntimeError("policy=scripted needs the simulated arm's expert actions (the sim server's status "
                               "topic, robot=sim_panda with expert=true); a real robot has no scripted expert")
        action = np.asarray(sim["expert_action"], dtype=np.float32)
        if action.shape != (7,):
            raise RuntimeError(f"the simulated arm's expert action has shape {action.shape}, expected (7,)")
        return action

    def reset(self) -> None:
        pass

    def metadata(self) -> dict:
        return {"policy": self.name, "action_dim": 7}


class CheckpointPolicy:
    """A `policies` checkpoint behind the common interface.

    Each call is one control step: the model's `select_action` runs its chunks open-loop for
    `n_action_steps` and switches the gripper from its last command, exactly as the evaluation harness does,
    until `reset()` starts the next episode. The episode's queue belongs to this object: `session()` gives
    another episode stream on the same model (the policy server opens one per connection).
    """

    def __init__(self, model, spec: str):
        from policies.action_chunks import ActionChunkQueue

        self.model = model
        self.name = str(spec)
        self.actions = ActionChunkQueue.for_config(getattr(model, "config", None))

    def predict_action(self, observation: Mapping[str, Any], instruction: str | None = None) -> np.ndarray:
        obs = {k: v for k, v in observation.items() if k in ("image", "wrist_image", "state", "instruction")}
        action = self.model.select_action(obs, instruction, queue=self.actions)
        return np.asarray(action, dtype=np.float32).reshape(7)

    def reset(self) -> None:
        self.actions.reset()

    def session(self) -> "CheckpointPolicy":
        """An episode stream of its own (queued actions, gripper command) on the same model."""
        return CheckpointPolicy(self.model, self.name)

    def metadata(self) -> dict:
        meta = {"policy": self.name, "action_dim": 7, "class": type(self.model).__name__}
        config = getattr(self.model, "config", None)
        if config is not None and hasattr(config, "to_dict"):
            meta["config"] = {k: v for k, v in config.to_dict().items() if isinstance(v, (str, int, float, bool))}
        return meta


def _looks_like_path(spec: str) -> bool:
    # A hub id is "name" or "org/name"; anything else that does not exist is a missing directory.
    return spec.startswith((".", "/", "~")) or spec.count("/") > 1


def load_policy(spec: str, seed: int = 0, **kwargs):
    """A policy from a `policy=` value (see the module docstring); `kwargs` go to the loader."""
    if not isinstance(spec, (str, os.PathLike)) or not str(spec).strip():
        raise ValueError(f"policy must be 'random', 'scripted', ws://host:port, or a checkpoint directory / hub id; "
                         f"got {spec!r}")
    spec = str(spec).strip()
    if spec == "random":
        return RandomPolicy(seed)
    if spec == "scripted":
        return SimExpertPolicy()
    if spec.startswith(("ws://", "wss://")):
        from embodied.serve import RemotePolicy

        return RemotePolicy(spec, **kwargs)
    path = Path(spec).expanduser()
    if not path.exists() and _looks_like_path(spec):
        raise FileNotFoundError(f"policy checkpoint directory {spec!r} does not exist")
    if path.exists() and not path.is_dir():
        raise ValueError(f"policy {spec!r} is a file; a checkpoint is a directory with config.json and "
                         "model.safetensors")
    try:
        import policies

        loader = policies.load_pretrained
    except (ImportError, AttributeError) as err:
        raise RuntimeError(f"cannot load checkpoint {spec!r}: policies.load_pretrained is not available in this "
                           f"installation ({err})") from err
    return CheckpointPolicy(loader(str(path) if path.exists() else spec, **kwargs), spec)
