"""`WorldModel`: tokenizer + dynamics + success detector + action statistics, saved as one directory.

    <dir>/tokenizer/        FrameTokenizer (config.json, model.safetensors)
    <dir>/dynamics/         DynamicsModel
    <dir>/success_detector/ SuccessDetector (optional)
    <dir>/latent_actions/   LatentActionModel (optional): Genie's latent actions, learned without action labels
    <dir>/dataset_statistics.json   action (and robot state) statistics the inputs were normalized with
    <dir>/worldmodel.json   which statistics entry to use, training metrics

`from_pretrained` refuses a tokenizer whose image size, grid or codebook differs from the one
the dynamics model (or the latent action model) was trained on.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from worldmodel.dynamics import DynamicsModel, Rollout
from worldmodel.latent_actions import LatentActionModel
from worldmodel.success import SuccessDetector
from worldmodel.tokenizer import FrameTokenizer

MANIFEST = "worldmodel.json"


class WorldModel:
    def __init__(self, tokenizer: FrameTokenizer, dynamics: DynamicsModel, detector: SuccessDetector | None = None,
                 statistics: dict[str, dict] | None = None, statistics_key: str | None = None,
                 info: dict[str, Any] | None = None, latent_actions: LatentActionModel | None = None):
        dynamics.check_tokenizer(tokenizer.fingerprint())
        if latent_actions is not None:
            latent_actions.check_tokenizer(tokenizer.fingerprint())
            latent_actions.eval()
        self.latent_actions = latent_actions
        self.tokenizer, self.dynamics, self.detector = tokenizer.eval(), dynamics.eval(), detector
        if detector is not None:
            detector.eval()
        self.statistics = statistics or {}
        if statistics_key is None and self.statistics:
            statistics_key = next(iter(self.statistics))
        if statistics_key is not None and statistics_key not in self.statistics:
            raise KeyError(f"statistics_key {statistics_key!r} not in the saved statistics "
                           f"({', '.join(self.statistics)})")
        self.statistics_key = statistics_key
        self.info = dict(info or {})

    @property
    def image_size(self) -> int:
        return self.tokenizer.config.image_size

    @property
    def device(self) -> torch.device:
        return self.dynamics.device

    def to(self, device) -> "WorldModel":
        for part in (self.tokenizer, self.dynamics, self.detector, self.latent_actions):
            if part is not None:
                part.to(device)
        return self

    # -- actions -----------------------------------------------------------------------------
    def normalize_actions(self, actions) -> np.ndarray:
        """Raw 7-D actions (..., 7) → the normalized form the dynamics model was trained on."""
        from embodied.data.statistics import normalize

        actions = np.asarray(actions, np.float32)
        if actions.shape[-1] != self.dynamics.config.action_dim:
            raise ValueError(f"action must have dimension {self.dynamics.config.action_dim} "
                             f"([dx, dy, dz, droll, dpitch, dyaw, gripper]); got shape {actions.shape}")
        if self.statistics_key is None:
            return actions
        return normalize(actions, self.statistics[self.statistics_key]["action"], "bounds_q99")

    # -- robot states ------------------------------------------------------------------------
    @property
    def uses_states(self) -> bool:
        """Whether the model imagines the robot state (and needs the context frames' states)."""
        return bool(self.dynamics.config.state_dim)

    def _state_statistics(self) -> dict:
        entry = self.statistics.get(self.statistics_key, {}).get("proprio") if self.statistics_key else None
        if entry is None:
            raise ValueError("this world model imagines robot states but has no 'proprio' statistics to "
                             "normalize them with")
        return entry

    def normalize_states(self, states) -> np.ndarray:
        """Raw robot states (..., S) → the normalized form the model imagines (mean/std)."""
        from embodied.data.statistics import normalize

        states = np.asarray(states, np.float32)
        if states.shape[-1] != self.dynamics.config.state_dim:
            raise ValueError(f"state must have dimension {self.dynamics.config.state_dim}; got shape {states.shape}")
        return normalize(states, self._state_statistics(), "normal")

    def unnormalize_states(self, states) -> np.ndarray:
        from embodied.data.statistics import unnormalize

        return unnormalize(np.asarray(states, np.float32), self._state_statistics(), "normal")

    # -- imagination -------------------------------------------------------------------------
    def rollout(self, context_frames, context_actions=None, method: str = "maskgit", steps: int = 8,
                temperature: float = 1.0, sample_temperature: float = 0.0, seed: int | None = None,
                context_states=None) -> Rollout:
        """Start imagining from real frames (B, T, H, W, 3) uint8, the raw actions between them (B, T-1, 7)
        and, for a model that imagines states, the frames' raw robot states (B, T, S)."""
        frames = np.asarray(context_frames)
        if frames.ndim == 4:
            frames = frames[None]
        # each row's frames as one sequence: a tokenizer that holds still codes encodes them as in training
        tokens = torch.stack([self.tokenizer.encode_sequence(row) for row in frames]).reshape(
            frames.shape[0], frames.shape[1], -1)
        actions = None
        if context_actions is not None and frames.shape[1] > 1:
            actions = torch.from_numpy(self.normalize_actions(np.asarray(context_actions).reshape(
                frames.shape[0], frames.shape[1] - 1, -1)))
        states = None
        if self.uses_states:
            if context_states is None:
                raise ValueError("this world model imagines the robot state too: give context_states, the "
                                 "context frames' states (B, T, S)")
            states = torch.from_numpy(self.normalize_states(np.asarray(context_states, np.float32).reshape(
                frames.shape[0], frames.shape[1], -1)))
        generator = None
        if seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(int(seed))
        return Rollout(self.dynamics, tokens, actions, method=method, steps=steps, temperature=temperature,
                       sample_temperature=sample_temperature, generator=generator, context_states=states)

    def decode(self, tokens: torch.Tensor) -> np.ndarray:
        """Tokens (..., g*g) or (..., g, g) → uint8 frames."""
        from worldmodel.tokenizer import to_uint8

        g = self.tokenizer.config.grid
        tokens = torch.as_tensor(tokens)
        if tuple(tokens.shape[-2:]) != (g, g):
            tokens = tokens.reshape(*tokens.shape[:-1], g, g)
        return to_uint8(self.tokenizer.decode(tokens))

    @torch.no_grad()
    def success(self, tokens: torch.Tensor, states: torch.Tensor | None = None,
                references: torch.Tensor | None = None) -> np.ndarray:
        """Whether each (imagined) frame (B, g*g), with its imagined normalized state (B, S) and the tokens of
        the real frame its rollout started from (B, g*g), for a detector that reads them, shows the task
        complete, by the success detector."""
        if self.detector is None:
            raise RuntimeError("this world model has no success detector (train one with train_worldmodel "
                               "stage 'detector')")
        if states is not None:
            states = torch.as_tensor(states).to(self.device)
        if references is not None:
            references = torch.as_tensor(references).to(self.device)
        return self.detector.predict(torch.as_tensor(tokens).to(self.device), states, references).cpu().numpy()

    @torch.no_grad()
    def infer_latent_actions(self, frames) -> np.ndarray:
        """The latent action (id in [0, n_latent_actions)) between each pair of consecutive frames
        (B, T, H, W, 3) uint8 (or (T, H, W, 3)) → (B, T-1) (or (T-1,)) int64, by the latent action model."""
        if self.latent_actions is None:
            raise RuntimeError("this world model has no latent action model (train one with train_worldmodel "
                               "stage 'latent_actions')")
        frames = np.asarray(frames)
        single = frames.ndim == 4
        frames = frames[None] if single else frames
        tokens = torch.stack([self.tokenizer.encode_sequence(row) for row in frames])
        ids = self.latent_actions.infer_latent_actions(tokens).cpu().numpy()
        return ids[0] if single else ids

    # -- persistence -------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from embodied.checkpointing import atomic_directory

        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            self.tokenizer.save_pretrained(tmp / "tokenizer")
            self.dynamics.save_pretrained(tmp / "dynamics")
            if self.detector is not None:
                self.detector.save_pretrained(tmp / "success_detector")
            if self.latent_actions is not None:
                self.latent_actions.save_pretrained(tmp / "latent_actions")
            if self.statistics:
                from embodied.data.statistics import save_dataset_statistics

                save_dataset_statistics(self.statistics, tmp)
            (tmp / MANIFEST).write_text(json.dumps({"statistics_key": self.statistics_key,
                                                    "tokenizer": self.tokenizer.fingerprint(), **self.info},
                                                   indent=2, default=str))
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str = "cpu") -> "WorldModel":
        directory = Path(directory)
        manifest = directory / MANIFEST
        if not manifest.exists():
            raise FileNotFoundError(f"{directory}: no {MANIFEST}; not a saved world model directory")
        info = json.loads(manifest.read_text())
        tokenizer = FrameTokenizer.from_pretrained(directory / "tokenizer", map_location)
        dynamics = DynamicsModel.from_pretrained(directory / "dynamics", map_location)
        dynamics.check_tokenizer(tokenizer.fingerprint(), source=str(directory / "tokenizer"))
        detector = None
        if (directory / "success_detector").is_dir():
            detector = SuccessDetector.from_pretrained(directory / "success_detector", map_location)
        latent_actions = None
        if (directory / "latent_actions").is_dir():
            latent_actions = LatentActionModel.from_pretrained(directory / "latent_actions", map_location)
            latent_actions.check_tokenizer(tokenizer.fingerprint(), source=str(directory / "tokenizer"))
        statistics = {}
        if (directory / "dataset_statistics.json").exists():
            from embodied.data.statistics import load_dataset_statistics

            statistics = load_dataset_statistics(directory)
        key = info.pop("statistics_key", None)
        info.pop("tokenizer", None)
        return cls(tokenizer, dynamics, detector, statistics, key, info, latent_actions)
