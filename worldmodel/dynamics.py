"""Action-conditioned dynamics: a spatial-temporal (ST) transformer over frame tokens.

Each block attends within a frame (spatial, bidirectional over the token grid), then across
time at the same grid position (temporal, causal), then applies an MLP, as in Genie's
ST-transformer. The robot's 7-D action a_{t-1} (normalized) is added to every token embedding
of frame t; frame 0 gets a learned "no action" embedding.

With `state_dim > 0` the model imagines the robot's proprioceptive state too (the observation's
`state`: TCP pose and gripper opening, normalized). State comes first: s_t is predicted from
s_{t-1}, a_{t-1} and the model's pooled summary of frame t-1 (which sees what the gripper holds),
and frame t's tokens are then decoded conditioned on s_t as well as a_{t-1}. The absolute pose
tells the model where to draw the arm, which the per-step deltas alone leave it to infer from
tokens; in training s_t is the recorded state (teacher forcing) and the state head is trained by
regression on it.

Training follows Emu3.5's DiDA layout: the clip is processed twice, once clean and once with
each target frame's tokens partly replaced by [MASK] (absorbing-state noise). The noisy copy of
frame t attends temporally to the *clean* frames < t and to itself, so training sees exactly
what decoding sees (a clean, cached past). The mask rate is drawn per frame: most frames get a
random subset masked at rate cos(π/2·u), u ~ U(0, 1) (MaskGIT); the rest get a raster-order
suffix masked, which is what token-by-token decoding presents. One set of weights therefore
decodes both ways:

* `decode="maskgit"` (discrete diffusion): K parallel refinement steps per frame, cosine
  schedule, confidence = log p(sampled) + temperature·(1 − r)·Gumbel, lowest-confidence tokens
  re-masked, last step argmax (MaskGIT / Genie).
* `decode="autoregressive"`: raster order, one token per forward pass, N = grid² passes per
  frame. It is the any-order-autoregressive reading of a masked model (MDLM); because attention
  within a frame is bidirectional, the "KV cache" is the past frames' temporal keys/values,
  computed once per frame and reused by every token step (and by MaskGIT steps alike).

Rollouts longer than `max_frames` use a sliding window: the oldest frames are dropped and the
cache of the remaining window is recomputed with positions 0..W-1 (see `Rollout`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from worldmodel.pretrained import PretrainedMixin, check_tokenizer_fingerprint

ACTION_DIM = 7


@dataclass
class DynamicsConfig:
    codebook_size: int = 1000  # must match the tokenizer
    grid: int = 16  # tokens per side; must match the tokenizer
    tokenizer_image_size: int = 64  # recorded so a checkpoint can refuse a mismatched tokenizer
    tokenizer_levels: tuple[int, ...] = (8, 5, 5, 5)
    max_frames: int = 8  # temporal context (frames) the model was trained on
    action_dim: int = ACTION_DIM
    dim: int = 192
    depth: int = 4
    heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    raster_mask_prob: float = 0.25  # fraction of frames trained with a raster-suffix mask
    changed_token_weight: float = 4.0  # loss weight of tokens that differ from the previous frame's
    state_dim: int = 0  # > 0: imagine the robot state too (8: TCP position, quaternion, gripper)
    state_loss_weight: float = 1.0  # weight of the state regression (MSE, normalized units) in the loss

    def __post_init__(self):
        self.tokenizer_levels = tuple(int(x) for x in self.tokenizer_levels)
        if self.dim % self.heads:
            raise ValueError(f"dynamics dim {self.dim} must be divisible by heads {self.heads}")
        if self.max_frames < 2:
            raise ValueError(f"dynamics max_frames must be >= 2 (context + prediction), got {self.max_frames}")

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def mask_id(self) -> int:
        return self.codebook_size


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def project(self, x: torch.Tensor):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        shape = (*x.shape[:-1], self.heads, -1)
        return (t.reshape(shape).transpose(-2, -3) for t in (q, k, v))  # (..., heads, L, dh)

    def attend(self, q, k, v, mask=None) -> torch.Tensor:
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        y = y.transpose(-2, -3)
        return self.out(y.reshape(*y.shape[:-2], -1))


class STBlock(nn.Module):
    def __init__(self, cfg: DynamicsConfig):
        super().__init__()
        self.norm_s, self.spatial = nn.LayerNorm(cfg.dim), Attention(cfg.dim, cfg.heads)
        self.norm_t, self.temporal = nn.LayerNorm(cfg.dim), Attention(cfg.dim, cfg.heads)
        self.norm_m = nn.LayerNorm(cfg.dim)
        hidden = int(cfg.dim * cfg.mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(cfg.dim, hidden), nn.GELU(), nn.Linear(hidden, cfg.dim),
                                 nn.Dropout(cfg.dropout))

    def spatial_mix(self, x: torch.Tensor) -> torch.Tensor:
        """x (..., N, D): bidirectional attention over the token grid of each frame."""
        q, k, v = self.spatial.project(self.norm_s(x))
        return x + self.spatial.attend(q, k, v)

    def temporal_kv(self, x: torch.Tensor):
        """Keys/values of frames x (B, T, N, D) as (B, N, heads, T, dh): what later frames attend to."""
        _, k, v = self.temporal.project(self.norm_t(x).transpose(1, 2))
        return k, v

    def forward_train(self, clean: torch.Tensor, noisy: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Both streams (B, T, N, D); noisy t attends clean < t and noisy t; clean t attends clean <= t."""
        B, T, N, D = clean.shape
        both = self.spatial_mix(torch.cat([clean, noisy], 0))
        seq = self.norm_t(both).reshape(2, B, T, N, D).permute(1, 3, 0, 2, 4).reshape(B, N, 2 * T, D)
        q, k, v = self.temporal.project(seq)  # (B, N, heads, 2T, dh)
        y = self.temporal.attend(q, k, v, mask=_dida_mask(T, clean.device))  # (B, N, 2T, D)
        y = y.reshape(B, N, 2, T, D).permute(2, 0, 3, 1, 4).reshape(2 * B, T, N, D)
        both = both + y
        both = both + self.mlp(self.norm_m(both))
        return both[:B], both[B:]

    def forward_step(self, x: torch.Tensor, cache: tuple[torch.Tensor, torch.Tensor] | None):
        """One frame x (B, N, D) attending to cached past keys/values; returns (out, own k, own v)."""
        x = self.spatial_mix(x)
        q, k, v = self.temporal.project(self.norm_t(x).unsqueeze(2))  # (B, N, heads, 1, dh)
        if cache is not None:
            keys, values = torch.cat([cache[0], k], -2), torch.cat([cache[1], v], -2)
        else:
            keys, values = k, v
        x = x + self.temporal.attend(q, keys, values).squeeze(2)
        x = x + self.mlp(self.norm_m(x))
        return x, k, v


