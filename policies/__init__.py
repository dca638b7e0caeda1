"""Vision-language-action policies that emit actions as LLM tokens.

    import policies
    policy = policies.OpenVLAPolicy.from_size("tiny", statistics=stats)   # random init, no download
    loss, metrics = policy(batch)                                          # a reader batch
    action = policy.predict_action(observation, "pick up the red cube")    # (7,) float32
    policy.save_pretrained("runs/ckpt")
    policy = policies.load_pretrained("runs/ckpt")                         # OpenVLA or RT-2, from config.json

Modules: openvla.py (OpenVLA), rt2.py (RT-2 style), processor.py (shared preprocessing),
action_tokenizer.py (256-bin action tokens), action_chunks.py (open-loop chunk execution),
instructions.py (multi-step instructions as clauses), lora.py (peft adapters), sizes.py (tiny | base | 7b).
Names are imported on first use, so `import policies` does not load transformers.
"""
from __future__ import annotations

import importlib
import os
from typing import Any, Mapping

_EXPORTS = {
    "openvla": ("OpenVLAPolicy", "VLAConfig", "VisionBackbone"),
    "rt2": ("RT2Policy",),
    "processor": ("VLAProcessor",),
    "action_tokenizer": ("ActionTokenizer",),
    "action_chunks": ("ActionChunkQueue",),
    "instructions": ("split_instruction",),
    "lora": ("LoraSettings", "apply_lora", "merge_lora", "load_adapter"),
    "tiny_tokenizer": ("build_tiny_tokenizer",),
    "sizes": ("SIZES",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE) + ["POLICY_TYPES", "policy_class", "load_pretrained", "make_policy"]
POLICY_TYPES = ("openvla", "rt2")


def __getattr__(name: str):
    if name in _WHERE:
        value = getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def policy_class(policy_type: str):
    if policy_type == "openvla":
        from policies.openvla import OpenVLAPolicy

        return OpenVLAPolicy
    if policy_type == "rt2":
        from policies.rt2 import RT2Policy

        return RT2Policy
    raise ValueError(f"unknown policy type {policy_type!r}; valid: {', '.join(POLICY_TYPES)}")


def load_pretrained(path_or_id: str | os.PathLike, **kwargs):
    """Any policy checkpoint (directory or hub id): the class comes from its config.json."""
    from policies.openvla import read_config, resolve_checkpoint

    directory = resolve_checkpoint(path_or_id)
    policy_type = read_config(directory).get("policy_type")
    policy = policy_class(policy_type).from_pretrained(directory, **kwargs)
    policy.name_or_path = str(path_or_id)
    return policy


# settings a config may change on a loaded checkpoint (they do not change its weights' shapes)
CHECKPOINT_OVERRIDES = ("decoding", "unnorm_key", "autocast", "n_action_steps", "label_sigma_bins", "binarize_gripper",
                        "gripper_threshold", "gripper_switch_threshold", "temporal_ensemble_coeff",
                        "action_loss_weights", "regression_losses", "instruction_clauses", "clause_hold_tolerance",
                        "clause_still_steps", "clause_done_threshold", "clause_release_opening")


def make_policy(cfg: Mapping[str, Any], statistics: Mapping[str, Any] | None = None, device=None):
    """A policy from the Hydra `policy` config group (embodied/conf/policy/*.yaml).

    `pretrained` set: load that checkpoint (config keys given here override its decoding settings).
    Otherwise build `size` (`pretrained_components: true` loads the size's hub models).
    LoRA (`lora.enabled`) wraps the result in a peft model.
    """
    cfg = dict(cfg)
    policy_type = cfg.pop("name", None) or cfg.pop("policy_type", None)
    if policy_type is None:
        raise ValueError("policy config needs a 'name' (openvla | rt2)")
    cls = policy_class(policy_type)
    lora = dict(cfg.pop("lora", None) or {})
    pretrained = cfg.pop("pretrained", None)
    size = cfg.pop("size", "tiny")
    components = bool(cfg.pop("pretrained_components", False))
    # decoding and action_chunk are decided by the data, the gripper settings and the loss's settings by the user,
    # when given; null: the checkpoint's own (the dataclass default for a new policy)
    for key in ("decoding", "action_chunk", "binarize_gripper", "gripper_threshold", "gripper_switch_threshold",
                "label_sigma_bins", "action_loss_weights", "regression_losses", "instruction_clauses",
                "clause_hold_tolerance", "clause_still_steps", "clause_done_threshold", "clause_release_opening"):
        if cfg.get(key) is None:
            cfg.pop(key, None)
    if pretrained:
        overrides = {k: v for k, v in cfg.items() if k in CHECKPOINT_OVERRIDES}
        policy = cls.from_pretrained(pretrained, device=device or "cpu", **overrides)
        if statistics is not None:
            policy.set_statistics(statistics)
    else:
        policy = cls.from_size(size, statistics=statistics, pretrained=components, device=device, **cfg)
    if lora.pop("enabled", False):
        from policies.lora import LoraSettings, apply_lora

        policy = apply_lora(policy, LoraSettings(**lora))
    return policy
