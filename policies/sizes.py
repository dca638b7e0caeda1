"""Model sizes (`tiny` | `base` | `7b`): vision towers, LLM and tokenizer of each.

Every part has a hub id (or None: built by the project) and the architecture of that hub model,
so a size can be
- loaded pretrained with `from_pretrained` (hub ids or local directories; downloads happen then,
  never at import or in tests),
- built from its architecture alone with random weights (`tiny` on a laptop, `base` for GPU
  speed measurements, `7b` on the `meta` device to count parameters without allocating them).

`7b` is OpenVLA's recipe: DINOv2-L/14 with registers and SigLIP so400m/14, both at 224 px
(16 x 16 = 256 patches, 1024 + 1152 = 2176 fused channels), and Llama-2-7B.
"""
from __future__ import annotations

import copy
from typing import Any

IMAGENET_MEAN, IMAGENET_STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
SIGLIP_MEAN, SIGLIP_STD = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]


def _dinov2(hub_id, hidden, layers, heads, image_size, mlp_ratio=4, patch=14):
    return {"name": "dinov2", "pretrained": hub_id, "image_size": image_size, "image_mean": IMAGENET_MEAN,
            "image_std": IMAGENET_STD,
            "model_config": {"model_type": "dinov2_with_registers", "hidden_size": hidden, "num_hidden_layers": layers,
                             "num_attention_heads": heads, "mlp_ratio": mlp_ratio, "patch_size": patch,
                             "image_size": image_size, "num_register_tokens": 4, "layer_norm_eps": 1e-6}}


def _siglip(hub_id, hidden, intermediate, layers, heads, image_size, patch=14):
    # The attention-pooling head is dropped: the policy reads patch features, never the pooled vector.
    return {"name": "siglip", "pretrained": hub_id, "image_size": image_size, "image_mean": SIGLIP_MEAN,
            "image_std": SIGLIP_STD,
            "model_config": {"model_type": "siglip_vision_model", "hidden_size": hidden,
                             "intermediate_size": intermediate, "num_hidden_layers": layers,
                             "num_attention_heads": heads, "patch_size": patch, "image_size": image_size,
                             "vision_use_head": False, "layer_norm_eps": 1e-6}}


def _llama(hub_id, hidden, intermediate, layers, heads, kv_heads, vocab, max_positions, rope_theta=10000.0):
    return {"pretrained": hub_id,
            "model_config": {"model_type": "llama", "hidden_size": hidden, "intermediate_size": intermediate,
                             "num_hidden_layers": layers, "num_attention_heads": heads,
                             "num_key_value_heads": kv_heads, "vocab_size": vocab,
                             "max_position_embeddings": max_positions, "rms_norm_eps": 1e-5,
                             "rope_theta": rope_theta, "tie_word_embeddings": False}}


SIZES: dict[str, dict[str, Any]] = {
    # Trains in minutes on a laptop CPU: 112 px towers (8 x 8 = 64 patches), a 2-layer Llama.
    "tiny": {
        "towers": [_dinov2(None, 64, 2, 2, 112, mlp_ratio=2), _siglip(None, 64, 128, 2, 2, 112)],
        "llm": _llama(None, 128, 256, 2, 4, 4, 1024, 512),
        "tokenizer": "tiny",
    },
    # A GPU-sized model: DINOv2-B/14 at 224 and SigLIP-B/16 at 256 (both 16 x 16 patches), TinyLlama 1.1B.
    "base": {
        "towers": [_dinov2("facebook/dinov2-with-registers-base", 768, 12, 12, 224),
                   _siglip("google/siglip-base-patch16-256", 768, 3072, 12, 12, 256, patch=16)],
        "llm": _llama("TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T", 2048, 5632, 22, 32, 4, 32000, 2048),
        "tokenizer": "TinyLlama/TinyLlama-1.1B-intermediate-step-1431k-3T",
    },
    # OpenVLA 7B.
    "7b": {
        "towers": [_dinov2("facebook/dinov2-with-registers-large", 1024, 24, 16, 224),
                   _siglip("google/siglip-so400m-patch14-224", 1152, 4304, 27, 16, 224)],
        "llm": _llama("meta-llama/Llama-2-7b-hf", 4096, 11008, 32, 32, 32, 32000, 4096),
        "tokenizer": "meta-llama/Llama-2-7b-hf",
    },
}


def get_size(size: str, towers: tuple[str, ...]) -> dict[str, Any]:
    """A deep copy of one size, keeping only the named vision towers (in that order)."""
    if size not in SIZES:
        raise ValueError(f"unknown policy size {size!r}; valid: {', '.join(SIZES)}")
    spec = copy.deepcopy(SIZES[size])
    by_name = {t["name"]: t for t in spec["towers"]}
    missing = [t for t in towers if t not in by_name]
    if missing:
        raise ValueError(f"size {size!r} has no vision tower {missing[0]!r}; it has {', '.join(by_name)}")
    spec["towers"] = [by_name[t] for t in towers]
    return spec
