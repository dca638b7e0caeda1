"""LoRA fine-tuning of a policy with peft (OpenVLA's recipe).

Defaults are OpenVLA's fine-tune settings: r=32, lora_alpha=16, dropout 0, gaussian init, on all
linear layers of the LLM (its output head excluded). By default the vision towers are frozen and
the projector (and the parallel-decoding slot embeddings) are trained in full; whatever is trained
in full is listed in `modules_to_save`, so the adapter directory alone carries every change:

    peft_policy = apply_lora(policy)                  # a peft.PeftModel around the policy
    peft_policy.save_pretrained("adapter/")           # adapter_config.json + adapter_model.safetensors
    base = policies.load_pretrained("base_ckpt/")
    tuned = peft.PeftModel.from_pretrained(base, "adapter/")   # plain peft loads it
    merged = merge_lora(tuned)                        # a plain policy again; save_pretrained → deployable
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch.nn as nn

LLM_PART, VISION_PART = "llm", "vision"


@dataclass
class LoraSettings:
    r: int = 32
    alpha: int = 16
    dropout: float = 0.0
    target_modules: str | list[str] = "all-linear"  # "all-linear", or module name suffixes (e.g. ["q_proj", "v_proj"])
    lora_parts: list[str] = field(default_factory=lambda: [LLM_PART])  # where adapters go: "llm", "vision"
    train_vision: bool = False  # vision towers trained in full (saved with the adapter)
    train_projector: bool = True  # projector, slot embeddings (and L1 head, proprio projector) trained in full (saved with the adapter)
    init_lora_weights: str | bool = "gaussian"


def lora_target_names(policy: nn.Module, settings: LoraSettings) -> list[str]:
    """Full names of the linear layers that get adapters (the LLM's output head never does)."""
    unknown = sorted(set(settings.lora_parts) - {LLM_PART, VISION_PART})
    if unknown:
        raise ValueError(f"unknown lora_parts {unknown}; valid: {LLM_PART!r}, {VISION_PART!r}")
    if settings.train_vision and VISION_PART in settings.lora_parts:
        raise ValueError("train_vision=True trains the towers in full; do not also put adapters on them")
    head = policy.llm.get_output_embeddings()
    names = []
    for part in settings.lora_parts:
        for name, module in getattr(policy, part).named_modules():
            if not isinstance(module, nn.Linear) or module is head:
                continue
            if settings.target_modules != "all-linear":
                wanted = [settings.target_modules] if isinstance(settings.target_modules, str) else settings.target_modules
                if name.rsplit(".", 1)[-1] not in wanted:
                    continue
            names.append(f"{part}.{name}")
    if not names:
        raise ValueError(f"no linear layer matches target_modules={settings.target_modules!r} in {settings.lora_parts}")
    return names


def apply_lora(policy: nn.Module, settings: LoraSettings | None = None):
    """Wrap a policy in a peft model; only adapters (and modules_to_save) stay trainable."""
    import peft

    settings = settings or LoraSettings()
    modules_to_save = []
    if settings.train_projector:
        modules_to_save += ["projector", "action_slots"]
        modules_to_save += [name for name in ("action_head", "proprio_projector", "keyframe_head", "keyframe_projector",
                                              "object_projector", "object_embeddings", "named_projector",
                                              "named_embeddings")
                            if getattr(policy, name, None) is not None]
    if settings.train_vision:
        modules_to_save.append("vision")
    config = peft.LoraConfig(r=settings.r, lora_alpha=settings.alpha, lora_dropout=settings.dropout,
                             target_modules=lora_target_names(policy, settings),
                             modules_to_save=modules_to_save or None, init_lora_weights=settings.init_lora_weights)
    policy.set_trainable(vision=False, projector=False, llm=False)
    model = peft.get_peft_model(policy, config)
    return model


def load_adapter(policy: nn.Module, adapter_dir: str | os.PathLike, trainable: bool = False):
    """A saved adapter on a loaded base policy (the same as plain `peft.PeftModel.from_pretrained`)."""
    import peft

    if not os.path.isfile(os.path.join(adapter_dir, "adapter_config.json")):
        raise FileNotFoundError(f"no adapter_config.json in {adapter_dir}")
    return peft.PeftModel.from_pretrained(policy, adapter_dir, is_trainable=trainable)


def merge_lora(peft_model) -> nn.Module:
    """Fold the adapters into the base weights: a plain policy whose save_pretrained is deployable."""
    policy = peft_model.merge_and_unload()
    policy.set_trainable(vision=policy.config.train_vision)
    return policy
