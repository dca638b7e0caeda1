"""`save_pretrained` / `from_pretrained` for the world model's parts: `config.json` + `model.safetensors`.

Every part is a `torch.nn.Module` with a dataclass `config`; weights are written with
safetensors (never pickled) and the directory is written atomically (temp dir, then rename),
so a crash never leaves a half-written model behind.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch

from embodied.config_keys import from_mapping

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


def check_tokenizer_fingerprint(config, fingerprint: dict, source: str, part: str, short: str) -> None:
    """Refuse a tokenizer (its `fingerprint()`) whose image size, grid, levels or codebook differ from those a
    part trained on tokens recorded in its config (`tokenizer_image_size`, `grid`, `tokenizer_levels`,
    `codebook_size`); the error names each difference."""
    expected = {"image_size": config.tokenizer_image_size, "grid": config.grid,
                "levels": list(config.tokenizer_levels), "codebook_size": config.codebook_size}
    diff = {k: (expected[k], fingerprint.get(k)) for k in expected if expected[k] != fingerprint.get(k)}
    if diff:
        detail = ", ".join(f"{k}: {short} expects {a}, {source} has {b}" for k, (a, b) in diff.items())
        raise ValueError(f"tokenizer does not match the {part} ({detail})")


def _config_from_dict(config_cls, values: dict[str, Any], source: str):
    values = {k: (tuple(v) if isinstance(v, list) else v) for k, v in values.items()}  # JSON lists: tuples
    try:
        return from_mapping(config_cls, values, f"{config_cls.__name__} key", ignore=("model_type",))
    except ValueError as err:
        raise ValueError(f"{source}: {err}") from None


class PretrainedMixin:
    """Adds save_pretrained/from_pretrained to a module with `config_class`, `model_type` and `.config`."""

    config_class: type
    model_type: str

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        from embodied.checkpointing import atomic_directory

        directory = Path(directory)
        with atomic_directory(directory) as tmp:
            payload = {"model_type": self.model_type, **asdict(self.config)}
            (tmp / CONFIG_NAME).write_text(json.dumps(payload, indent=2))
            state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
            save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt", "model_type": self.model_type})
        return directory

    @classmethod
    def load_config(cls, directory: str | os.PathLike):
        path = Path(directory) / CONFIG_NAME
        if not path.exists():
            raise FileNotFoundError(f"{path}: no {CONFIG_NAME}; not a saved {cls.__name__} directory")
        values = json.loads(path.read_text())
        model_type = values.get("model_type")
        if model_type != cls.model_type:
            raise ValueError(f"{path}: model_type is {model_type!r}, expected {cls.model_type!r}")
        return _config_from_dict(cls.config_class, values, str(path))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu"):
        from safetensors.torch import load_file

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"{directory}: not a directory (world-model parts load from local directories)")
        config = cls.load_config(directory)
        model = cls(config)
        weights = directory / WEIGHTS_NAME
        if not weights.exists():
            raise FileNotFoundError(f"{weights}: missing weights file")
        state = load_file(str(weights), device=str(map_location))
        missing, unexpected = model.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise ValueError(f"{weights}: weights do not match the config (missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]})")
        return model.eval()
