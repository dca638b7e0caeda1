"""OpenVLA: fused DINOv2 + SigLIP patch features → MLP projector → a causal LM that speaks action tokens.

    image ─┬─ DINOv2 (second-to-last layer, patch tokens) ─┐
           └─ SigLIP (second-to-last layer, patch tokens) ─┴─ concat channels ─ projector ─┐
    [BOS] + projected patches + "In: What action should the robot take to {instruction}?\\nOut:" ─ LLM ─ action tokens

- Actions: 256 uniform bins over [-1, 1] of BOUNDS_Q99-normalized actions, each bin one of the
  last 256 ids of the vocabulary (`ActionTokenizer`); loss on the action tokens and the stop token.
- Decoding, selectable per call:
  "autoregressive" — OpenVLA's: greedy, one token per LLM step (KV cache), constrained to action ids;
  "parallel" — OpenVLA-OFT's: K*7 action slots (learned embeddings) after the prompt attend to each
  other bidirectionally and all K actions come out of a single forward pass.
- Action head, selectable at training (`action_head`): "tokens" — OpenVLA's 256-bin tokens from the
  LM head (cross-entropy); "l1" — OpenVLA-OFT's L1 regression head: the parallel slots' final hidden
  states, the 7 of each action concatenated, go through an MLP with residual blocks to continuous
  normalized actions (L1 loss). It needs parallel decoding. With `classify_gripper`, its gripper output
  is an open/close logit (binary cross-entropy) instead: demonstrations only ever open or close fully.
- Proprioception (`use_proprio`, off by default as in OpenVLA): OpenVLA-OFT's projected state token,
  placed after the image patches.
- Keyframe head (`keyframe_loss_weight > 0`): an auxiliary regression of the state at the episode's
  next keyframe (the next grasp or release, else the end), read from the projected patches by one
  cross-attention (with spatial-softmax coordinates) whose query carries the instruction and the
  robot state. It gives the vision towers a direct, dense localization signal. With `keyframe_token`
  the prediction also becomes a token after the patches, so that the LLM acts towards it; otherwise
  inference never runs the head.
- Preprocessing (image resize and normalization per tower, prompt, action tokens, statistics) lives
  in one `VLAProcessor`, shared by `forward()` and `predict_action()`.

`RT2Policy` (rt2.py) is the same model with one SigLIP tower, a linear projector and RT-2's prompt.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from embodied.config_keys import from_mapping
from embodied.data.statistics import STATISTICS_FILENAME, load_dataset_statistics, save_dataset_statistics
from policies.action_chunks import ActionChunkQueue
from policies.processor import DECODING_MODES, VLAProcessor, canonical_quaternions
from policies.sizes import get_size

OPENVLA_PROMPT = "In: What action should the robot take to {instruction}?\nOut:"
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"


@dataclass
class VLAConfig:
    policy_type: str = "openvla"
    size: str = "tiny"
    vision_towers: list[dict] = field(default_factory=list)  # name, image_size, image_mean/std, model_config
    llm: dict = field(default_factory=dict)  # a transformers causal-LM config (model_type + fields)
    projector: str = "fused_gelu_mlp"  # | "linear"
    prompt: str = OPENVLA_PROMPT
    action_dim: int = 7
    n_action_bins: int = 256
    action_chunk: int = 1  # K actions per prediction
    n_action_steps: int | None = None  # actions of each chunk executed before predicting again (None: all K)
    decoding: str = "autoregressive"  # | "parallel"
    action_head: str = "tokens"  # | "l1": OpenVLA-OFT's L1 regression head on the parallel slots (continuous actions)
    binarize_gripper: bool = False  # snap predicted gripper commands (the last dim, 1 = open) to 0 or 1 at gripper_threshold
    classify_gripper: bool = False  # with action_head="l1": the gripper is an open/close logit (cross-entropy), the rest regressed
    # open above it, close at or below: the classifier's p(open) with classify_gripper, the command with binarize_gripper
    # (with parallel tokens, the mean of the gripper's bin distribution)
    gripper_threshold: float = 0.5
    # set: the gripper keeps its current command and switches only when the other state's score (p(closed) or
    # p(open); the command with binarize_gripper) exceeds it, at most once per chunk; below 0.5 it switches more
    # eagerly than gripper_threshold would in either direction (see gripper_commands)
    gripper_switch_threshold: float | None = None
    # set (with n_action_steps=1): ACT's temporal ensembling, the action is the exp(-coeff * i)-weighted
    # mean of every chunk's prediction for the step, oldest first (policies.action_chunks)
    temporal_ensemble_coeff: float | None = None
    # prompt with one clause of a multi-step instruction at a time, moving on once the arm has stood still (moved
    # under clause_hold_tolerance metres over the last clause_still_steps steps, its gripper command kept): for
    # policies trained on clause-labelled demonstrations (embodied.collect clause_instructions=true)
    instruction_clauses: bool = False
    clause_hold_tolerance: float = 0.003
    clause_still_steps: int = 8
    # > 0 (with the L1 head): a clause-done head, trained on data.clause_done_frames with this loss weight, says
    # whether the prompted clause is done; with instruction_clauses the next clause also follows once its
    # probability passes clause_done_threshold, as well as once the arm stands still
    clause_done_loss_weight: float = 0.0
    clause_done_threshold: float = 0.5
    # > 0: with instruction_clauses a clause also ends once the fingers let go of what they held, wider than this
    # opening (0 closed to 1 open) while commanded closed: a cube let go over its tray; 0: off
    clause_release_opening: float = 0.0
    observation_image_size: int = 224  # the camera images the policy is trained on (resized to each tower's size)
    normalization: str = "bounds_q99"
    unnorm_key: str | None = None
    autocast: str = "auto"  # "auto": bf16 on CUDA, none on CPU | "bfloat16" | "float16" | "none"
    gradient_checkpointing: bool = False
    train_vision: bool = True  # full training updates the towers (OpenVLA does); LoRA freezes them by default
    use_proprio: bool = False  # OpenVLA-OFT's proprio token: the robot state, projected, after the image patches
    proprio_dim: int = 8  # the common state: end-effector position 3, quaternion xyzw 4, gripper 1
    label_sigma_bins: float = 0.0  # 0: one-hot cross-entropy (OpenVLA); > 0: Gaussian soft labels, std in bins
    # per action dimension, the weight of its loss (null: all 1); rare labels such as the wrist's turn (yaw moves
    # in ~7% of frames) otherwise lose to the dimensions that move every frame
    action_loss_weights: list[float] | None = None
    # with action_head="l1", per action dimension: "l1" (OFT; the conditional median) or "mse" (the mean). A rare
    # label the policy is unsure of has a median of 0, so an L1-regressed dimension never moves; the mean moves
    # by the policy's confidence and, re-planned every few steps, gets there (null: "l1" everywhere)
    regression_losses: list[str] | None = None
    keyframe_loss_weight: float = 0.0  # > 0: auxiliary loss on the next keyframe's state (batches need keyframe_state)
    keyframe_token: bool = False  # the predicted keyframe also becomes a token the LLM reads (needs the loss)
    object_slots: int = 0  # > 0: an object readout locates that many objects (envs.layouts.SLOTS: 10); each is a token
    named_objects: int = 0  # > 0: which located objects the instruction names, in its order (envs.layouts.MAX_NAMED: 4); each is a token
    named_relations: bool = False  # each named object's token also says where it is from the first named one (push: the goal from the cube)
    wrist_image: bool = False  # OpenVLA-OFT's second camera: the wrist image's patches follow the primary image's
    # false: the LLM reads no image patch, only the state, object and named-object tokens (the towers still run,
    # for the object readout); at the tiny scale patches let a policy memorize its demonstrations' frames
    image_patches: bool = True
    # false: the located objects reach the LLM only through the named-object tokens, not one token per slot
    # (a slot whose object is not in the scene is located anyway, and its varying reading is one more way to
    # memorize frames)
    slot_tokens: bool = True

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> "VLAConfig":
        return from_mapping(cls, values, "policy config key")

    def validate(self) -> None:
        if self.decoding not in DECODING_MODES:
            raise ValueError(f"unknown decoding {self.decoding!r}; valid: {', '.join(DECODING_MODES)}")
        if self.action_head not in ACTION_HEADS:
            raise ValueError(f"unknown action_head {self.action_head!r}; valid: {', '.join(ACTION_HEADS)}")
        if self.action_head == "l1" and self.decoding != "parallel":
            raise ValueError(f"action_head='l1' regresses the parallel slots' hidden states: it needs "
                             f"decoding='parallel', got {self.decoding!r}")
        if self.classify_gripper and self.action_head != "l1":
            raise ValueError(f"classify_gripper splits the L1 head's output: it needs action_head='l1', "
                             f"got {self.action_head!r}")
        if not 0 < self.gripper_threshold < 1:  # also refuses NaN
            raise ValueError(f"gripper_threshold must be in (0, 1), got {self.gripper_threshold}")
        if self.gripper_switch_threshold is not None:
            if not 0 < self.gripper_switch_threshold < 1:  # also refuses NaN
                raise ValueError(f"gripper_switch_threshold must be in (0, 1) or None, got {self.gripper_switch_threshold}")
            if not (self.classify_gripper or self.binarize_gripper):
                raise ValueError("gripper_switch_threshold switches a binary gripper: it needs classify_gripper or "
                                 "binarize_gripper")
        if self.action_chunk < 1:
            raise ValueError(f"action_chunk must be >= 1, got {self.action_chunk}")
        if self.regression_losses is not None:
            if self.action_head != "l1":
                raise ValueError(f"regression_losses choose the L1 head's loss per dimension: it needs "
                                 f"action_head='l1', got {self.action_head!r}")
            kinds = list(self.regression_losses)
            if len(kinds) != self.action_dim or not set(kinds) <= set(REGRESSION_LOSSES):
                raise ValueError(f"regression_losses must be {self.action_dim} of {', '.join(REGRESSION_LOSSES)} (one "
                                 f"per action dimension), got {self.regression_losses}")
        if self.action_loss_weights is not None:
            weights = list(self.action_loss_weights)
            if len(weights) != self.action_dim or not all(w >= 0 for w in weights) or not any(w > 0 for w in weights):
                raise ValueError(f"action_loss_weights must be {self.action_dim} weights >= 0 (one per action "
                                 f"dimension), not all 0; got {self.action_loss_weights}")
        if self.n_action_steps is not None and not 1 <= self.n_action_steps <= self.action_chunk:
            raise ValueError(f"n_action_steps must be in [1, action_chunk={self.action_chunk}], got {self.n_action_steps}")
        if self.temporal_ensemble_coeff is not None:
            if not self.temporal_ensemble_coeff >= 0:  # also refuses NaN
                raise ValueError(f"temporal_ensemble_coeff must be >= 0 or None, got {self.temporal_ensemble_coeff}")
            if self.n_action_steps != 1 or self.action_chunk < 2:
                raise ValueError("temporal_ensemble_coeff averages overlapping chunks: it needs action_chunk >= 2 and "
                                 f"n_action_steps=1, got action_chunk={self.action_chunk}, "
                                 f"n_action_steps={self.n_action_steps}")
        if not self.clause_hold_tolerance > 0:
            raise ValueError(f"clause_hold_tolerance must be > 0 (metres), got {self.clause_hold_tolerance}")
        if self.clause_still_steps < 1:
            raise ValueError(f"clause_still_steps must be >= 1, got {self.clause_still_steps}")
        if not 0 <= self.clause_release_opening < 1:
            raise ValueError(f"clause_release_opening must be in [0, 1) (the gripper's opening, 0 closed to 1 open; "
                             f"0: off), got {self.clause_release_opening}")
        if self.clause_done_loss_weight < 0:
            raise ValueError(f"clause_done_loss_weight must be >= 0, got {self.clause_done_loss_weight}")
        if self.clause_done_loss_weight > 0 and self.action_head != "l1":
            raise ValueError("clause_done_loss_weight > 0 reads the L1 head's slots: it needs action_head='l1'")
        if not 0 < self.clause_done_threshold < 1:
            raise ValueError(f"clause_done_threshold must be within (0, 1), got {self.clause_done_threshold}")
        if "{instruction}" not in self.prompt:
            raise ValueError(f"prompt {self.prompt!r} has no {{instruction}} field")
        if self.use_proprio and self.proprio_dim < 1:
            raise ValueError(f"use_proprio needs proprio_dim >= 1, got {self.proprio_dim}")
        if self.label_sigma_bins < 0:
            raise ValueError(f"label_sigma_bins must be >= 0, got {self.label_sigma_bins}")
        if self.keyframe_loss_weight < 0:
            raise ValueError(f"keyframe_loss_weight must be >= 0, got {self.keyframe_loss_weight}")
        if self.keyframe_token and self.keyframe_loss_weight <= 0:
            raise ValueError("keyframe_token needs keyframe_loss_weight > 0 (the keyframe head must be trained)")
        if self.object_slots < 0:
            raise ValueError(f"object_slots must be >= 0, got {self.object_slots}")
        if self.object_slots and self.train_vision:
            raise ValueError("object_slots needs train_vision=false: the object readout is trained once (vision "
                             "pretraining) and frozen, so the towers it reads must not change under it")
        if self.named_objects < 0:
            raise ValueError(f"named_objects must be >= 0, got {self.named_objects}")
        if self.named_objects and not (self.object_slots and self.use_proprio):
            raise ValueError("named_objects needs object_slots > 0 (it picks among the located objects) and "
                             "use_proprio=true (its tokens say where each named object is from the gripper)")
        if self.named_relations and not self.named_objects:
            raise ValueError("named_relations places named objects from the first one: it needs named_objects > 0")
        if self.wrist_image and self.object_slots and not self.use_proprio:
            raise ValueError("object_slots with wrist_image needs use_proprio=true: the readout places what the "
                             "wrist camera sees with the gripper's pose")
        if self.projector not in PROJECTORS:
            raise ValueError(f"unknown projector {self.projector!r}; valid: {', '.join(PROJECTORS)}")
        if not self.slot_tokens and not self.named_objects:
            raise ValueError("slot_tokens=false passes the located objects on only as named-object tokens: it needs "
                             "named_objects > 0")
        if not self.image_patches and not self.object_slots:
            raise ValueError("image_patches=false leaves the LLM nothing of the images: it needs object_slots > 0 "
                             "(the object readout's tokens are then its view of the scene)")


def _hf_config(values: Mapping[str, Any]):
    from transformers import AutoConfig

    values = dict(values)
    if "model_type" not in values:
        raise ValueError(f"a model config needs a model_type, got keys {sorted(values)}")
    return AutoConfig.for_model(values.pop("model_type"), **values)


# -- vision ------------------------------------------------------------------------------------------

class VisionBackbone(nn.Module):
    """Transformers vision towers; patch features of the second-to-last layer, concatenated on channels."""

    def __init__(self, towers: Sequence[Mapping[str, Any]], modules: Mapping[str, nn.Module] | None = None):
        super().__init__()
        from transformers import AutoModel

        self.towers = nn.ModuleDict()
        self.prefix_tokens: dict[str, int] = {}  # CLS and register tokens to drop
        grids = {}
        for spec in towers:
            name = spec["name"]
            model = (modules or {}).get(name)
            if model is None:
                model = AutoModel.from_config(_hf_config(spec["model_config"]))
            self.towers[name] = model
            config = model.config
            self.prefix_tokens[name] = (1 + getattr(config, "num_register_tokens", 0)
                                        if "dinov2" in config.model_type else 0)
            grids[name] = int(spec["image_size"]) // int(config.patch_size)
        if len(set(grids.values())) != 1:
            raise ValueError(f"vision towers give different patch grids {grids}; pick image sizes so that "
                             "image_size / patch_size agree")
        self.num_patches = next(iter(grids.values())) ** 2
        self.feature_dim = sum(m.config.hidden_size for m in self.towers.values())

    def forward(self, pixel_values: Mapping[str, torch.Tensor]) -> torch.Tensor:
        features = []
        for name, tower in self.towers.items():
            hidden = tower(pixel_values=pixel_values[name].to(tower.dtype), output_hidden_states=True).hidden_states
            features.append(hidden[-2][:, self.prefix_tokens[name]:])
        return torch.cat(features, dim=-1)


def fused_gelu_mlp(in_dim: int, out_dim: int) -> nn.Module:
    """OpenVLA's projector for fused features: in → 4·in → LLM width → LLM width."""
    return nn.Sequential(nn.Linear(in_dim, 4 * in_dim), nn.GELU(), nn.Linear(4 * in_dim, out_dim), nn.GELU(),
                         nn.Linear(out_dim, out_dim))


