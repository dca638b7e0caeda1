"""Latent action model (LAM): Genie's controllable actions, learned from video without action labels.

An encoder sees the token grids of frames t and t+1 and emits one latent action, quantized to a
codebook of `n_latent_actions` (8, as in Genie); a decoder must predict frame t+1's tokens from
frame t's tokens plus that latent action. The latent is a 3-bit bottleneck, so what it can carry
is what changed, not what the next frame looks like: the part of the change that an agent
controls, if that is what best explains the change.

Both sides work on the frame tokenizer's token grids (like the dynamics model), so the LAM is
tied to a tokenizer (`check_tokenizer`). The encoder embeds both frames' tokens (plus a channel
marking the tokens that changed), mixes them with residual convolutions and pools them (mean and
max: a moving arm changes a few tokens, which a plain mean would dilute) to one vector. That
vector is quantized to the nearest code by cosine similarity (l2-normalized codes, as in
improved VQGAN), with a straight-through estimator, a codebook loss and a commitment loss.
Codes the encoder stops choosing (running usage below `dead_code_threshold` of the uniform
share) are re-initialized from encoder outputs of the current batch, so more than one code stays
in use. The decoder embeds frame t's tokens, adds a projection of the code vector before every
residual block, and predicts frame t+1's tokens; a learned bonus on the logit of each token's
current id makes "copy" the default, and the cross-entropy weights the tokens that change by
`changed_token_weight`, as the dynamics loss does, so the decoder cannot settle on copying.

    lam = LatentActionModel(LatentActionConfig(codebook_size=125, grid=8, ...))
    loss, metrics = lam.loss(tokens)                 # tokens (B, T, g, g), T >= 2
    ids = lam.infer_latent_actions(tokens)           # (B, T-1) int64 in [0, n_latent_actions)
    next_tokens = lam.predict_next(tokens[:, 0], ids[:, 0])   # (B, g, g), argmax
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from worldmodel.pretrained import PretrainedMixin, check_tokenizer_fingerprint
from worldmodel.tokenizer import ResBlock


@dataclass
class LatentActionConfig:
    codebook_size: int = 1000  # the tokenizer's; must match it
    grid: int = 16  # tokens per side; must match the tokenizer
    tokenizer_image_size: int = 64  # recorded so a checkpoint can refuse a mismatched tokenizer
    tokenizer_levels: tuple[int, ...] = (8, 5, 5, 5)
    n_latent_actions: int = 8  # codebook of latent actions (Genie: 8)
    latent_dim: int = 16  # width of a latent action's code vector
    embed_dim: int = 32  # token embedding width
    channels: int = 64  # convolution width (a multiple of 8: GroupNorm)
    encoder_blocks: int = 2
    decoder_blocks: int = 2
    # the decoder's convolutions after its first 3×3 one: 3 (each block widens its view by 4 tokens) or 1
    # (it sees only the 3×3 tokens around each one). A decoder that sees the whole frame can learn where a
    # scripted expert goes next from the frame alone, without the latent; a local one cannot, so the latent
    # would have to say how things move (on the sim demonstrations it did not help: benchmarks/RESULTS.md)
    decoder_kernel: int = 3
    decoder_position: bool = True  # whether the decoder's token embeddings carry their grid position
    commitment_weight: float = 0.25
    changed_token_weight: float = 4.0  # loss weight of tokens that differ from frame t's
    dead_code_threshold: float = 0.1  # a code whose running usage is below this share of 1/n is restarted
    usage_decay: float = 0.95  # decay of the running per-code usage (per training batch)

    def __post_init__(self):
        self.tokenizer_levels = tuple(int(x) for x in self.tokenizer_levels)
        if self.n_latent_actions < 2:
            raise ValueError(f"latent_actions n_latent_actions must be >= 2, got {self.n_latent_actions}")
        if self.channels % 8:
            raise ValueError(f"latent_actions channels must be a multiple of 8 (GroupNorm), got {self.channels}")
        if self.decoder_kernel not in (1, 3):
            raise ValueError(f"latent_actions decoder_kernel must be 1 or 3, got {self.decoder_kernel}")
        if not 0.0 <= self.usage_decay < 1.0:
            raise ValueError(f"latent_actions usage_decay must be in [0, 1), got {self.usage_decay}")

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid


class LatentActionModel(PretrainedMixin, nn.Module):
    config_class = LatentActionConfig
    model_type = "embodied-latent-actions"

    def __init__(self, config: LatentActionConfig | None = None):
        super().__init__()
        self.config = cfg = config or LatentActionConfig()
        c, e = cfg.channels, cfg.embed_dim
        self.token_embed = nn.Embedding(cfg.codebook_size, e)
        self.pos = nn.Parameter(torch.randn(e, cfg.grid, cfg.grid) * 0.02)
        # encoder: frame t, frame t+1 and which tokens changed → one vector
        self.encoder = nn.Sequential(nn.Conv2d(2 * e + 1, c, 3, padding=1),
                                     *[ResBlock(c) for _ in range(cfg.encoder_blocks)],
                                     nn.GroupNorm(8, c), nn.SiLU())
        self.to_latent = nn.Sequential(nn.Linear(2 * c, c), nn.SiLU(), nn.Linear(c, cfg.latent_dim))
        self.codebook = nn.Parameter(torch.randn(cfg.n_latent_actions, cfg.latent_dim))
        self.register_buffer("usage", torch.full((cfg.n_latent_actions,), 1.0 / cfg.n_latent_actions))
        # decoder: frame t + the latent action → frame t+1's token logits
        self.decoder_in = nn.Conv2d(e, c, 3, padding=1)
        self.action_in = nn.ModuleList(nn.Linear(cfg.latent_dim, c) for _ in range(cfg.decoder_blocks))
        self.decoder_blocks = nn.ModuleList(ResBlock(c, cfg.decoder_kernel) for _ in range(cfg.decoder_blocks))
        self.head = nn.Sequential(nn.GroupNorm(8, c), nn.SiLU(), nn.Conv2d(c, cfg.codebook_size, 1))
        self.copy_logit = nn.Parameter(torch.tensor(2.0))

    @property
    def device(self) -> torch.device:
        return self.codebook.device

    # -- checks ------------------------------------------------------------------------------
    def check_tokenizer(self, fingerprint: dict, source: str = "tokenizer") -> None:
        check_tokenizer_fingerprint(self.config, fingerprint, source, "latent action model", "latent action model")

    def _grids(self, tokens, name: str = "tokens", clip: bool = True) -> torch.Tensor:
        """Checked token ids as int64 grids: a clip (B, T, g, g) or (B, T, g*g) with T >= 2 → (B, T, g, g);
        with clip=False one frame per row, (B, g, g) or (B, g*g) → (B, g, g)."""
        g, n = self.config.grid, self.config.num_tokens
        tokens = torch.as_tensor(tokens, device=self.device)
        lead = 2 if clip else 1
        ok = (tokens.ndim == lead + 2 and tuple(tokens.shape[-2:]) == (g, g)
              or tokens.ndim == lead + 1 and tokens.shape[-1] == n)
        if not ok or (clip and tokens.shape[1] < 2):
            dims = "B, T" if clip else "B"
            raise ValueError(f"{name} must be token ids of shape ({dims}, {g}, {g}) or ({dims}, {n})"
                             f"{' with T >= 2' if clip else ''}; got shape {tuple(tokens.shape)}")
        if tokens.is_floating_point():
            raise ValueError(f"{name} must be integer token ids; got dtype {tokens.dtype}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.config.codebook_size):
            raise ValueError(f"{name} ids must be in [0, {self.config.codebook_size}); "
                             f"got range [{int(tokens.min())}, {int(tokens.max())}]")
        return tokens.reshape(*tokens.shape[:lead], g, g).long()

    # -- parts -------------------------------------------------------------------------------
    def embed(self, tokens: torch.Tensor, position: bool = True) -> torch.Tensor:
        """(B, g, g) ids → (B, E, g, g)."""
        x = self.token_embed(tokens).permute(0, 3, 1, 2)
        return x + self.pos if position else x

    def encode(self, prev: torch.Tensor, nxt: torch.Tensor) -> torch.Tensor:
        """Frames t and t+1 (B, g, g) → the unquantized latent (B, latent_dim)."""
        changed = (prev != nxt).float().unsqueeze(1)
        h = self.encoder(torch.cat([self.embed(prev), self.embed(nxt), changed], 1))
        return self.to_latent(torch.cat([h.mean((2, 3)), h.amax((2, 3))], -1))

    def codes(self) -> torch.Tensor:
        return F.normalize(self.codebook, dim=-1)

    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """z (B, latent_dim) → (straight-through code vectors, ids (B,), codebook + commitment loss)."""
        z = F.normalize(z, dim=-1)
        codes = self.codes()
        ids = (z @ codes.T).argmax(-1)
        q = codes[ids]
        vq_loss = F.mse_loss(q, z.detach()) + self.config.commitment_weight * F.mse_loss(z, q.detach())
        return z + (q - z).detach(), ids, vq_loss

    def decode(self, prev: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
        """Frame t (B, g, g) + latent action vectors (B, latent_dim) → frame t+1 logits (B, g, g, V)."""
        x = self.decoder_in(self.embed(prev, self.config.decoder_position))
        for block, action_in in zip(self.decoder_blocks, self.action_in):
            x = block(x + action_in(action)[:, :, None, None])
        logits = self.head(x).permute(0, 2, 3, 1)
        return logits + self.copy_logit * F.one_hot(prev, self.config.codebook_size)

    # -- training ----------------------------------------------------------------------------
    def loss(self, tokens) -> tuple[torch.Tensor, dict[str, float]]:
        """Every consecutive pair of frames of tokens (B, T, g, g) (or (B, T, g*g)), T >= 2."""
        tokens = self._grids(tokens)
        prev, nxt = tokens[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(0, 1)
        z = self.encode(prev, nxt)
        action, ids, vq_loss = self.quantize(z)
        logits = self.decode(prev, action)
        # most tokens persist from frame t; weighting those that change keeps the decoder from
        # settling on "copy frame t" and the encoder from carrying nothing (as in the dynamics loss)
        changed = prev != nxt
        weight = (1 + (self.config.changed_token_weight - 1) * changed.float()).reshape(-1)
        ce = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), nxt.reshape(-1), reduction="none")
        token_loss = (ce * weight).sum() / weight.sum()
        loss = token_loss + vq_loss
        if self.training:
            self._restart_dead_codes(z.detach(), ids)
        with torch.no_grad():
            correct = logits.argmax(-1) == nxt
            counts = torch.bincount(ids, minlength=self.config.n_latent_actions).float()
        metrics = {"loss": loss.item(), "token_loss": token_loss.item(), "vq_loss": vq_loss.item(),
                   "token_accuracy": correct.float().mean().item(),
                   "changed_token_accuracy": correct[changed].float().mean().item() if changed.any() else 1.0,
                   "perplexity": perplexity(counts), "codes_used": int((counts > 0).sum())}
        return loss, metrics

    @torch.no_grad()
    def _restart_dead_codes(self, z: torch.Tensor, ids: torch.Tensor) -> None:
        """Re-initialize the codes the encoder has stopped choosing from this batch's encoder outputs."""
        cfg = self.config
        n = cfg.n_latent_actions
        counts = torch.bincount(ids, minlength=n).float() / max(len(ids), 1)
        self.usage.mul_(cfg.usage_decay).add_((1 - cfg.usage_decay) * counts)
        dead = (self.usage < cfg.dead_code_threshold / n).nonzero().flatten()
        if len(dead) == 0 or len(z) == 0:
            return
        picks = torch.randint(0, len(z), (len(dead),), device=z.device)
        fresh = F.normalize(z[picks], dim=-1)
        fresh = fresh + 0.05 * torch.randn_like(fresh)  # two codes restarted on one output still differ
        self.codebook.data[dead] = fresh * self.codebook.data.norm(dim=-1).mean()
        self.usage[dead] = 1.0 / n

    # -- inference ---------------------------------------------------------------------------
    @torch.no_grad()
    def infer_latent_actions(self, tokens) -> torch.Tensor:
        """The latent action between each pair of consecutive frames: tokens (B, T, g, g) → ids (B, T-1) int64."""
        tokens = self._grids(tokens)
        B, T = tokens.shape[:2]
        z = self.encode(tokens[:, :-1].flatten(0, 1), tokens[:, 1:].flatten(0, 1))
        return (F.normalize(z, dim=-1) @ self.codes().T).argmax(-1).reshape(B, T - 1)

    @torch.no_grad()
    def next_logits(self, tokens_t, latent_ids) -> torch.Tensor:
        """Logits (B, g, g, V) of frame t+1's tokens from frame t's tokens (B, g, g) and latent action ids (B,)."""
        prev = self._grids(tokens_t, "tokens_t", clip=False)
        ids = torch.as_tensor(latent_ids, device=self.device)
        n = self.config.n_latent_actions
        if ids.shape != (prev.shape[0],) or ids.is_floating_point():
            raise ValueError(f"latent_ids must be integer ids of shape ({prev.shape[0]},), one per frame; "
                             f"got shape {tuple(ids.shape)}, dtype {ids.dtype}")
        if len(ids) and (ids.min() < 0 or ids.max() >= n):
            raise ValueError(f"latent_ids must be in [0, {n}) (n_latent_actions={n}); "
                             f"got range [{int(ids.min())}, {int(ids.max())}]")
        return self.decode(prev, self.codes()[ids.long()])

    @torch.no_grad()
    def predict_next(self, tokens_t, latent_ids) -> torch.Tensor:
        """Frame t+1's tokens (B, g, g) (argmax) from frame t's tokens (B, g, g) and latent action ids (B,)."""
        return self.next_logits(tokens_t, latent_ids).argmax(-1)


