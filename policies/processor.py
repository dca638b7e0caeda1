"""One preprocessing path for training and inference: images, prompt, action tokens, (un)normalization.

`VLAProcessor.__call__` turns a batch of uint8 images, instructions and (optionally) normalized
actions into model inputs. `forward()` calls it on reader batches; `predict_action()` calls
`from_observations()`, which checks raw observations and then calls the very same `__call__`.

Token layout of one sample (left-aligned BOS, prompt padding after it, so that the action
positions line up across the batch):

    [BOS] [PAD ... PAD] [prompt tokens] [action slots]
           ^ attention mask 0

The model inserts the projected image patches right after BOS. Action slots are, by decoding mode:
- "autoregressive", training: the K*7 action token ids then EOS (the stop token);
  inference: none (tokens are generated one at a time);
- "parallel": K*7 placeholders replaced by learned slot embeddings, decoded in one pass.
"""
from __future__ import annotations

import warnings
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from embodied.data.statistics import NormalizationMode, normalize, unnormalize
from policies.action_tokenizer import ActionTokenizer

DECODING_MODES = ("autoregressive", "parallel")


def canonical_quaternions(quat: torch.Tensor) -> torch.Tensor:
    """(B, 4) quaternions with the sign made canonical (largest-magnitude component positive): q and -q
    are the same orientation, and simulators and robots report either."""
    largest = quat.gather(1, quat.abs().argmax(1, keepdim=True))
    return torch.where(largest < 0, -quat, quat)