PROJECTORS = {"fused_gelu_mlp": fused_gelu_mlp, "linear": nn.Linear}
ACTION_HEADS = ("tokens", "l1")
REGRESSION_LOSSES = ("l1", "mse")


def action_token_loss(logits: torch.Tensor, targets: torch.Tensor, tokenizer, sigma_bins: float = 0.0) -> torch.Tensor:
    """Per-position cross-entropy (B, S). With `sigma_bins > 0` an action token's target is a Gaussian
    over the neighbouring bins (HL-Gauss, Farebrother et al. 2024) rather than one bin: a prediction a
    few bins off is nearly right, which one-hot cross-entropy scores like one at the far end. Other
    targets (the stop token) stay one-hot. Decoding is unchanged (argmax over the bins)."""
    log_probs = F.log_softmax(logits, dim=-1)
    one_hot = -log_probs.gather(-1, targets[..., None]).squeeze(-1)
    if sigma_bins <= 0:
        return one_hot
    bins = torch.arange(tokenizer.n_bins, device=logits.device, dtype=logits.dtype)
    centre = (targets - tokenizer.first_id).clamp(0, tokenizer.n_bins - 1).to(logits.dtype)
    soft = torch.exp(-0.5 * ((bins - centre[..., None]) / sigma_bins) ** 2)
    soft = soft / soft.sum(-1, keepdim=True)
    smoothed = -(soft * tokenizer.logits_to_bins(log_probs)).sum(-1)
    return torch.where(tokenizer.is_action_token(targets), smoothed, one_hot)


