"""World models: frame tokenizer and action-conditioned dynamics for imagined rollouts.

    FrameTokenizer, TokenizerConfig      FSQ frame tokenizer          (tokenizer.py)
    DynamicsModel, DynamicsConfig, Rollout   ST-transformer, AR + MaskGIT decoding, imagined robot state (dynamics.py)
    SuccessDetector                      is the task complete in this (imagined) frame and state (success.py)
    LatentActionModel, LatentActionConfig    Genie's latent actions, learned from video without actions (latent_actions.py)
    WorldModel                           all parts as one save_pretrained directory (model.py)
    ImaginedEnv                          a gymnasium env whose steps are imagined (env.py)
"""
from __future__ import annotations

import importlib

_EXPORTS = {
    "tokenizer": ("FrameTokenizer", "TokenizerConfig"),
    "dynamics": ("DynamicsModel", "DynamicsConfig", "Rollout"),
    "success": ("SuccessDetector", "SuccessDetectorConfig"),
    "latent_actions": ("LatentActionModel", "LatentActionConfig"),
    "model": ("WorldModel",),
    "env": ("ImaginedEnv",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