class VLAProcessor:
    def __init__(self, config, tokenizer, statistics: Mapping[str, Any] | None = None):
        self.config = config
        self.tokenizer = tokenizer
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if getattr(tokenizer, name) is None:
                raise ValueError(f"the tokenizer has no {name[:-9]} token; the policy needs BOS, EOS and PAD")
        self.action_tokenizer = ActionTokenizer(tokenizer.vocab_size, config.n_action_bins)
        self.towers = [(t["name"], int(t["image_size"]), torch.tensor(t["image_mean"]).view(1, 3, 1, 1),
                        torch.tensor(t["image_std"]).view(1, 3, 1, 1)) for t in config.vision_towers]
        self.statistics: dict[str, Any] | None = None
        if statistics is not None:
            self.set_statistics(statistics)
        self._warned_sizes: set[tuple[int, int]] = set()

    # -- statistics ------------------------------------------------------------------------------
    def set_statistics(self, statistics: Mapping[str, Any]) -> None:
        """{dataset name: statistics} as in `dataset_statistics.json`; checks the action dimension."""
        if not statistics:
            raise ValueError("dataset statistics are empty; a policy needs the statistics of its training data")
        for name, entry in statistics.items():
            if "action" not in entry or "q01" not in entry["action"]:
                raise ValueError(f"dataset statistics for {name!r} have no action q01/q99 entry")
            dim = len(entry["action"]["q01"])
            if dim != self.config.action_dim:
                raise ValueError(f"dataset statistics for {name!r} have {dim}-D actions but the policy's "
                                 f"action_dim is {self.config.action_dim}")
            if getattr(self.config, "classify_gripper", False) and entry["action"].get("mask", [True])[-1]:
                # its targets are the raw 0 (closed) / 1 (open), which normalized actions carry only unnormalized
                raise ValueError(f"classify_gripper needs the gripper (last action dim) left unnormalized, but the "
                                 f"statistics of {name!r} normalize it (action mask {entry['action']['mask']})")
            if self.config.use_proprio:
                if "proprio" not in entry or "q01" not in entry["proprio"]:
                    raise ValueError(f"dataset statistics for {name!r} have no proprio q01/q99 entry, which a "
                                     "policy with use_proprio needs to normalize the state")
                if len(entry["proprio"]["q01"]) != self.config.proprio_dim:
                    raise ValueError(f"dataset statistics for {name!r} have {len(entry['proprio']['q01'])}-D states "
                                     f"but the policy's proprio_dim is {self.config.proprio_dim}")
        if self.config.unnorm_key is not None and self.config.unnorm_key not in statistics:
            raise ValueError(f"unnorm_key {self.config.unnorm_key!r} is not in the dataset statistics "
                             f"(have: {', '.join(statistics)})")
        self.statistics = {k: dict(v) for k, v in statistics.items()}

    def action_statistics(self, unnorm_key: str | None = None, part: str = "action") -> Mapping[str, Any]:
        if self.statistics is None:
            raise RuntimeError("the policy has no dataset statistics; set them with set_statistics() "
                               "(or load a checkpoint that carries dataset_statistics.json)")
        key = unnorm_key or self.config.unnorm_key
        if key is None:
            # datasets normalized alike (data.shared_statistics) leave nothing to choose
            if len(self.statistics) > 1 and not _all_same(s[part] for s in self.statistics.values()):
                raise ValueError(f"the policy was trained on several datasets ({', '.join(self.statistics)}); "
                                 "pass unnorm_key= to pick the one whose action statistics to use")
            key = next(iter(self.statistics))
        if key not in self.statistics:
            raise ValueError(f"unnorm_key {key!r} not in the dataset statistics (have: {', '.join(self.statistics)})")
        return self.statistics[key][part]

    def normalize_actions(self, actions: np.ndarray, unnorm_key: str | None = None) -> np.ndarray:
        return normalize(actions, self.action_statistics(unnorm_key), NormalizationMode.parse(self.config.normalization))

    def unnormalize_actions(self, normalized: np.ndarray, unnorm_key: str | None = None) -> np.ndarray:
        return unnormalize(normalized, self.action_statistics(unnorm_key),
                           NormalizationMode.parse(self.config.normalization))

    def decode_actions(self, token_ids: torch.Tensor | np.ndarray, unnorm_key: str | None = None) -> np.ndarray:
        """(B, K*D) action token ids → (B, K, D) float32 un-normalized actions."""
        ids = token_ids.detach().cpu().numpy() if isinstance(token_ids, torch.Tensor) else np.asarray(token_ids)
        normalized = self.action_tokenizer.decode(ids).reshape(len(ids), -1, self.config.action_dim)
        return self.unnormalize_actions(normalized, unnorm_key).astype(np.float32)

    def normalize_states(self, states, unnorm_key: str | None = None) -> torch.Tensor:
        """Raw (B, proprio_dim) states → normalized float32, with each quaternion's sign made canonical.

        q and -q are the same orientation; simulators and robots report either, so the sign is fixed
        (largest-magnitude component positive) before normalizing, for training and inference alike.
        """
        states = np.array(states.detach().cpu().numpy() if isinstance(states, torch.Tensor) else states, dtype=np.float32)
        if states.ndim != 2 or states.shape[1] != self.config.proprio_dim:
            raise ValueError(f"states must be (B, {self.config.proprio_dim}), got shape {states.shape}")
        if not np.isfinite(states).all():
            raise ValueError("states contain NaN or infinite values")
        if self.config.proprio_dim == 8:  # the common layout: position 3, quaternion xyzw 4, gripper 1
            states[:, 3:7] = canonical_quaternions(torch.from_numpy(states[:, 3:7])).numpy()
        stats = self.action_statistics(unnorm_key, part="proprio")
        return torch.from_numpy(normalize(states, stats, NormalizationMode.parse(self.config.normalization))
                                .astype(np.float32))

    def unnormalize_states(self, normalized, unnorm_key: str | None = None) -> np.ndarray:
        """Normalized (B, proprio_dim) → raw float32 states (e.g. the keyframe head's predictions)."""
        normalized = normalized.detach().float().cpu().numpy() if isinstance(normalized, torch.Tensor) else normalized
        stats = self.action_statistics(unnorm_key, part="proprio")
        return unnormalize(np.asarray(normalized), stats, NormalizationMode.parse(self.config.normalization)).astype(np.float32)

    # -- text --------------------------------------------------------------------------------------
    def prompt(self, instruction: str) -> str:
        if not isinstance(instruction, str):
            raise TypeError(f"instruction must be a str, got {type(instruction).__name__}")
        text = instruction.strip().rstrip(".").strip().lower()
        if not text:
            raise ValueError(f"empty instruction {instruction!r}: the policy needs a task description")
        return self.config.prompt.format(instruction=text)

    def _prompt_ids(self, instructions: Sequence[str]) -> list[list[int]]:
        texts = [self.prompt(i) for i in instructions]
        return self.tokenizer(texts, add_special_tokens=False)["input_ids"]

    def prompt_inputs(self, instructions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(input_ids, attention_mask), both (B, 1 + longest prompt): BOS, then each prompt left-padded."""
        prompts = self._prompt_ids(instructions)
        width = max(len(p) for p in prompts)
        pad, bos = self.tokenizer.pad_token_id, self.tokenizer.bos_token_id
        input_ids = torch.full((len(prompts), 1 + width), pad, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), 1 + width), dtype=torch.long)
        input_ids[:, 0], attention_mask[:, 0] = bos, 1
        for row, ids in enumerate(prompts):
            input_ids[row, 1 + width - len(ids):] = torch.tensor(ids, dtype=torch.long)
            attention_mask[row, 1 + width - len(ids):] = 1
        return input_ids, attention_mask

    # -- images ------------------------------------------------------------------------------------
    def _check_images(self, images: torch.Tensor, what: str) -> torch.Tensor:
        """uint8 (B, H, W, 3); another H x W is resized to the training size with a warning."""
        size = int(self.config.observation_image_size)
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[-1] != 3:
            raise ValueError(f"{what} must be uint8 images of shape (H, W, 3) (trained on ({size}, {size}, 3)), "
                             f"got dtype {str(images.dtype).replace('torch.', '')} and shape {tuple(images.shape[1:])}")
        hw = (int(images.shape[1]), int(images.shape[2]))
        if hw != (size, size):
            if hw not in self._warned_sizes:
                self._warned_sizes.add(hw)
                warnings.warn(f"{what} is {hw[0]}x{hw[1]}, the policy was trained on {size}x{size} images; "
                              "resizing", stacklevel=3)
            resized = F.interpolate(images.permute(0, 3, 1, 2).float(), size=(size, size), mode="bilinear",
                                    antialias=True, align_corners=False)
            images = resized.round().clamp(0, 255).to(torch.uint8).permute(0, 2, 3, 1)
        return images

    def pixel_values(self, images: torch.Tensor, device=None) -> dict[str, torch.Tensor]:
        """uint8 (B, H, W, 3) → per tower float (B, 3, S, S): naive resize to the tower's size, its mean/std."""
        x = images.to(device).permute(0, 3, 1, 2).float() / 255.0
        out = {}
        for name, size, mean, std in self.towers:
            y = x if tuple(x.shape[-2:]) == (size, size) else F.interpolate(
                x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
            out[name] = (y - mean.to(y.device)) / std.to(y.device)
        return out

    # -- the one entry point -------------------------------------------------------------------------
    def __call__(self, images, instructions: Sequence[str], actions=None, action_mask=None, states=None,
                 decoding: str | None = None, chunk: int | None = None, device=None,
                 wrist_images=None) -> dict[str, Any]:
        """Model inputs. `actions` are normalized (B, D) or (B, K, D), as the data reader yields them;
        `states` raw (B, proprio_dim), required by a policy with `use_proprio`, and `wrist_images` uint8
        (B, H, W, 3), required by one with `wrist_image` (each ignored otherwise)."""
        decoding = decoding or self.config.decoding
        if decoding not in DECODING_MODES:
            raise ValueError(f"unknown decoding {decoding!r}; valid: {', '.join(DECODING_MODES)}")
        images = torch.as_tensor(images)
        if images.ndim == 3:
            images = images[None]
        if isinstance(instructions, str):
            instructions = [instructions]
        instructions = list(instructions)
        if len(instructions) != len(images):
            raise ValueError(f"{len(images)} images but {len(instructions)} instructions")
        images = self._check_images(images, "image")
        dim = self.config.action_dim
        target_ids = target_weights = None
        if actions is not None:
            actions = torch.as_tensor(actions, dtype=torch.float32)
            if actions.ndim == 2:
                actions = actions[:, None]
            if actions.ndim != 3 or actions.shape[-1] != dim or len(actions) != len(images):
                raise ValueError(f"actions must be (B, {dim}) or (B, K, {dim}) for B={len(images)}, "
                                 f"got {tuple(actions.shape)}")
            chunk = actions.shape[1]
            weights = torch.ones(actions.shape[:2]) if action_mask is None else torch.as_tensor(action_mask).float()
            target_ids = self.action_tokenizer.encode(actions).reshape(len(actions), -1)
            target_weights = weights.repeat_interleave(dim, dim=1)
        chunk = int(chunk or self.config.action_chunk)
        n_slots = chunk * dim

        if decoding == "autoregressive" and target_ids is not None:
            eos = torch.full((len(images), 1), self.tokenizer.eos_token_id, dtype=torch.long)
            slots = torch.cat([target_ids, eos], dim=1)
            target_ids, target_weights = slots, torch.cat([target_weights, torch.ones(len(images), 1)], dim=1)
        elif decoding == "parallel":
            slots = torch.full((len(images), n_slots), self.tokenizer.pad_token_id, dtype=torch.long)
        else:
            slots = torch.zeros((len(images), 0), dtype=torch.long)
        input_ids, attention_mask = self.prompt_inputs(instructions)
        input_ids = torch.cat([input_ids, slots], dim=1)
        attention_mask = torch.cat([attention_mask, torch.ones_like(slots)], dim=1)
        out = {"pixel_values": self.pixel_values(images, device), "input_ids": input_ids.to(device),
               "attention_mask": attention_mask.to(device), "decoding": decoding, "chunk": chunk,
               "n_slots": slots.shape[1]}
        if self.config.wrist_image:
            if wrist_images is None:
                raise ValueError("this policy reads the wrist camera (wrist_image): pass wrist images (B, H, W, 3) "
                                 "with the images")
            wrist_images = torch.as_tensor(wrist_images)
            if wrist_images.ndim == 3:
                wrist_images = wrist_images[None]
            if len(wrist_images) != len(images):
                raise ValueError(f"{len(images)} images but {len(wrist_images)} wrist images")
            out["wrist_pixel_values"] = self.pixel_values(self._check_images(wrist_images, "wrist_image"), device)
        if self.config.use_proprio:
            if states is None:
                raise ValueError("this policy uses proprioception (use_proprio): pass the robot state "
                                 f"(B, {self.config.proprio_dim}) with the images")
            if len(states) != len(images):
                raise ValueError(f"{len(images)} images but {len(states)} states")
            out["proprio"] = self.normalize_states(states).to(device)
            out["state"] = torch.as_tensor(states, dtype=torch.float32).to(device)  # raw, for named objects
        if target_ids is not None:
            out["target_ids"] = target_ids.to(device)
            out["target_weights"] = target_weights.to(device)
            out["actions"] = actions.to(device)  # normalized (B, K, D): the L1 head's targets
        return out

    def from_observations(self, observations: Sequence[Mapping[str, Any]], instructions: Sequence[str] | None = None,
                          **kwargs) -> dict[str, Any]:
        """Raw observations (dicts with a uint8 (H, W, 3) `image`) → the same inputs as training."""
        if isinstance(observations, Mapping):
            observations = [observations]
        if instructions is None:
            instructions = [obs.get("instruction") for obs in observations]
        elif isinstance(instructions, str):
            instructions = [instructions]
        images = self._observation_images(observations, "image")
        wrist_images = self._observation_images(observations, "wrist_image") if self.config.wrist_image else None
        for i, text in enumerate(instructions):
            if text is None:
                raise ValueError(f"no instruction for observation {i}: pass instruction= or set obs['instruction']")
        states = None
        if self.config.use_proprio:
            missing = [i for i, obs in enumerate(observations) if obs.get("state") is None]
            if missing:
                raise KeyError(f"observation {missing[0]} has no 'state' key, which this policy (use_proprio) "
                               f"needs (keys: {', '.join(observations[missing[0]])})")
            states = np.stack([np.asarray(obs["state"], dtype=np.float32).reshape(-1) for obs in observations])
        return self(images, list(instructions), states=states, wrist_images=wrist_images, **kwargs)

    def _observation_images(self, observations: Sequence[Mapping[str, Any]], key: str) -> torch.Tensor:
        """uint8 (B, size, size, 3) from each observation's `key`, checked (and resized, with a warning)."""
        images, size = [], int(self.config.observation_image_size)
        for i, obs in enumerate(observations):
            if key not in obs:
                why = (" (this policy reads the wrist camera; in simulation, run the env with wrist_camera=true)"
                       if key == "wrist_image" else "")
                raise KeyError(f"observation {i} has no {key!r} key{why} (keys: {', '.join(obs)})")
            image = np.asarray(obs[key])
            if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
                raise ValueError(f"observation[{key!r}] must be uint8 of shape (H, W, 3) (trained on "
                                 f"({size}, {size}, 3)), got dtype {image.dtype} and shape {image.shape}")
            images.append(self._check_images(torch.from_numpy(np.ascontiguousarray(image))[None],
                                             f"observation[{key!r}]")[0])
        return torch.stack(images)


def _all_same(entries) -> bool:
    first, *others = list(entries)
    return all(other.keys() == first.keys() and all(np.array_equal(np.asarray(other[k]), np.asarray(first[k]))
                                                    for k in first) for other in others)
