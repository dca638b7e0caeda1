"""Run logging: wandb (offline by default, no account or network needed) plus a local metrics.jsonl.

    logger = RunLogger(run_dir, project="embodied", config=cfg_dict, mode="offline")
    logger.log({"loss": 0.3}, step=10)
    logger.finish()

`mode` is wandb's: "offline" (default; `wandb sync <run_dir>/wandb/...` uploads later),
"online", or "disabled" (only metrics.jsonl). The wandb run id is kept in
`<run_dir>/wandb_run_id.txt`, so a resumed training run continues the same wandb run.
"""
from __future__ import annotations

import json
import math
import os
import uuid
from pathlib import Path
from typing import Any, Mapping

WANDB_MODES = ("offline", "online", "disabled")


class RunLogger:
    def __init__(self, run_dir: str | os.PathLike, project: str = "embodied", config: Mapping[str, Any] | None = None,
                 mode: str = "offline", name: str | None = None, tags: list[str] | None = None):
        if mode not in WANDB_MODES:
            raise ValueError(f"unknown wandb mode {mode!r}; valid: {', '.join(WANDB_MODES)}")
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.run_dir / "metrics.jsonl"
        self.mode = mode
        self.run = None
        if mode != "disabled":
            import wandb

            id_file = self.run_dir / "wandb_run_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:8]
            id_file.write_text(run_id)
            self.run = wandb.init(project=project, dir=str(self.run_dir), config=dict(config or {}), mode=mode,
                                  name=name, id=run_id, resume="allow", tags=tags,
                                  settings=wandb.Settings(silent=True, console="off"))

    def log(self, metrics: Mapping[str, Any], step: int) -> None:
        clean = {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else v)
                 for k, v in metrics.items()}
        with open(self.metrics_path, "a") as f:
            f.write(json.dumps({"step": int(step), **{k: v for k, v in clean.items() if _is_number(v)}}) + "\n")
        if self.run is not None:
            self.run.log(dict(clean), step=int(step))

    def summary(self, values: Mapping[str, Any]) -> None:
        if self.run is not None:
            for k, v in values.items():
                self.run.summary[k] = v

    def finish(self) -> None:
        if self.run is not None:
            self.run.finish()
            self.run = None

    def __enter__(self) -> "RunLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.finish()


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