def _dida_mask(T: int, device) -> torch.Tensor:
    """(2T, 2T) boolean: rows/cols 0..T-1 clean frames, T..2T-1 noisy frames; True = may attend."""
    t = torch.arange(T, device=device)
    clean_clean = t[:, None] >= t[None, :]
    noisy_clean = t[:, None] > t[None, :]
    noisy_noisy = t[:, None] == t[None, :]
    top = torch.cat([clean_clean, torch.zeros_like(clean_clean)], 1)
    bottom = torch.cat([noisy_clean, noisy_noisy], 1)
    return torch.cat([top, bottom], 0)


def cosine_mask_ratio(r: torch.Tensor | float):
    """Fraction of tokens still masked at progress r in [0, 1] (MaskGIT's cosine schedule)."""
    return torch.cos(torch.as_tensor(r) * math.pi / 2)


class DynamicsModel(PretrainedMixin, nn.Module):
    config_class = DynamicsConfig
    model_type = "embodied-st-dynamics"

    def __init__(self, config: DynamicsConfig | None = None):
        super().__init__()
        self.config = cfg = config or DynamicsConfig()
        self.token_embed = nn.Embedding(cfg.codebook_size + 1, cfg.dim)  # + [MASK]
        self.spatial_pos = nn.Parameter(torch.randn(cfg.num_tokens, cfg.dim) * 0.02)
        self.temporal_pos = nn.Parameter(torch.randn(cfg.max_frames, cfg.dim) * 0.02)
        self.action_proj = nn.Sequential(nn.Linear(cfg.action_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
        self.no_action = nn.Parameter(torch.zeros(cfg.dim))
        if cfg.state_dim:
            self.state_proj = nn.Sequential(nn.Linear(cfg.state_dim, cfg.dim), nn.SiLU(), nn.Linear(cfg.dim, cfg.dim))
            self.state_head = nn.Sequential(nn.Linear(cfg.dim + cfg.state_dim + cfg.action_dim, cfg.dim), nn.SiLU(),
                                            nn.Linear(cfg.dim, cfg.state_dim))
        self.blocks = nn.ModuleList(STBlock(cfg) for _ in range(cfg.depth))
        self.norm = nn.LayerNorm(cfg.dim)
        self.head = nn.Linear(cfg.dim, cfg.codebook_size)  # the [MASK] id is never predicted

    @property
    def device(self) -> torch.device:
        return self.head.weight.device

    # -- checks ------------------------------------------------------------------------------
    def check_tokenizer(self, fingerprint: dict, source: str = "tokenizer") -> None:
        check_tokenizer_fingerprint(self.config, fingerprint, source, "dynamics model", "dynamics")

    def check_actions(self, actions: torch.Tensor) -> None:
        if actions.shape[-1] != self.config.action_dim:
            raise ValueError(f"action must have dimension {self.config.action_dim} "
                             f"([dx, dy, dz, droll, dpitch, dyaw, gripper]); got shape {tuple(actions.shape)}")

    def check_states(self, states: torch.Tensor | None) -> None:
        dim = self.config.state_dim
        if not dim:
            if states is not None:
                raise ValueError("this dynamics model was trained without robot states (state_dim=0); pass none")
            return
        if states is None:
            raise ValueError(f"this dynamics model imagines the robot state (state_dim={dim}): give the context "
                             "frames' states")
        if states.shape[-1] != dim:
            raise ValueError(f"state must have dimension {dim}; got shape {tuple(states.shape)}")

    # -- embeddings --------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor, actions_in: torch.Tensor | None, frame_index: torch.Tensor | int,
              states_in: torch.Tensor | None = None):
        """tokens (B, T, N) + conditioning action per frame (B, T, A) or None (no action), and the frame's
        state (B, T, S) when the model uses states → (B, T, N, D)."""
        x = self.token_embed(tokens) + self.spatial_pos
        x = x + self.temporal_pos[frame_index].unsqueeze(-2)
        if actions_in is None:
            cond = self.no_action.expand(tokens.shape[0], tokens.shape[1], -1)
        else:
            cond = self.action_proj(actions_in)
        if self.config.state_dim:
            cond = cond + self.state_proj(states_in)
        return x + cond.unsqueeze(-2)

    def _conditioning(self, actions: torch.Tensor, T: int, states: torch.Tensor | None = None) -> torch.Tensor:
        """Frame t is conditioned on a_{t-1} (frame 0 on the learned no-action embedding) and on s_t."""
        B = actions.shape[0]
        cond = self.action_proj(actions[:, : T - 1])
        cond = torch.cat([self.no_action.expand(B, 1, -1), cond], 1)
        if self.config.state_dim:
            cond = cond + self.state_proj(states[:, :T])
        return cond

    def predict_state(self, summary: torch.Tensor, state: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """s_t from frame t-1's pooled output (B, D), s_{t-1} (B, S) and a_{t-1} (B, A): a residual step."""
        return state + self.state_head(torch.cat([summary, state, action], -1))

    # -- training ----------------------------------------------------------------------------
    def sample_mask(self, B: int, T: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """(B, T, N) bool: which tokens of each frame are masked; frame 0 (the context) never."""
        N, dev = self.config.num_tokens, self.device
        u = torch.rand(B, T, 1, generator=generator, device=dev)
        ratio = cosine_mask_ratio(u).clamp(min=1.0 / N)
        random_mask = torch.rand(B, T, N, generator=generator, device=dev).argsort(-1).argsort(-1) < (ratio * N).ceil()
        start = torch.randint(0, N, (B, T, 1), generator=generator, device=dev)
        raster_mask = torch.arange(N, device=dev) >= start
        use_raster = torch.rand(B, T, 1, generator=generator, device=dev) < self.config.raster_mask_prob
        mask = torch.where(use_raster, raster_mask, random_mask)
        mask[:, 0] = False
        return mask

    def forward(self, tokens: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor,
                states: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits (B, T, N, V) for the noisy stream, and (with states) the predicted states of frames
        1..T-1 (B, T-1, S); tokens (B, T, N), actions (B, T, A) or (B, T-1, A), states (B, T, S)."""
        B, T, N = tokens.shape
        if T > self.config.max_frames:
            raise ValueError(f"clip of {T} frames is longer than the model's context max_frames="
                             f"{self.config.max_frames}")
        self.check_actions(actions)
        self.check_states(states)
        frame = torch.arange(T, device=tokens.device)
        cond = self._conditioning(actions, T, states).unsqueeze(-2)
        base = self.spatial_pos + self.temporal_pos[frame].unsqueeze(-2) + cond
        clean = self.token_embed(tokens) + base
        noisy = self.token_embed(torch.where(mask, self.config.mask_id, tokens)) + base
        for block in self.blocks:
            clean, noisy = block.forward_train(clean, noisy)
        predicted_states = None
        if self.config.state_dim:
            summary = self.norm(clean).mean(-2)  # (B, T, D)
            predicted_states = self.predict_state(summary[:, :-1], states[:, :-1], actions[:, : T - 1])
        return self.head(self.norm(noisy)), predicted_states

    def loss(self, tokens: torch.Tensor, actions: torch.Tensor, generator: torch.Generator | None = None,
             states: torch.Tensor | None = None):
        B, T, N = tokens.shape
        mask = self.sample_mask(B, T, generator)
        logits, predicted_states = self(tokens, actions, mask, states)
        # most tokens just persist from the previous frame; weighting the ones that change keeps the
        # model from settling on "copy the last frame" before it learns what the actions do
        changed = torch.zeros_like(mask)
        changed[:, 1:] = tokens[:, 1:] != tokens[:, :-1]
        weight = 1 + (self.config.changed_token_weight - 1) * changed[mask].float()
        loss = (F.cross_entropy(logits[mask], tokens[mask], reduction="none") * weight).sum() / weight.sum()
        with torch.no_grad():
            acc = (logits[mask].argmax(-1) == tokens[mask]).float().mean().item()
        metrics = {"token_loss": loss.item(), "masked_token_accuracy": acc}
        if predicted_states is not None:
            state_loss = F.mse_loss(predicted_states, states[:, 1:])
            loss = loss + self.config.state_loss_weight * state_loss
            metrics["state_mse"] = state_loss.item()
        return loss, {"loss": loss.item(), **metrics}

    # -- inference -----------------------------------------------------------------------------
    def frame_forward(self, tokens: torch.Tensor, action: torch.Tensor | None, position: int,
                      cache: list | None, state: torch.Tensor | None = None) -> tuple[torch.Tensor, list, torch.Tensor]:
        """One frame (B, N) at temporal `position` (with its state (B, S) when the model uses states) →
        (logits (B, N, V), its per-layer temporal k/v, its pooled output (B, D): what predicts the next state)."""
        x = self.embed(tokens.unsqueeze(1), None if action is None else action.unsqueeze(1), position,
                       None if state is None else state.unsqueeze(1))[:, 0]
        kvs = []
        for i, block in enumerate(self.blocks):
            x, k, v = block.forward_step(x, None if cache is None else cache[i])
            kvs.append((k, v))
        x = self.norm(x)
        return self.head(x), kvs, x.mean(-2)

    @staticmethod
    def extend_cache(cache: list | None, kvs: list) -> list:
        if cache is None:
            return [(k, v) for k, v in kvs]
        return [(torch.cat([ck, k], -2), torch.cat([cv, v], -2)) for (ck, cv), (k, v) in zip(cache, kvs)]

    @torch.no_grad()
    def encode_context(self, tokens: torch.Tensor, actions: torch.Tensor | None, states: torch.Tensor | None = None
                       ) -> tuple[list | None, torch.Tensor]:
        """Cache (per layer temporal k/v) of clean context frames tokens (B, T, N), actions (B, T-1, A),
        states (B, T, S), and the last frame's pooled output."""
        self.check_states(states)
        cache, summary = None, None
        for t in range(tokens.shape[1]):
            action = None if t == 0 else actions[:, t - 1]
            _, kvs, summary = self.frame_forward(tokens[:, t], action, t, cache,
                                                 None if states is None else states[:, t])
            cache = self.extend_cache(cache, kvs)
        return cache, summary

    @torch.no_grad()
    def decode_frame(self, cache: list, action: torch.Tensor, position: int, method: str = "maskgit",
                     steps: int = 8, temperature: float = 1.0, sample_temperature: float = 0.0,
                     generator: torch.Generator | None = None, state: torch.Tensor | None = None) -> torch.Tensor:
        """The next frame's tokens (B, N) given the clean past (cache), the action a_{t-1} (B, A) and, when
        the model uses states, the frame's (imagined) state s_t (B, S)."""
        self.check_actions(action)
        self.check_states(state)
        if method == "maskgit":
            return self._decode_maskgit(cache, action, position, steps, temperature, sample_temperature, generator,
                                        state)
        if method in ("autoregressive", "ar"):
            return self._decode_raster(cache, action, position, sample_temperature, generator, state)
        raise ValueError(f"unknown decoding method {method!r}; valid: 'maskgit', 'autoregressive'")

    def _sample(self, logits, sample_temperature, generator):
        if sample_temperature <= 0:
            return logits.argmax(-1)
        probs = torch.softmax(logits / sample_temperature, -1)
        return torch.multinomial(probs.reshape(-1, probs.shape[-1]), 1, generator=generator).reshape(probs.shape[:-1])

    def _decode_maskgit(self, cache, action, position, steps, temperature, sample_temperature, generator, state):
        if steps < 1:
            raise ValueError(f"maskgit steps must be >= 1, got {steps}")
        B, N = action.shape[0], self.config.num_tokens
        tokens = torch.full((B, N), self.config.mask_id, dtype=torch.long, device=self.device)
        masked = torch.ones(B, N, dtype=torch.bool, device=self.device)
        for step in range(steps):
            logits, _, _ = self.frame_forward(tokens, action, position, cache, state)
            logp = torch.log_softmax(logits.float(), -1)
            last = step == steps - 1
            sampled = logits.argmax(-1) if last else self._sample(logits, sample_temperature, generator)
            tokens = torch.where(masked, sampled, tokens)
            if last:
                break
            r = (step + 1) / steps
            remask = int(math.floor(N * float(cosine_mask_ratio(r))))
            if remask <= 0:
                break
            confidence = logp.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
            if temperature > 0:
                uniform = torch.rand(B, N, generator=generator, device=self.device).clamp(1e-20, 1 - 1e-7)
                confidence = confidence + temperature * (1 - r) * -torch.log(-torch.log(uniform))
            confidence = confidence.masked_fill(~masked, float("inf"))  # decided tokens stay
            lowest = confidence.topk(remask, dim=-1, largest=False).indices
            masked = torch.zeros_like(masked).scatter(-1, lowest, True)
            tokens = tokens.masked_fill(masked, self.config.mask_id)
        return tokens

    def _decode_raster(self, cache, action, position, sample_temperature, generator, state):
        B, N = action.shape[0], self.config.num_tokens
        tokens = torch.full((B, N), self.config.mask_id, dtype=torch.long, device=self.device)
        for i in range(N):
            logits, _, _ = self.frame_forward(tokens, action, position, cache, state)
            tokens[:, i] = self._sample(logits[:, i], sample_temperature, generator)
        return tokens


class Rollout:
    """Imagined frames one action at a time, with the past cached and a sliding context window.

    The model was trained on clips of at most `max_frames` frames. When the history would exceed
    max_frames - 1 frames, only the newest max_frames // 2 frames are kept and their cache is
    recomputed with temporal positions 0..W-1 (the first kept frame gets the "no action"
    embedding, as a clip's first frame does in training). Every prediction thus sees between
    max_frames // 2 and max_frames - 1 past frames, and the rebuild costs one frame forward per
    step on average.

    A model with `state_dim > 0` needs the context frames' (normalized) states and imagines one
    state per step, before the frame (`states[-1]` after `step`).
    """

    def __init__(self, model: DynamicsModel, context_tokens: torch.Tensor, context_actions: torch.Tensor | None = None,
                 method: str = "maskgit", steps: int = 8, temperature: float = 1.0, sample_temperature: float = 0.0,
                 generator: torch.Generator | None = None, context_states: torch.Tensor | None = None):
        self.model, self.method, self.steps = model, method, steps
        self.temperature, self.sample_temperature, self.generator = temperature, sample_temperature, generator
        tokens = context_tokens.to(model.device).reshape(context_tokens.shape[0], -1, model.config.num_tokens)
        B, T = tokens.shape[:2]
        if context_states is not None:
            context_states = context_states.to(model.device, torch.float32).reshape(B, T, -1)
        model.check_states(context_states)
        if context_actions is None:
            context_actions = torch.zeros(B, max(T - 1, 0), model.config.action_dim, device=model.device)
        self.frames = [tokens[:, t] for t in range(T)]
        self.actions = [context_actions[:, t].to(model.device) for t in range(T - 1)]
        self.states = [] if context_states is None else [context_states[:, t] for t in range(T)]
        self._trim()
        self.cache, self.summary = self._encode()

    def _trim(self) -> bool:
        limit = self.model.config.max_frames - 1  # room for the frame being predicted
        if len(self.frames) <= limit:
            return False
        # keep the newest half of the window: the cache is rebuilt once per max_frames/2 steps
        keep = max(1, self.model.config.max_frames // 2)
        self.frames = self.frames[len(self.frames) - keep:]
        self.actions = self.actions[len(self.actions) - (keep - 1):]  # actions between kept frames
        if self.states:
            self.states = self.states[len(self.states) - keep:]
        return True

    def _encode(self):
        tokens = torch.stack(self.frames, 1)
        actions = torch.stack(self.actions, 1) if self.actions else None
        states = torch.stack(self.states, 1) if self.states else None
        return self.model.encode_context(tokens, actions, states)

    @torch.no_grad()
    def step(self, action: torch.Tensor) -> torch.Tensor:
        """Append the imagined frame after `action` (B, A); returns its tokens (B, N)."""
        action = action.to(self.model.device, torch.float32)
        self.model.check_actions(action)
        position = len(self.frames)
        state = None
        if self.states:
            state = self.model.predict_state(self.summary, self.states[-1], action)
        tokens = self.model.decode_frame(self.cache, action, position, self.method, self.steps, self.temperature,
                                         self.sample_temperature, self.generator, state)
        self.frames.append(tokens)
        self.actions.append(action)
        if state is not None:
            self.states.append(state)
        if self._trim():
            self.cache, self.summary = self._encode()
        else:
            _, kvs, self.summary = self.model.frame_forward(tokens, action, position, self.cache, state)
            self.cache = self.model.extend_cache(self.cache, kvs)
        return tokens