class L1RegressionHead(nn.Module):
    """OpenVLA-OFT's action head: per action of the chunk, the final hidden states of its `action_dim`
    slots, concatenated, → an MLP with residual blocks → `action_dim` normalized values."""

    def __init__(self, width: int, action_dim: int, blocks: int = 2):
        super().__init__()
        self.action_dim = action_dim
        self.inp = nn.Sequential(nn.LayerNorm(width * action_dim), nn.Linear(width * action_dim, width), nn.ReLU())
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.ReLU())
                                    for _ in range(blocks))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, action_dim))

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """(B, K*action_dim, width) slot states → (B, K, action_dim) normalized actions."""
        x = self.inp(hidden.reshape(len(hidden), -1, self.action_dim * hidden.shape[-1]))
        for block in self.blocks:
            x = x + block(x)
        return self.out(x)


def patch_grid(num_patches: int, what: str) -> torch.Tensor:
    """(row, column) of each patch of a square grid, in [-1, 1]: (num_patches, 2)."""
    side = int(round(num_patches ** 0.5))
    if side * side != num_patches:
        raise ValueError(f"{what} needs a square patch grid, got {num_patches} patches")
    axis = torch.linspace(-1, 1, side)
    return torch.stack(torch.meshgrid(axis, axis, indexing="ij"), dim=-1).reshape(num_patches, 2)


