"""Frame tokenizer: a convolutional autoencoder with finite scalar quantization (FSQ).

An S×S RGB frame becomes an (S/d)×(S/d) grid of integer tokens (d = `downsample`): by default
64×64 → 16×16 = 256 tokens (patch 4, as Genie's small reproductions use), with a codebook of
prod(levels) codes (default 8·5·5·5 = 1000; Genie uses 1024).
FSQ (Mentzer et al. 2023) rounds each of a few bounded latent channels to a fixed number of
levels, so the codebook is implicit, every code is used, and no commitment loss or codebook
collapse has to be managed.

    tok = FrameTokenizer(TokenizerConfig())
    tokens = tok.encode(frames_uint8)        # (..., 64, 64, 3) uint8 → (..., 16, 16) int64
    tokens = tok.encode_sequence(episode)    # (T, 64, 64, 3) → (T, 16, 16), still codes held (hold_threshold)
    frames = tok.decode(tokens)              # → (..., 64, 64, 3) float in [0, 1]
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from worldmodel.pretrained import PretrainedMixin


@dataclass
class TokenizerConfig:
    image_size: int = 64
    downsample: int = 4  # token grid = image_size / downsample per side (a power of two)
    levels: tuple[int, ...] = (8, 5, 5, 5)  # FSQ levels per latent channel; codebook = their product
    channels: int = 32  # width at full resolution; doubled at each downsampling
    res_blocks: int = 2  # residual blocks at the token-grid resolution
    # temporal stability (`encode_sequence`, how episodes are tokenized): a patch keeps its token from the
    # previous frame while its pixels differ by less than this from the frame its token was last set on
    # (mean absolute change, pixels in [0, 1]), so the codes of still regions cannot flicker with their
    # neighbours and a slow drift is still re-encoded once it adds up; 0 turns it off
    hold_threshold: float = 0.0

    def __post_init__(self):
        self.levels = tuple(int(x) for x in self.levels)
        if self.downsample < 1 or self.downsample & (self.downsample - 1):
            raise ValueError(f"tokenizer downsample must be a power of two, got {self.downsample}")
        if self.image_size % self.downsample:
            raise ValueError(f"tokenizer image_size {self.image_size} is not divisible by downsample {self.downsample}")
        if not self.levels or min(self.levels) < 2:
            raise ValueError(f"tokenizer levels must be integers >= 2, got {self.levels}")
        if not 0 <= self.hold_threshold < 1:  # also refuses NaN
            raise ValueError(f"tokenizer hold_threshold must be in [0, 1) (a mean absolute pixel change, pixels "
                             f"in [0, 1]; 0 turns it off), got {self.hold_threshold}")

    @property
    def grid(self) -> int:
        return self.image_size // self.downsample

    @property
    def num_tokens(self) -> int:
        return self.grid * self.grid

    @property
    def codebook_size(self) -> int:
        return int(math.prod(self.levels))


class FSQ(nn.Module):
    """Finite scalar quantization with a straight-through estimator."""

    def __init__(self, levels: tuple[int, ...]):
        super().__init__()
        levels_t = torch.tensor(levels, dtype=torch.float32)
        basis = torch.cumprod(torch.tensor([1, *levels[:-1]], dtype=torch.int64), 0)
        self.register_buffer("levels", levels_t, persistent=False)
        self.register_buffer("basis", basis, persistent=False)

    def bound(self, z: torch.Tensor) -> torch.Tensor:
        half = (self.levels - 1) * (1 + 1e-3) / 2
        offset = torch.where(self.levels % 2 == 0, 0.5, 0.0)
        shift = torch.atanh(offset / half)
        return torch.tanh(z + shift) * half - offset

    def forward(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """z (..., C) → (quantized codes scaled to [-1, 1], integer indices (...))."""
        bounded = self.bound(z)
        rounded = bounded + (torch.round(bounded) - bounded).detach()
        half_width = torch.div(self.levels, 2, rounding_mode="floor")
        return rounded / half_width, self.codes_to_indices(rounded)

    def codes_to_indices(self, rounded: torch.Tensor) -> torch.Tensor:
        half_width = torch.div(self.levels, 2, rounding_mode="floor")
        digits = (rounded.round() + half_width).long()
        return (digits * self.basis).sum(-1)

    def indices_to_codes(self, indices: torch.Tensor) -> torch.Tensor:
        digits = torch.div(indices.unsqueeze(-1), self.basis, rounding_mode="floor") % self.levels.long()
        half_width = torch.div(self.levels, 2, rounding_mode="floor")
        return (digits.float() - half_width) / half_width


class ResBlock(nn.Module):
    def __init__(self, channels: int, kernel: int = 3):
        super().__init__()
        pad = kernel // 2
        self.body = nn.Sequential(
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, kernel, padding=pad),
            nn.GroupNorm(8, channels), nn.SiLU(), nn.Conv2d(channels, channels, kernel, padding=pad))

    def forward(self, x):
        return x + self.body(x)


class FrameTokenizer(PretrainedMixin, nn.Module):
    config_class = TokenizerConfig
    model_type = "embodied-fsq-tokenizer"

    def __init__(self, config: TokenizerConfig | None = None):
        super().__init__()
        self.config = config = config or TokenizerConfig()
        stages = int(math.log2(config.downsample))
        widths = [config.channels * 2 ** i for i in range(stages + 1)]
        # strided convs down to the token grid; residual blocks only there, where they are cheap
        enc: list[nn.Module] = [nn.Conv2d(3, widths[0], 3, padding=1), nn.SiLU()]
        for i in range(stages):
            enc += [nn.Conv2d(widths[i], widths[i + 1], 4, stride=2, padding=1), nn.SiLU()]
        enc += [ResBlock(widths[-1]) for _ in range(config.res_blocks)]
        enc += [nn.GroupNorm(8, widths[-1]), nn.SiLU(), nn.Conv2d(widths[-1], len(config.levels), 1)]
        self.encoder = nn.Sequential(*enc)
        self.quantizer = FSQ(config.levels)
        dec: list[nn.Module] = [nn.Conv2d(len(config.levels), widths[-1], 3, padding=1)]
        dec += [ResBlock(widths[-1]) for _ in range(config.res_blocks)]
        for i in reversed(range(stages)):
            dec += [nn.SiLU(), nn.ConvTranspose2d(widths[i + 1], widths[i], 4, stride=2, padding=1)]
        dec += [nn.SiLU(), nn.Conv2d(widths[0], widths[0], 3, padding=1), nn.SiLU(),
                nn.Conv2d(widths[0], 3, 3, padding=1)]
        self.decoder = nn.Sequential(*dec)

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- frames in/out -----------------------------------------------------------------------
    def preprocess(self, frames) -> torch.Tensor:
        """uint8 (..., H, W, 3) frames → float (N, 3, S, S) in [-1, 1]; other sizes are resized."""
        x = frames if torch.is_tensor(frames) else torch.from_numpy(np.array(frames))  # a writable copy
        if x.ndim < 3 or x.shape[-1] != 3:
            raise ValueError(f"frames must be (..., H, W, 3) RGB; got shape {tuple(x.shape)} "
                             f"(the tokenizer expects {self.config.image_size}x{self.config.image_size}x3)")
        if x.dtype != torch.uint8:
            raise ValueError(f"frames must be uint8 in [0, 255]; got dtype {x.dtype}")
        x = x.reshape(-1, *x.shape[-3:]).to(self.device).permute(0, 3, 1, 2).float() / 127.5 - 1
        size = self.config.image_size
        if x.shape[-2:] != (size, size):
            # resized (area) to the tokenizer's square input; aspect ratio is not preserved
            x = F.interpolate(x, size=(size, size), mode="area")
        return x

    def encode_latents(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        z = self.encoder(x).permute(0, 2, 3, 1)  # (N, g, g, C)
        return self.quantizer(z)

    def decode_codes(self, codes: torch.Tensor) -> torch.Tensor:
        return self.decoder(codes.permute(0, 3, 1, 2))  # (N, 3, S, S) in ~[-1, 1]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, indices = self.encode_latents(x)
        return self.decode_codes(codes), indices

    def loss(self, frames) -> tuple[torch.Tensor, dict[str, float]]:
        x = self.preprocess(frames)
        recon, indices = self(x)
        mse = F.mse_loss(recon, x)
        loss = mse + 0.1 * F.l1_loss(recon, x)
        psnr = psnr_from_mse(F.mse_loss(recon.clamp(-1, 1), x).item() / 4)  # [-1,1] → [0,1] scale
        used = torch.unique(indices).numel() / self.config.codebook_size
        return loss, {"loss": loss.item(), "psnr": psnr, "codebook_usage": used}

    @torch.no_grad()
    def encode(self, frames) -> torch.Tensor:
        """uint8 frames (..., H, W, 3) → int64 tokens (..., g, g)."""
        lead = tuple(np.shape(frames)[:-3])
        _, indices = self.encode_latents(self.preprocess(frames))
        g = self.config.grid
        return indices.reshape(*lead, g, g)

    @torch.no_grad()
    def encode_sequence(self, frames) -> torch.Tensor:
        """Consecutive uint8 frames (T, H, W, 3) of one episode → int64 tokens (T, g, g), with the codes of
        still patches held (`hold_threshold`); without it, the same as `encode`."""
        frames = frames if torch.is_tensor(frames) else np.asarray(frames)
        if frames.ndim != 4:
            raise ValueError(f"encode_sequence takes one episode's frames (T, H, W, 3); "
                             f"got shape {tuple(frames.shape)}")
        tokens = torch.cat([self.encode(frames[i:i + 256]) for i in range(0, len(frames), 256)])
        threshold = self.config.hold_threshold
        if threshold <= 0 or len(tokens) < 2:
            return tokens
        d, g = self.config.downsample, self.config.grid
        x = (self.preprocess(frames) + 1) / 2  # (T, 3, S, S) in [0, 1]
        patches = x.reshape(len(x), 3, g, d, g, d).permute(0, 2, 4, 1, 3, 5).reshape(len(x), g, g, -1)
        anchor = patches[0].clone()  # the pixels each patch's current token was set on
        for t in range(1, len(tokens)):
            held = (patches[t] - anchor).abs().mean(-1) < threshold
            tokens[t][held] = tokens[t - 1][held]
            anchor[~held] = patches[t][~held]
        return tokens

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """int tokens (..., g, g) → float frames (..., S, S, 3) in [0, 1]."""
        tokens = torch.as_tensor(tokens, device=self.device)
        g = self.config.grid
        if tokens.shape[-2:] != (g, g):
            raise ValueError(f"tokens must end with the grid shape ({g}, {g}); got {tuple(tokens.shape)}")
        if tokens.min() < 0 or tokens.max() >= self.config.codebook_size:
            raise ValueError(f"token ids must be in [0, {self.config.codebook_size}); "
                             f"got range [{int(tokens.min())}, {int(tokens.max())}]")
        lead = tokens.shape[:-2]
        codes = self.quantizer.indices_to_codes(tokens.reshape(-1, g, g).long())
        out = self.decode_codes(codes).clamp(-1, 1).add(1).div(2).permute(0, 2, 3, 1)
        return out.reshape(*lead, *out.shape[1:])

    def fingerprint(self) -> dict:
        """What a dynamics model must agree on to read this tokenizer's tokens."""
        return {"image_size": self.config.image_size, "grid": self.config.grid, "levels": list(self.config.levels),
                "codebook_size": self.config.codebook_size}


def psnr_from_mse(mse: float) -> float:
    """PSNR in dB for images scaled to [0, 1]."""
    return float(10 * math.log10(1.0 / max(mse, 1e-10)))


def to_uint8(frames: torch.Tensor) -> np.ndarray:
    """Float frames in [0, 1] → uint8 numpy."""
    return (frames.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
