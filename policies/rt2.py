"""RT-2-style VLA: one SigLIP ViT, a linear projection into the LLM, the same 256-bin action tokens.

RT-2 (PaLI-X / PaLM-E) feeds a single ViT's patch embeddings through a linear projection into a
language model and emits actions as text tokens; here the action tokens, the processor, the
training loss, decoding modes and checkpoints are exactly OpenVLA's (see openvla.py), so both
policies go through the same trainer and evaluator.
"""
from __future__ import annotations

from policies.openvla import OpenVLAPolicy

RT2_PROMPT = "Q: What action should the robot take to {instruction}? A:"


class RT2Policy(OpenVLAPolicy):
    policy_type = "rt2"
    tower_names = ("siglip",)
    default_projector = "linear"
    default_prompt = RT2_PROMPT