class KeyframeHead(nn.Module):
    """Where the arm goes next, read from the image: one cross-attention over the projected patches,
    queried by a learned vector plus the instruction's mean embedding and the proprio token. As a
    spatial softmax, each head also returns the attention-weighted patch-grid coordinates: pooled
    features alone say what was attended to, not where it is."""

    def __init__(self, width: int, state_dim: int, num_patches: int, heads: int = 4):
        super().__init__()
        self.register_buffer("grid", patch_grid(num_patches, "the keyframe head"), persistent=False)
        self.query = nn.Parameter(torch.zeros(width))
        self.query_norm, self.patch_norm = nn.LayerNorm(width), nn.LayerNorm(width)
        self.position = nn.Linear(2, width)  # so that the query can prefer places, not only looks
        self.attention = nn.MultiheadAttention(width, heads, batch_first=True)
        self.out = nn.Sequential(nn.Linear(width + 2 * heads, width), nn.GELU(), nn.Linear(width, state_dim))

    def forward(self, patches: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        query = self.query_norm(context + self.query)[:, None]
        keys = self.patch_norm(patches) + self.position(self.grid.to(patches.dtype))
        pooled, weights = self.attention(query, keys, keys, need_weights=True, average_attn_weights=False)
        where = weights[:, :, 0] @ self.grid.to(weights.dtype)  # (B, heads, 2) expected coordinates
        return self.out(torch.cat([pooled[:, 0], where.flatten(1)], dim=-1))


# The object readout's units: positions relative to the workspace centre, in units of 10 cm.
POSITION_CENTRE, POSITION_SCALE = (0.5, 0.0, 0.1), 0.1


def readout_units(positions: torch.Tensor) -> torch.Tensor:
    """Positions in metres (..., 3) → the object readout's units."""
    return (positions.float() - torch.tensor(POSITION_CENTRE, device=positions.device)) / POSITION_SCALE


def gripper_pose(state: torch.Tensor) -> torch.Tensor:
    """Raw states (B, 8) → (B, 7): the position in readout units, then the quaternion with its sign made
    canonical, as the proprio token has it."""
    return torch.cat([readout_units(state[:, :3]), canonical_quaternions(state[:, 3:7].float())], dim=1)


class ObjectReadout(nn.Module):
    """Where each object is: the vision features through its own projector (the policy's architecture),
    then, per slot, a few spatial soft-argmax heatmaps over the patches (a linear score per patch, so
    every patch gets gradient from the start; a query-key attention's bilinear score does not, and
    slots stalled at the mean position); their expected grid coordinates and pooled features give
    the position. A slot is an object as the image tells it apart (a colour, a fixture;
    envs.layouts.SLOTS). Trained by vision pretraining on rendered layouts with privileged positions;
    the policy keeps it frozen."""

    def __init__(self, feature_dim: int, width: int, num_patches: int, num_slots: int, projector: str,
                 maps_per_slot: int = 4, wrist: bool = False):
        super().__init__()
        self.register_buffer("grid", patch_grid(num_patches, "the object readout"), persistent=False)
        self.num_slots, self.maps = num_slots, maps_per_slot
        self.input = PROJECTORS[projector](feature_dim, width)
        self.norm = nn.LayerNorm(width)
        self.scores = nn.Linear(width, num_slots * maps_per_slot)
        # The wrist camera moves with the gripper: its heatmaps say where an object is from the gripper,
        # so its read is combined with the gripper's pose (position in readout units, quaternion).
        self.wrist_scores = nn.Linear(width, num_slots * maps_per_slot) if wrist else None
        self.slots = nn.Parameter(torch.randn(num_slots, width) * 0.02)
        inputs = (width + 2 * maps_per_slot) * (2 if wrist else 1) + (7 if wrist else 0)
        self.out = nn.Sequential(nn.Linear(inputs, width), nn.GELU(), nn.Linear(width, 3))

    def _read(self, patches: torch.Tensor, scores: nn.Linear) -> tuple[torch.Tensor, torch.Tensor]:
        """Per slot: the heatmaps' pooled features (B, slots, width) and expected grid coordinates (B, slots, 2 * maps)."""
        batch = len(patches)
        weights = scores(patches).softmax(dim=1).transpose(1, 2)  # (B, slots * maps, patches)
        where = (weights @ self.grid.to(weights.dtype)).reshape(batch, self.num_slots, 2 * self.maps)
        what = (weights @ patches).reshape(batch, self.num_slots, self.maps, -1).mean(2) + self.slots.to(patches.dtype)
        return what, where

    def forward(self, features: torch.Tensor, wrist_features: torch.Tensor | None = None,
                state: torch.Tensor | None = None) -> torch.Tensor:
        """(B, patches, feature_dim) → (B, slots, 3): positions in the units vision pretraining trained.
        A readout with a wrist camera also takes its features and the raw robot state (B, 8)."""
        parts = list(self._read(self.norm(self.input(features)), self.scores))
        if self.wrist_scores is not None:
            if wrist_features is None or state is None:
                raise ValueError("this object readout reads the wrist camera: pass its features and the robot state")
            parts += self._read(self.norm(self.input(wrist_features)), self.wrist_scores)
            pose = gripper_pose(state).to(parts[0].dtype)
            parts.append(pose[:, None].expand(-1, self.num_slots, -1))
        return self.out(torch.cat(parts, dim=-1))


class InstructionGrounding(nn.Module):
    """Which located object each object the instruction names is: a small transformer over the prompt's
    tokens, read by one learned query per named object (in the instruction's order), scores the object
    readout's slots plus "none" (the instruction names fewer). From a few hundred demonstrations the LLM
    does not learn to pick the named object's position out of the others (benchmarks/RESULTS.md, "Named
    objects"); this learns it from the thousands of instructions vision pretraining renders, where the
    simulator knows what each names. Frozen in the policy, as the readout."""

    def __init__(self, vocab_size: int, num_slots: int, num_named: int, width: int = 64, heads: int = 4,
                 layers: int = 2, max_length: int = 128):
        super().__init__()
        self.max_length = max_length
        self.tokens = nn.Embedding(vocab_size, width)
        self.positions = nn.Embedding(max_length, width)
        layer = nn.TransformerEncoderLayer(width, heads, 4 * width, dropout=0.0, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.queries = nn.Parameter(torch.randn(num_named, width) * 0.02)
        self.read = nn.MultiheadAttention(width, heads, batch_first=True)
        self.norm = nn.LayerNorm(width)
        self.out = nn.Linear(width, num_slots + 1)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Prompt ids and mask (B, L) → logits (B, named, slots + 1); the last column is "none"."""
        valid = attention_mask.bool()
        position = (valid.long().cumsum(1) - 1).clamp(min=0, max=self.max_length - 1)
        hidden = self.encoder(self.tokens(input_ids) + self.positions(position), src_key_padding_mask=~valid)
        queries = self.queries.expand(len(hidden), -1, -1)
        read, _ = self.read(queries, hidden, hidden, key_padding_mask=~valid, need_weights=False)
        return self.out(self.norm(read + queries))


def gripper_commands(open_score: np.ndarray, current: np.ndarray | None, switch_threshold: float) -> np.ndarray:
    """0 (closed) / 1 (open) gripper commands (B, K) from a chunk's open scores (B, K), with hysteresis.

    Each row starts from the gripper's current command (`current`, (B,); None: open, as an episode starts)
    and switches when the score of the other state passes `switch_threshold`: an open gripper closes when
    1 - score > threshold, a closed one opens when score > threshold. Demonstrations switch the gripper in a
    handful of frames, so a cloned classifier is rarely sure of a switch at the states a closed loop reaches
    (it hovers over the cube at p(open) 0.8, over the tray at 0.1); at most one switch per chunk, because
    later slots score the same observation and would chatter back.
    """
    score = np.asarray(open_score, dtype=np.float64)
    if score.ndim != 2:
        raise ValueError(f"open_score must be (batch, chunk), got shape {score.shape}")
    state = np.ones(len(score), dtype=bool) if current is None else np.asarray(current, dtype=np.float64) > 0.5
    if state.shape != (len(score),):
        raise ValueError(f"current gripper commands must be one per row ({len(score)}), got shape {state.shape}")
    switched = np.zeros_like(state)
    commands = np.empty(score.shape, dtype=np.float32)
    for k in range(score.shape[1]):
        flip = ~switched & np.where(state, 1.0 - score[:, k] > switch_threshold, score[:, k] > switch_threshold)
        state, switched = state ^ flip, switched | flip
        commands[:, k] = state
    return commands


def named_object_features(logits: torch.Tensor, located: torch.Tensor, tcp: torch.Tensor,
                          relations: bool = False) -> torch.Tensor:
    """(B, named, 7): each named object's position (expected over the grounding's slot probabilities), the
    same from the tool centre point, and the probability that none is named; readout units. `relations`:
    (B, named, 10), the position from the first named object (the instruction's subject) appended."""
    probs = logits.float().softmax(-1)
    position = probs[..., :-1] @ located.float()
    relative = position - readout_units(tcp)[:, None]
    parts = [position, relative, probs[..., -1:]]
    if relations:
        parts.append(position - position[:, :1])
    return torch.cat(parts, dim=-1)


# -- the policy ----------------------------------------------------------------------------------------

class OpenVLAPolicy(nn.Module):
    policy_type = "openvla"
    tower_names: tuple[str, ...] = ("dinov2", "siglip")
    default_projector = "fused_gelu_mlp"
    default_prompt = OPENVLA_PROMPT

    def __init__(self, config: VLAConfig, tokenizer=None, statistics: Mapping[str, Any] | None = None,
                 vision_modules: Mapping[str, nn.Module] | None = None, llm: nn.Module | None = None):
        super().__init__()
        from transformers import AutoModelForCausalLM

        config.validate()
        self.config = config
        self.vision = VisionBackbone(config.vision_towers, vision_modules)
        if llm is None:
            llm_config = _hf_config(config.llm)
            llm_config._attn_implementation = "sdpa"  # boolean 4-D masks (prefix-causal + bidirectional slots)
            llm = AutoModelForCausalLM.from_config(llm_config)
        self.llm = llm
        width = self.llm.get_input_embeddings().embedding_dim
        self.projector = PROJECTORS[config.projector](self.vision.feature_dim, width)
        # One learned embedding per action slot of parallel decoding (K*7 slots).
        self.action_slots = nn.Embedding(config.action_chunk * config.action_dim, width)
        nn.init.normal_(self.action_slots.weight, std=0.02)
        self.action_head = L1RegressionHead(width, config.action_dim) if config.action_head == "l1" else None
        # Whether the prompted clause is done, from the action slots' mean final hidden state (one logit), read
        # detached: trained into the shared network, its gradient cost every task its actions (reach 80% -> 0%)
        self.clause_done_head = (nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, 1))
                                 if config.clause_done_loss_weight > 0 else None)
        # OFT's proprio projector: the normalized state becomes one token after the image patches.
        self.proprio_projector = nn.Sequential(nn.Linear(config.proprio_dim, width), nn.GELU(),
                                               nn.Linear(width, width)) if config.use_proprio else None
        self.keyframe_head = (KeyframeHead(width, config.proprio_dim, self.vision.num_patches, heads=max(1, width // 32))
                              if config.keyframe_loss_weight > 0 else None)
        # The predicted keyframe as one more token after the patches: the LLM acts towards it.
        self.keyframe_projector = nn.Sequential(nn.Linear(config.proprio_dim, width), nn.GELU(),
                                                nn.Linear(width, width)) if config.keyframe_token else None
        # Located objects as tokens: the readout is frozen here (vision pretraining trains it).
        self.object_readout, self.object_projector, self.object_embeddings = None, None, None
        if config.object_slots:
            self.object_readout = ObjectReadout(self.vision.feature_dim, width, self.vision.num_patches,
                                                config.object_slots, config.projector,
                                                wrist=config.wrist_image).requires_grad_(False)
        if config.object_slots and config.slot_tokens:
            self.object_projector = nn.Sequential(nn.Linear(3, width), nn.GELU(), nn.Linear(width, width))
            self.object_embeddings = nn.Embedding(config.object_slots, width)
            nn.init.normal_(self.object_embeddings.weight, std=0.02)
        # The objects the instruction names, found among the located ones (frozen, as the readout).
        self.grounding, self.named_projector, self.named_embeddings = None, None, None
        if config.named_objects:
            self.grounding = InstructionGrounding(self.llm.get_input_embeddings().num_embeddings, config.object_slots,
                                                  config.named_objects).requires_grad_(False)
            self.named_projector = nn.Sequential(nn.Linear(10 if config.named_relations else 7, width), nn.GELU(),
                                                 nn.Linear(width, width))
            self.named_embeddings = nn.Embedding(config.named_objects, width)
            nn.init.normal_(self.named_embeddings.weight, std=0.02)
        self.tokenizer = tokenizer
        self._processor = VLAProcessor(config, tokenizer, statistics) if tokenizer is not None else None
        if tokenizer is not None and tokenizer.vocab_size > self.llm.get_input_embeddings().num_embeddings:
            raise ValueError(f"tokenizer has {tokenizer.vocab_size} ids but the LLM only "
                             f"{self.llm.get_input_embeddings().num_embeddings} embeddings")
        self.set_trainable(vision=config.train_vision)
        if config.gradient_checkpointing:
            self.enable_gradient_checkpointing()
        self.reset()  # select_action's chunk queue
        self.name_or_path: str | None = None

    # -- construction ------------------------------------------------------------------------------
    @classmethod
    def default_config(cls, size: str = "tiny", **overrides) -> VLAConfig:
        spec = get_size(size, cls.tower_names)
        values = dict(policy_type=cls.policy_type, size=size, vision_towers=spec["towers"],
                      llm=spec["llm"]["model_config"], projector=cls.default_projector, prompt=cls.default_prompt)
        values.update(overrides)
        return VLAConfig.from_dict(values)

    @classmethod
    def from_size(cls, size: str = "tiny", statistics: Mapping[str, Any] | None = None, pretrained: bool = False,
                  components: Mapping[str, str] | None = None, tokenizer=None,
                  device: str | torch.device | None = None, tower_image_size: int | None = None,
                  **overrides) -> "OpenVLAPolicy":
        """A policy of a named size: pretrained parts by hub id / local dir, or random weights from the architecture.

        `pretrained=True` loads the size's vision towers, LLM and tokenizer with `from_pretrained`
        from their hub ids; `components` replaces some of them by hub ids or local directories
        (keys: the tower names, "llm", "tokenizer") and implies `pretrained`.
        `pretrained=False` builds everything from the size's architecture with random weights and
        the project's tiny tokenizer (unless `tokenizer=` is given).
        `device="meta"` builds the module tree without allocating weights (parameter counts).
        `tower_image_size` overrides every tower's input size (e.g. smaller images for quick tests).
        """
        from transformers import AutoModelForCausalLM, AutoTokenizer

        from policies.tiny_tokenizer import build_tiny_tokenizer

        config = cls.default_config(size, **overrides)
        spec = get_size(size, cls.tower_names)
        sources = {**{t["name"]: t["pretrained"] for t in config.vision_towers}, "llm": spec["llm"]["pretrained"],
                   "tokenizer": spec["tokenizer"]}
        unknown = sorted(set(components or {}) - set(sources))
        if unknown:
            raise ValueError(f"unknown component(s) {unknown}; valid: {', '.join(sources)}")
        sources.update({k: str(v) for k, v in (components or {}).items()})
        pretrained = pretrained or bool(components)
        if tower_image_size is not None:
            for tower in config.vision_towers:
                tower["image_size"] = tower["model_config"]["image_size"] = int(tower_image_size)
        vision_modules, llm = None, None
        if pretrained:
            for name, source in sources.items():
                if source is None:
                    raise ValueError(f"size {size!r} has no pretrained {name}; pass components={{{name!r}: PATH}} "
                                     "or build with pretrained=False")
            if tokenizer is None:
                tokenizer = _load(AutoTokenizer.from_pretrained, sources["tokenizer"], "tokenizer")
            vision_modules = {}
            for tower in config.vision_towers:
                siglip = "siglip" in tower["model_config"]["model_type"]
                extra = {"vision_use_head": False} if siglip else {}  # the pooled vector is never used
                model = _load(_tower_class(tower).from_pretrained, sources[tower["name"]], f"{tower['name']} tower",
                              **extra)
                if siglip and model.config.image_size != tower["image_size"]:  # DINOv2 interpolates; SigLIP does not
                    raise ValueError(f"SigLIP tower {sources[tower['name']]!r} takes {model.config.image_size} px "
                                     f"images, the policy feeds it {tower['image_size']} px")
                tower["pretrained"] = sources[tower["name"]]
                tower["model_config"] = model.config.to_dict()
                vision_modules[tower["name"]] = model
            llm = _load(AutoModelForCausalLM.from_pretrained, sources["llm"], "LLM", attn_implementation="sdpa")
        elif tokenizer is None and device != "meta":
            tokenizer = build_tiny_tokenizer()
        if tokenizer is not None and tokenizer.pad_token is None:
            tokenizer.add_special_tokens({"pad_token": "<PAD>"})  # as OpenVLA does for Llama-2
        # Embedding rows: the tokenizer's ids (the hub vocabulary plus PAD when building on meta), padded to 64.
        rows = len(tokenizer) if tokenizer is not None else config.llm["vocab_size"] + 1
        rows = -(-rows // 64) * 64
        if llm is not None:
            if llm.get_input_embeddings().num_embeddings != rows:
                llm.resize_token_embeddings(rows, mean_resizing=False)
            config.llm = llm.config.to_dict()
        else:
            config.llm = {**config.llm, "vocab_size": rows}
        with torch.device(device) if device is not None else contextlib.nullcontext():
            policy = cls(config, tokenizer, statistics, vision_modules, llm)
        return policy

    # -- parts ---------------------------------------------------------------------------------------
    @property
    def processor(self) -> VLAProcessor:
        if self._processor is None:
            raise RuntimeError("this policy was built without a tokenizer (e.g. on the meta device); "
                               "it cannot process inputs")
        return self._processor

    @property
    def statistics(self):
        return self.processor.statistics

    def set_statistics(self, statistics: Mapping[str, Any]) -> None:
        self.processor.set_statistics(statistics)

    @property
    def device(self) -> torch.device:
        return self.action_slots.weight.device

    def set_trainable(self, vision: bool = True, projector: bool = True, llm: bool = True) -> None:
        for module, flag in ((self.vision, vision), (self.projector, projector), (self.llm, llm),
                             (self.action_slots, projector), (self.proprio_projector, projector),
                             (self.keyframe_head, projector), (self.keyframe_projector, projector),
                             (self.clause_done_head, projector),
                             (self.object_projector, projector), (self.object_embeddings, projector),
                             (self.named_projector, projector), (self.named_embeddings, projector)):
            if module is None:
                continue
            module.requires_grad_(flag)

    def enable_gradient_checkpointing(self) -> None:
        """Recompute activations in the backward pass (LLM and towers): memory for compute."""
        for model in (self.llm, *self.vision.towers.values()):
            if not getattr(model, "supports_gradient_checkpointing", False):
                continue
            if hasattr(model, "activation_checkpointing_enable"):  # the transformers >= 5.x name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        self.config.gradient_checkpointing = True

    def _autocast(self):
        mode = self.config.autocast
        if mode == "auto":
            mode = "bfloat16" if self.device.type == "cuda" else "none"
        if mode == "none":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=getattr(torch, mode))

    # -- the shared forward pass --------------------------------------------------------------------------
    def _embed(self, inputs: Mapping[str, Any], keyframe: bool = False):
        """Token embeddings: image patches (then the wrist image's patches and the proprio, keyframe, object and
        named-object tokens, if used) after BOS, slot
        embeddings on the parallel slots. Returns (embeds, valid, positions, keyframe prediction), the
        prediction None unless `keyframe` is asked for or the policy reads it as a token."""
        embed = self.llm.get_input_embeddings()
        text = embed(inputs["input_ids"])
        n = inputs["n_slots"]
        if inputs["decoding"] == "parallel":
            text = torch.cat([text[:, :-n], self.action_slots.weight[:n].to(text.dtype).expand(len(text), -1, -1)], 1)
        train_vision = torch.is_grad_enabled() and any(p.requires_grad for p in self.vision.parameters())
        with torch.set_grad_enabled(train_vision):
            features, wrist = self.encode_images(inputs)
        # the primary image's patch tokens; without image_patches only the keyframe head reads them
        patches = (self.projector(features.to(self.projector_dtype)).to(text.dtype)
                   if self.config.image_patches or self.keyframe_head is not None else None)
        extra, proprio = [], None
        if self.proprio_projector is not None:
            proprio = self.proprio_projector(inputs["proprio"].to(self.projector_dtype)).to(text.dtype)
            extra.append(proprio)
        prediction = None
        if self.keyframe_head is not None and (keyframe or self.keyframe_projector is not None):
            # the query: the instruction (mean prompt embedding, slots excluded) and the robot state
            prompt_mask = inputs["attention_mask"][:, 1:text.shape[1] - n, None].to(text.dtype)
            context = (text[:, 1:text.shape[1] - n] * prompt_mask).sum(1) / prompt_mask.sum(1).clamp(min=1)
            prediction = self.keyframe_head(patches, context if proprio is None else context + proprio)
            if self.keyframe_projector is not None:
                extra.append(self.keyframe_projector(prediction).to(text.dtype))
        if self.object_readout is not None:
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.object_readout.slots.requires_grad):
                located = self.object_readout(features.to(self.projector_dtype),
                                              None if wrist is None else wrist.to(self.projector_dtype),
                                              inputs.get("state"))
            if self.object_projector is not None:
                objects = self.object_projector(located) + self.object_embeddings.weight.to(located.dtype)
                extra.extend(objects.to(text.dtype).unbind(1))
            if self.grounding is not None:
                prompt = slice(0, inputs["input_ids"].shape[1] - n)
                with torch.no_grad():
                    logits = self.grounding(inputs["input_ids"][:, prompt], inputs["attention_mask"][:, prompt])
                features = named_object_features(logits, located, inputs["state"][:, :3], self.config.named_relations)
                named = self.named_projector(features.to(self.projector_dtype)) + self.named_embeddings.weight
                extra.extend(named.to(text.dtype).unbind(1))
        tokens = []
        if self.config.image_patches:
            tokens.append(patches)
            if wrist is not None:  # as OpenVLA-OFT: the wrist image's patches after the primary's
                tokens.append(self.projector(wrist.to(self.projector_dtype)).to(text.dtype))
        if extra:
            tokens.append(torch.stack(extra, dim=1))
        patches = torch.cat(tokens, dim=1)
        embeds = torch.cat([text[:, :1], patches, text[:, 1:]], dim=1)
        mask = inputs["attention_mask"]
        valid = torch.cat([mask[:, :1], mask.new_ones(patches.shape[:2]), mask[:, 1:]], dim=1).bool()
        positions = (valid.long().cumsum(1) - 1).clamp(min=0)
        return embeds, valid, positions, prediction

    def encode_images(self, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Patch features of the primary image and, for a policy with `wrist_image`, of the wrist image
        (None otherwise), both (B, patches, feature_dim); the towers see both in one batch."""
        if not self.config.wrist_image:
            return self.vision(inputs["pixel_values"]), None
        both = {name: torch.cat([pixels, inputs["wrist_pixel_values"][name]]) for name, pixels in
                inputs["pixel_values"].items()}
        return self.vision(both).chunk(2)

    def locate_objects(self, images, states=None, wrist_images=None, readout: nn.Module | None = None) -> torch.Tensor:
        """Where each object slot is (B, slots, 3), in readout units, from uint8 images (B, H, W, 3), raw
        states (B, 8) and, for a policy with `wrist_image`, wrist images. `readout`: one other than the
        policy's own over the same towers (vision pretraining's, for a policy without object tokens)."""
        readout = self.object_readout if readout is None else readout
        if readout is None:
            raise ValueError("this policy has no object readout (policy.object_slots=0)")
        inputs = {"pixel_values": self.processor.pixel_values(torch.as_tensor(images), device=self.device)}
        if self.config.wrist_image:
            inputs["wrist_pixel_values"] = self.processor.pixel_values(torch.as_tensor(wrist_images), device=self.device)
        features, wrist = self.encode_images(inputs)
        dtype = self.projector_dtype
        return readout(features.to(dtype), None if wrist is None else wrist.to(dtype),
                       None if states is None else torch.as_tensor(states).to(self.device))

    @property
    def projector_dtype(self) -> torch.dtype:
        return next(self.projector.parameters()).dtype

    @staticmethod
    def _attention(valid: torch.Tensor, bidirectional: int = 0) -> torch.Tensor:
        """(B, 1, L, L) boolean mask: causal, padding masked, the last `bidirectional` positions see each other."""
        length = valid.shape[1]
        allowed = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()
        if bidirectional:
            allowed[-bidirectional:, -bidirectional:] = True
        return allowed[None, None] & valid[:, None, None, :]

    def _slot_logits(self, inputs: Mapping[str, Any], embedded=None) -> torch.Tensor:
        """Logits that predict the slot tokens: (B, n_slots, vocab); `embedded`: `_embed(inputs)` when already computed."""
        embeds, valid, positions, _ = embedded if embedded is not None else self._embed(inputs)
        n = inputs["n_slots"]
        parallel = inputs["decoding"] == "parallel"
        out = self.llm(inputs_embeds=embeds, attention_mask=self._attention(valid, n if parallel else 0),
                       position_ids=positions, use_cache=False, logits_to_keep=n if parallel else n + 1)
        # Parallel: each slot predicts its own token. Autoregressive: position t predicts token t+1.
        return out.logits if parallel else out.logits[:, :-1]

    def _check_decoding(self, decoding: str | None) -> str:
        decoding = decoding or self.config.decoding
        if self.action_head is not None and decoding != "parallel":
            raise ValueError(f"this policy regresses actions from the parallel slots (action_head='l1'): it cannot "
                             f"decode {decoding!r}")
        return decoding

    def _regress_actions(self, inputs: Mapping[str, Any], embedded=None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The L1 head over the parallel slots' final hidden states: (B, K, action_dim) normalized actions,
        whose last value is the gripper's open logit with `classify_gripper`; and the clause-done head's (B,)
        logits (None without it)."""
        embeds, valid, positions, _ = embedded if embedded is not None else self._embed(inputs)
        n = inputs["n_slots"]
        hidden = self.llm.get_decoder()(inputs_embeds=embeds, attention_mask=self._attention(valid, n),
                                        position_ids=positions, use_cache=False).last_hidden_state[:, -n:]
        done = None if self.clause_done_head is None else self.clause_done_head(hidden.mean(1).detach())[:, 0]
        return self.action_head(hidden), done

    def _head_actions(self, output: torch.Tensor) -> torch.Tensor:
        """The L1 head's output as normalized actions: with `classify_gripper`, the logit becomes 1 (open) when
        p(open) > gripper_threshold, else 0."""
        if not self.config.classify_gripper:
            return output
        threshold = self.config.gripper_threshold
        logit = math.log(threshold / (1 - threshold))
        return torch.cat([output[..., :-1], (output[..., -1:] > logit).to(output.dtype)], dim=-1)

    def forward(self, batch: Mapping[str, Any], decoding: str | None = None) -> tuple[torch.Tensor, dict[str, float]]:
        """Loss and metrics on a reader batch: cross-entropy on the action tokens (and the stop token), or, with
        the L1 head, the mean absolute error of the normalized actions; `action_l1` is the same error for both.

        `batch`: image uint8 (B, H, W, 3), instruction list[str], action (B, 7) or (B, K, 7) normalized,
        optional action_mask (B, K); state (B, 8) raw, when the policy uses proprioception; wrist_image
        uint8 (B, H, W, 3), when it reads the wrist camera.
        """
        for key in ("image", "instruction", "action"):
            if key not in batch:
                raise KeyError(f"batch has no {key!r} key (keys: {', '.join(batch)})")
        inputs = self.processor(batch["image"], batch["instruction"], actions=batch["action"],
                                action_mask=batch.get("action_mask"), states=batch.get("state"),
                                decoding=self._check_decoding(decoding), wrist_images=batch.get("wrist_image"),
                                device=self.device)
        if self.keyframe_head is not None and "keyframe_state" not in batch:
            raise KeyError(f"this policy trains a keyframe head (keyframe_loss_weight="
                           f"{self.config.keyframe_loss_weight}): the batch needs 'keyframe_state' "
                           f"(data.keyframe_states=true); keys: {', '.join(batch)}")
        if self.clause_done_head is not None and "clause_done" not in batch:
            raise KeyError(f"this policy trains a clause-done head (clause_done_loss_weight="
                           f"{self.config.clause_done_loss_weight}): the batch needs 'clause_done' "
                           f"(data.clause_done_frames > 0); keys: {', '.join(batch)}")
        done = None
        with self._autocast():
            embedded = self._embed(inputs, keyframe=True)
            if self.action_head is None:
                logits = self._slot_logits(inputs, embedded)
            else:
                regressed, done = self._regress_actions(inputs, embedded)
                regressed = regressed.float()
            keyframe = embedded[3]
        tok = self.processor.action_tokenizer
        targets, weights = inputs["target_ids"], inputs["target_weights"]
        n_act = inputs["chunk"] * self.config.action_dim  # the stop token (autoregressive) is not an action
        if self.config.action_loss_weights is not None:  # per dimension, tiled over the chunk; the stop token keeps 1
            per_dim = torch.tensor(self.config.action_loss_weights, dtype=weights.dtype, device=weights.device)
            scaled = weights.clone()
            scaled[:, :n_act] = weights[:, :n_act] * per_dim.repeat(inputs["chunk"])
        else:
            scaled = weights
        if self.action_head is None:
            losses = action_token_loss(logits.float(), targets, tok, self.config.label_sigma_bins)
            loss = (losses * scaled).sum() / weights.sum().clamp(min=1)
            with torch.no_grad():
                predicted = tok.logits_to_bins(logits[:, :n_act]).argmax(-1) + tok.first_id
                errors = (tok.decode(predicted) - tok.decode(targets[:, :n_act])).abs()
        else:
            actions = self._head_actions(regressed)
            errors = (actions - inputs["actions"]).abs()
            losses = (regressed - inputs["actions"]).abs()
            if self.config.regression_losses is not None:
                squared = torch.tensor([k == "mse" for k in self.config.regression_losses], device=losses.device)
                losses = torch.where(squared, (regressed - inputs["actions"]).square(), losses)
            if self.config.classify_gripper:
                gripper = F.binary_cross_entropy_with_logits(regressed[..., -1], (inputs["actions"][..., -1] > 0.5).float(),
                                                             reduction="none")
                losses = torch.cat([losses[..., :-1], gripper[..., None]], dim=-1)
            errors, losses = errors.flatten(1), losses.flatten(1)
            loss = (losses * scaled).sum() / weights.sum().clamp(min=1)
            with torch.no_grad():
                predicted = tok.encode(actions.detach()).reshape(len(actions), -1).to(targets.device)
        extra = {}
        if keyframe is not None:
            target = self.processor.normalize_states(batch["keyframe_state"]).to(keyframe.device)
            keyframe_loss = F.mse_loss(keyframe.float(), target)
            loss = loss + self.config.keyframe_loss_weight * keyframe_loss
            extra["keyframe_loss"] = float(keyframe_loss.detach())
        if done is not None:
            # balanced: done frames are a few percent of the data
            label = batch["clause_done"].to(done.device).float()
            each = F.binary_cross_entropy_with_logits(done.float(), label, reduction="none")
            done_loss = sum(each[side].mean() for side in (label > 0.5, label <= 0.5) if side.any())
            loss = loss + self.config.clause_done_loss_weight * done_loss
            extra["clause_done_loss"] = float(done_loss.detach())
        with torch.no_grad():
            w = weights[:, :n_act]
            correct = ((predicted == targets[:, :n_act]).float() * w).sum() / w.sum().clamp(min=1)
            l1 = (errors.detach() * w).sum() / w.sum().clamp(min=1)
        metrics = {"loss": float(loss.detach()), "action_accuracy": float(correct), "action_l1": float(l1), **extra}
        return loss, metrics

    # -- inference ----------------------------------------------------------------------------------
    @torch.inference_mode()
    def predict_action_tokens(self, inputs: Mapping[str, Any], num_actions: int | None = None) -> torch.Tensor:
        """(B, K*7) action token ids, decoding constrained to the action ids."""
        if self.action_head is not None:
            raise ValueError("this policy regresses continuous actions (action_head='l1'), it emits no action "
                             "tokens: use predict_actions")
        tok = self.processor.action_tokenizer
        with self._autocast():
            if inputs["decoding"] == "parallel":
                return tok.logits_to_bins(self._slot_logits(inputs)).argmax(-1) + tok.first_id
            return self._generate(inputs, (num_actions or inputs["chunk"]) * self.config.action_dim)

    @torch.inference_mode()
    def _parallel_tokens_and_gripper_mean(self, inputs: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        """Parallel decoding's (B, K*7) argmax token ids, and each action's (B, K) normalized gripper command
        as the mean of its bin centres under the predicted distribution rather than the argmax bin."""
        tok = self.processor.action_tokenizer
        with self._autocast():
            bin_logits = tok.logits_to_bins(self._slot_logits(inputs)).float()
        ids = bin_logits.argmax(-1) + tok.first_id
        gripper_logits = bin_logits.reshape(len(ids), -1, self.config.action_dim, tok.n_bins)[:, :, -1]
        centers = tok.decode(torch.arange(tok.first_id, tok.vocab_size, device=gripper_logits.device)).float()
        return ids, (gripper_logits.softmax(-1) * centers).sum(-1)

    def _generate(self, inputs: Mapping[str, Any], n_tokens: int) -> torch.Tensor:
        """Greedy autoregressive decoding with a KV cache, one action token per LLM step."""
        from transformers import DynamicCache

        tok = self.processor.action_tokenizer
        embeds, valid, positions, _ = self._embed(inputs)
        cache = DynamicCache(config=self.llm.config)
        out = self.llm(inputs_embeds=embeds, attention_mask=self._attention(valid), position_ids=positions,
                       past_key_values=cache, use_cache=True, logits_to_keep=1)
        embed = self.llm.get_input_embeddings()
        position = positions[:, -1:]
        generated = []
        for step in range(n_tokens):
            token = tok.logits_to_bins(out.logits[:, -1]).argmax(-1) + tok.first_id
            generated.append(token)
            if step == n_tokens - 1:
                break
            valid = torch.cat([valid, valid.new_ones(len(valid), 1)], dim=1)
            position = position + 1
            out = self.llm(inputs_embeds=embed(token[:, None]), attention_mask=valid[:, None, None, :],
                           position_ids=position, past_key_values=cache, use_cache=True)
        return torch.stack(generated, dim=1)

    def predict_actions(self, observations: Sequence[Mapping[str, Any]], instructions: Sequence[str] | None = None,
                        decoding: str | None = None, num_actions: int | None = None,
                        unnorm_key: str | None = None, gripper_state: Sequence[float] | None = None) -> np.ndarray:
        """Un-normalized float32 actions (B, K, 7) for a batch of raw observations.

        K is the config's action_chunk; autoregressive decoding may ask for another `num_actions`.
        `gripper_state`: each row's current gripper command (1 open, 0 closed; None: open, as an episode
        starts), which `gripper_switch_threshold` switches from.
        """
        return self.predict_actions_and_clause_done(observations, instructions, decoding, num_actions, unnorm_key,
                                                    gripper_state)[0]

    def predict_actions_and_clause_done(self, observations: Sequence[Mapping[str, Any]],
                                        instructions: Sequence[str] | None = None, decoding: str | None = None,
                                        num_actions: int | None = None, unnorm_key: str | None = None,
                                        gripper_state: Sequence[float] | None = None) -> tuple[np.ndarray, np.ndarray | None]:
        """`predict_actions`, and from the same pass the clause-done head's (B,) probability that each row's
        prompted clause is done (None for a policy without the head)."""
        decoding = self._check_decoding(decoding)
        if decoding == "parallel" and num_actions not in (None, self.config.action_chunk):
            raise ValueError(f"parallel decoding predicts action_chunk={self.config.action_chunk} actions, "
                             f"not num_actions={num_actions}")
        inputs = self.processor.from_observations(observations, instructions, decoding=decoding, device=self.device)
        switch = self.config.gripper_switch_threshold
        open_score, done = None, None
        if self.action_head is not None:
            with torch.inference_mode(), self._autocast():
                output, done_logit = self._regress_actions(inputs)
                output = output.float()
                if done_logit is not None:
                    done = torch.sigmoid(done_logit.float()).cpu().numpy()
                if self.config.classify_gripper:
                    open_score = torch.sigmoid(output[..., -1]).cpu().numpy()
                normalized = self._head_actions(output).clamp(-1, 1).cpu().numpy()
            actions = self.processor.unnormalize_actions(normalized, unnorm_key).astype(np.float32)
        elif decoding == "parallel" and self.config.binarize_gripper:
            ids, gripper = self._parallel_tokens_and_gripper_mean(inputs)
            normalized = self.processor.action_tokenizer.decode(ids.cpu().numpy()).reshape(len(ids), -1,
                                                                                       self.config.action_dim)
            normalized[..., -1] = gripper.cpu().numpy()
            actions = self.processor.unnormalize_actions(normalized, unnorm_key).astype(np.float32)
        else:
            actions = self.processor.decode_actions(self.predict_action_tokens(inputs, num_actions), unnorm_key)
        if self.config.binarize_gripper:
            # demonstrations open or close the gripper fully; a regressed command in between half-closes
            # it (OpenVLA-OFT's LIBERO evaluation binarizes for the same reason). With parallel tokens the
            # gripper command is the mean of its bin distribution: for 0/1 demonstrations, about p(open).
            open_score = np.clip(actions[..., -1], 0.0, 1.0)
            actions[..., -1] = (actions[..., -1] > self.config.gripper_threshold).astype(np.float32)
        if switch is not None:
            actions[..., -1] = gripper_commands(open_score.reshape(len(actions), -1), gripper_state, switch)
        return actions, done

    @torch.inference_mode()
    def predict_keyframe_states(self, observations: Sequence[Mapping[str, Any]],
                                instructions: Sequence[str] | None = None) -> np.ndarray:
        """(B, proprio_dim) raw states at the next keyframe, as the keyframe head predicts them."""
        if self.keyframe_head is None:
            raise ValueError("this policy has no keyframe head (it was trained with keyframe_loss_weight=0)")
        inputs = self.processor.from_observations(observations, instructions)
        with self._autocast():
            prediction = self._embed(inputs, keyframe=True)[3]
        return self.processor.unnormalize_states(prediction)

    def predict_action_chunk(self, observation: Mapping[str, Any], instruction: str | None = None,
                             **kwargs) -> np.ndarray:
        """(K, 7) float32 un-normalized actions."""
        return self.predict_actions([observation], None if instruction is None else [instruction], **kwargs)[0]

    def predict_action(self, observation: Mapping[str, Any], instruction: str | None = None, **kwargs) -> np.ndarray:
        """(7,) float32 un-normalized action: the first of the predicted chunk."""
        return self.predict_action_chunk(observation, instruction, **kwargs)[0]

    def reset(self) -> None:
        self._actions = ActionChunkQueue.for_config(self.config)

    def select_action(self, observation: Mapping[str, Any], instruction: str | None = None,
                      queue: ActionChunkQueue | None = None) -> np.ndarray:
        """(7,) action, executing the first n_action_steps of each predicted chunk open-loop before predicting
        the next (call reset() per episode). `queue`: another episode's queue (`ActionChunkQueue.for_config`),
        so that one model serves several robots at once; by default the policy's own."""
        queue = self._actions if queue is None else queue
        if queue.needing([0]):
            prompt = queue.prompt_for_state(0, observation.get("instruction") if instruction is None else instruction,
                                            observation.get("state"))
            actions, done = self.predict_actions_and_clause_done([observation], None if prompt is None else [prompt],
                                                                 gripper_state=queue.gripper_state([0]))
            queue.fill(0, actions[0])
            if done is not None:
                queue.clause_done(0, float(done[0]))
        return queue.pop(0)

    # -- checkpoints -----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        """config.json, model.safetensors, the tokenizer and dataset_statistics.json."""
        from peft.tuners.tuners_utils import BaseTunerLayer
        from safetensors.torch import save_model

        if any(isinstance(m, BaseTunerLayer) for m in self.modules()):
            raise RuntimeError("the policy carries LoRA adapters: save the adapter alone with "
                               "PeftModel.save_pretrained, or merge it first (policies.lora.merge_lora)")
        if self.statistics is None:
            raise RuntimeError("the policy has no dataset statistics to save; set them with set_statistics() first")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / CONFIG_NAME).write_text(json.dumps(self.config.to_dict(), indent=2))
        save_model(self, str(directory / WEIGHTS_NAME), metadata={"format": "pt"})
        self.tokenizer.save_pretrained(directory)
        save_dataset_statistics(self.statistics, directory)
        return directory

    @classmethod
    def from_pretrained(cls, path_or_id: str | os.PathLike, device: str | torch.device = "cpu",
                        dtype: torch.dtype | None = None, **overrides) -> "OpenVLAPolicy":
        """Load a checkpoint directory (or hub id) written by save_pretrained; safetensors only."""
        from safetensors.torch import load_model
        from transformers import AutoTokenizer

        directory = resolve_checkpoint(path_or_id)
        values = read_config(directory)
        if values.get("policy_type") != cls.policy_type:
            raise ValueError(f"{directory} holds a {values.get('policy_type')!r} policy, not {cls.policy_type!r}; "
                             "use policies.load_pretrained to load any policy")
        config = VLAConfig.from_dict({**values, **overrides})
        weights = directory / WEIGHTS_NAME
        if not weights.exists():
            pickled = sorted(p.name for p in directory.glob("*.bin")) + sorted(p.name for p in directory.glob("*.pt"))
            note = f" (found {', '.join(pickled)}: pickled weights are never loaded)" if pickled else ""
            raise FileNotFoundError(f"no weights ({WEIGHTS_NAME}) in {directory}{note}")
        if not (directory / STATISTICS_FILENAME).exists():
            raise FileNotFoundError(f"checkpoint {directory} has no {STATISTICS_FILENAME}: without the statistics of "
                                    "its training data its actions cannot be un-normalized")
        statistics = load_dataset_statistics(directory)
        tokenizer = AutoTokenizer.from_pretrained(directory)
        with torch.device(device):
            policy = cls(config, tokenizer, statistics)
        missing, unexpected = load_model(policy, str(weights), strict=False, device=str(device))
        if missing or unexpected:
            raise ValueError(f"weights in {weights} do not match the config: missing {missing[:5]}, "
                             f"unexpected {unexpected[:5]}")
        if dtype is not None:
            policy.to(dtype)
        policy.name_or_path = str(path_or_id)
        return policy.eval()


def _tower_class(tower: Mapping[str, Any]):
    """The transformers class of a vision tower; SigLIP's vision half loads from full SigLIP checkpoints too."""
    import transformers

    classes = {"dinov2_with_registers": "Dinov2WithRegistersModel", "dinov2": "Dinov2Model",
               "siglip_vision_model": "SiglipVisionModel", "siglip": "SiglipVisionModel"}
    model_type = tower["model_config"]["model_type"]
    if model_type not in classes:
        raise ValueError(f"unsupported vision tower type {model_type!r} ({tower['name']}); "
                         f"supported: {', '.join(classes)}")
    return getattr(transformers, classes[model_type])


def _load(loader, name: str, what: str, **kwargs):
    try:
        return loader(name, **kwargs)
    except (OSError, ValueError) as err:
        raise OSError(f"could not load the {what} {name!r}: {err}") from err


def resolve_checkpoint(path_or_id: str | os.PathLike) -> Path:
    """A local checkpoint directory, or a hub id fetched (safetensors and JSON only) into the hub cache."""
    path = Path(path_or_id).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"policy checkpoint {path} is not a directory")
        return path
    text = os.fspath(path_or_id)
    if text.count("/") != 1 or text.startswith((".", "/", "~")):
        raise FileNotFoundError(f"policy checkpoint {text!r} does not exist (not a directory, not a hub id)")
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(text, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt"]))
    except Exception as err:  # network errors, unknown repos, offline mode: all name the id
        raise FileNotFoundError(f"could not find policy {text!r}: not a local directory and not available from "
                                f"the hub ({type(err).__name__}: {err})") from err


def read_config(directory: Path) -> dict[str, Any]:
    path = Path(directory) / CONFIG_NAME
    if not path.exists():
        raise FileNotFoundError(f"no {CONFIG_NAME} in policy checkpoint {directory}")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