def perplexity(counts) -> float:
    """exp(entropy) of a histogram of code uses: 1 = one code, n = all n codes equally."""
    p = torch.as_tensor(counts, dtype=torch.float64)
    p = p / p.sum().clamp(min=1)
    return float(torch.exp(-(p[p > 0] * p[p > 0].log()).sum()))


@torch.no_grad()
def predict_transitions(model: LatentActionModel, episode_tokens: list[np.ndarray], seed: int = 0,
                        batch: int = 512) -> dict[str, np.ndarray]:
    """Every consecutive pair (t, t+1) of the episodes (each (T, g, g) tokens): frame t's and t+1's tokens,
    the inferred latent, a uniformly random latent, and the decoder's argmax prediction of t+1 under each."""
    g = model.config.grid
    pairs = [np.stack([t[:-1], t[1:]], 1).reshape(-1, 2, g, g) for t in episode_tokens if len(t) >= 2]
    if not pairs:
        raise ValueError("no episode with at least 2 frames to take transitions from")
    pairs = torch.from_numpy(np.concatenate(pairs).astype(np.int64))
    rng = torch.Generator().manual_seed(seed)
    random_ids = torch.randint(0, model.config.n_latent_actions, (len(pairs),), generator=rng)
    was_training = model.training
    model.eval()
    ids, pred, pred_random = [], [], []
    for i in range(0, len(pairs), batch):
        chunk = pairs[i:i + batch]
        inferred = model.infer_latent_actions(chunk)[:, 0]
        ids.append(inferred)
        pred.append(model.predict_next(chunk[:, 0], inferred).cpu())
        pred_random.append(model.predict_next(chunk[:, 0], random_ids[i:i + batch]).cpu())
    model.train(was_training)
    return {"prev": pairs[:, 0].numpy(), "next": pairs[:, 1].numpy(), "ids": torch.cat(ids).cpu().numpy(),
            "random_ids": random_ids.numpy(), "pred": torch.cat(pred).numpy(),
            "pred_random": torch.cat(pred_random).numpy()}


def transition_metrics(t: dict[str, np.ndarray], n_latent_actions: int) -> dict[str, float]:
    """Next-frame token accuracy (all tokens, and the tokens that change) with the inferred latent, a
    random latent and copy-frame-t, and the codebook's usage, from `predict_transitions`'s output."""
    changed = t["prev"] != t["next"]
    out: dict[str, float] = {"transitions": int(len(t["ids"]))}
    for name, pred in (("inferred", t["pred"]), ("random", t["pred_random"]), ("copy", t["prev"])):
        correct = pred == t["next"]
        out[f"accuracy_{name}"] = float(correct.mean())
        out[f"changed_accuracy_{name}"] = float(correct[changed].mean()) if changed.any() else 1.0
    counts = np.bincount(t["ids"], minlength=n_latent_actions)
    out["perplexity"] = perplexity(counts)
    out["codes_used"] = int((counts > 0).sum())
    return out
