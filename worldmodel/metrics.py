"""Frame-fidelity and policy-ranking metrics.

* `psnr`, `pooled_psnr`, `ssim`: per-frame PSNR (dB), PSNR of the pooled error, and per-frame
  SSIM (Gaussian window 11, σ 1.5, on luma) of uint8 frames.
* `token_flicker`: how stable a tokenizer's codes are over time: the share of token changes between
  consecutive frames that happen in still patches (pixels change by less than a threshold), and the
  rate at which still and moving patches change token.
* `pearson`, `mmrv`: SimplerEnv's agreement metrics between per-policy success rates measured two
  ways (here: in the world model vs in the simulator). MMRV = mean over policies i of the largest
  |real_i − real_j| among the policies j whose order relative to i differs between the two.
* `bootstrap_agreement`: intervals for both, from resampling each policy's episodes.
* `task_agreement`: both again, within each task (a ranking over all tasks can hide a task that is wrong).
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch
import torch.nn.functional as F


def _float(frames) -> torch.Tensor:
    x = torch.as_tensor(np.array(frames)).float()
    return x / 255.0 if x.max() > 1.5 or np.asarray(frames).dtype == np.uint8 else x


def psnr(pred, target) -> np.ndarray:
    """Per-frame PSNR of (..., H, W, 3) frames (uint8, or float in [0, 1])."""
    p, t = _float(pred), _float(target)
    mse = ((p - t) ** 2).reshape(*p.shape[:-3], -1).mean(-1).clamp(min=1e-10)
    return (10 * torch.log10(1.0 / mse)).numpy()


def pooled_psnr(pred, target) -> float:
    """PSNR of the mean squared error over all frames (robust to frames identical to the target)."""
    p, t = _float(pred), _float(target)
    return float(10 * torch.log10(1.0 / ((p - t) ** 2).mean().clamp(min=1e-10)))


def _luma(x: torch.Tensor) -> torch.Tensor:
    return (x * torch.tensor([0.299, 0.587, 0.114])).sum(-1)


def ssim(pred, target, window: int = 11, sigma: float = 1.5) -> np.ndarray:
    """Per-frame SSIM (Wang et al. 2004) on luma, Gaussian window, valid region only."""
    p, t = _float(pred), _float(target)
    lead = p.shape[:-3]
    p = _luma(p).reshape(-1, 1, *p.shape[-3:-1])
    t = _luma(t).reshape(-1, 1, *t.shape[-3:-1])
    coords = torch.arange(window, dtype=torch.float32) - window // 2
    g = torch.exp(-coords ** 2 / (2 * sigma ** 2))
    g = (g / g.sum())
    kernel = (g[:, None] * g[None, :])[None, None]
    mu_p, mu_t = F.conv2d(p, kernel), F.conv2d(t, kernel)
    var_p = F.conv2d(p * p, kernel) - mu_p ** 2
    var_t = F.conv2d(t * t, kernel) - mu_t ** 2
    cov = F.conv2d(p * t, kernel) - mu_p * mu_t
    c1, c2 = 0.01 ** 2, 0.03 ** 2
    s = ((2 * mu_p * mu_t + c1) * (2 * cov + c2)) / ((mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2))
    return s.mean((1, 2, 3)).reshape(lead).numpy()


def token_flicker(episodes, downsample: int, still_threshold: float = 0.01) -> dict[str, float]:
    """Token changes between consecutive frames, split by whether the token's d×d patch is still.

    `episodes`: [(images (T, S, S, 3) uint8, tokens (T, S/d, S/d))]. A patch is still when its mean
    absolute pixel change (pixels in [0, 1]) is below `still_threshold`. Returns `still_share` (of all
    token changes, the share in still patches: flicker), `still_change_rate` and `moving_change_rate`
    (how often a still / moving patch changes token) and `still_patch_share`."""
    counts = np.zeros(4)  # still changed, still, moving changed, moving
    for images, tokens in episodes:
        x = torch.from_numpy(np.array(images)).float().div(255).permute(0, 3, 1, 2)  # a writable copy
        if len(x) < 2:
            continue
        change = F.avg_pool2d((x[1:] - x[:-1]).abs().mean(1, keepdim=True), downsample)[:, 0].numpy()
        tok = np.asarray(tokens)
        if tok.shape[1:] != change.shape[1:]:
            raise ValueError(f"tokens of shape {tok.shape} do not match {downsample}x{downsample} patches of "
                             f"images shaped {tuple(np.shape(images))}")
        changed, still = tok[1:] != tok[:-1], change < still_threshold
        counts += [(changed & still).sum(), still.sum(), (changed & ~still).sum(), (~still).sum()]
    still_changed, still, moving_changed, moving = counts
    return {"still_share": float(still_changed / max(still_changed + moving_changed, 1)),
            "still_change_rate": float(still_changed / max(still, 1)),
            "moving_change_rate": float(moving_changed / max(moving, 1)),
            "still_patch_share": float(still / max(still + moving, 1))}


def pearson(x, y) -> float:
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(x) != len(y) or len(x) < 2:
        raise ValueError(f"pearson needs two equal-length sequences of at least 2 values; got {len(x)} and {len(y)}")
    xc, yc = x - x.mean(), y - y.mean()
    denom = np.sqrt((xc ** 2).sum() * (yc ** 2).sum())
    if denom == 0:
        raise ValueError("pearson is undefined when one sequence is constant")
    return float((xc * yc).sum() / denom)


def mmrv(sim, real) -> float:
    """Mean maximum rank violation of `sim` (the evaluator being judged) against `real` (the reference)."""
    sim, real = np.asarray(sim, np.float64), np.asarray(real, np.float64)
    if len(sim) != len(real) or len(sim) < 2:
        raise ValueError(f"mmrv needs two equal-length sequences of at least 2 values; got {len(sim)} and {len(real)}")
    worst = []
    for i in range(len(real)):
        violation = 0.0
        for j in range(len(real)):
            if (real[i] < real[j]) != (sim[i] < sim[j]):
                violation = max(violation, abs(real[i] - real[j]))
        worst.append(violation)
    return float(np.mean(worst))


def bootstrap_agreement(outcomes: Sequence[tuple[Sequence[bool], Sequence[bool]]], resamples: int = 2000,
                        seed: int = 0, level: float = 0.95) -> dict[str, Any]:
    """Intervals for Pearson r and MMRV between imagined and simulated success rates, from the episodes.

    `outcomes`: per policy, (imagined successes, simulated successes) of the same episodes, in order. Each
    resample draws every policy's episodes with replacement, pairs kept (the imagined and the simulated
    rollout share their initial state and actions), and recomputes both rates, r and MMRV. The intervals
    cover the episode draw only, not the world model's training seed. Resamples in which a policy's rates
    are all equal leave r undefined and are counted, not scored."""
    if len(outcomes) < 2:
        raise ValueError(f"bootstrap_agreement needs at least 2 policies; got {len(outcomes)}")
    pairs = []
    for i, (imagined, simulated) in enumerate(outcomes):
        imagined, simulated = np.asarray(imagined, bool), np.asarray(simulated, bool)
        if imagined.shape != simulated.shape or imagined.ndim != 1 or not len(imagined):
            raise ValueError(f"policy {i}: imagined and simulated outcomes must be two equal, non-empty lists of "
                             f"episodes; got shapes {imagined.shape} and {simulated.shape}")
        pairs.append((imagined, simulated))
    rng = np.random.default_rng(seed)
    r_values, mmrv_values, undefined = [], [], 0
    for _ in range(resamples):
        imagined_rates, sim_rates = [], []
        for imagined, simulated in pairs:
            pick = rng.integers(0, len(imagined), len(imagined))
            imagined_rates.append(imagined[pick].mean())
            sim_rates.append(simulated[pick].mean())
        mmrv_values.append(mmrv(imagined_rates, sim_rates))
        try:
            r_values.append(pearson(imagined_rates, sim_rates))
        except ValueError:
            undefined += 1
    tail = 100 * (1 - level) / 2
    interval = lambda v: [float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))] if v else [math.nan] * 2
    return {"pearson_interval": interval(r_values), "mmrv_interval": interval(mmrv_values), "level": level,
            "resamples": resamples, "pearson_undefined": undefined}


def task_agreement(episodes: Sequence[Sequence[dict]]) -> dict[str, Any]:
    """Per task, each policy's imagined and simulated success rate, and Pearson r and MMRV between them.

    `episodes`: per policy, its episodes as dicts with "task", "success" (imagined) and "sim_success". A task
    whose rates are equal across policies (either way) has r undefined (NaN); `mean_pearson` averages the
    defined ones, `mean_mmrv` all tasks."""
    if len(episodes) < 2:
        raise ValueError(f"task_agreement needs at least 2 policies; got {len(episodes)}")
    tasks = sorted({e["task"] for policy in episodes for e in policy})
    out: dict[str, Any] = {"tasks": {}}
    for task in tasks:
        imagined, simulated = [], []
        for i, policy in enumerate(episodes):
            mine = [e for e in policy if e["task"] == task]
            if not mine:
                raise ValueError(f"policy {i} has no episode of task {task!r}")
            imagined.append(float(np.mean([bool(e["success"]) for e in mine])))
            simulated.append(float(np.mean([bool(e["sim_success"]) for e in mine])))
        try:
            r = pearson(imagined, simulated)
        except ValueError:  # a constant column
            r = math.nan
        out["tasks"][task] = {"imagined": imagined, "sim": simulated, "pearson": r,
                              "mmrv": mmrv(imagined, simulated)}
    defined = [t["pearson"] for t in out["tasks"].values() if not math.isnan(t["pearson"])]
    out["mean_pearson"] = float(np.mean(defined)) if defined else math.nan
    out["mean_mmrv"] = float(np.mean([t["mmrv"] for t in out["tasks"].values()]))
    return out
