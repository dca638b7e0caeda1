"""Temporal stability of the tokenizer's codes: held codes of still patches (`hold_threshold`)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
import torch

from worldmodel.metrics import psnr, token_flicker
from worldmodel.tokenizer import FrameTokenizer, TokenizerConfig
from worldmodel_helpers import SIZE, TOK, tiny_world

pytestmark = pytest.mark.usefixtures("one_thread")


def _holding(tok: FrameTokenizer, threshold: float) -> FrameTokenizer:
    held = FrameTokenizer(replace(tok.config, hold_threshold=threshold))
    held.load_state_dict(tok.state_dict())
    return held.eval()


def test_holding_still_codes_removes_their_flicker_on_sim_frames(trained_tokenizer, sim_episodes):
    tok, _ = trained_tokenizer
    held = _holding(tok, 0.01)
    plain = [(imgs, tok.encode(imgs).numpy()) for imgs, _, _ in sim_episodes]
    stable = [(imgs, held.encode_sequence(imgs).numpy()) for imgs, _, _ in sim_episodes]
    before, after = token_flicker(plain, TOK.downsample), token_flicker(stable, TOK.downsample)
    print(f"token flicker (share of changes in still patches) {before['still_share']:.3f} -> "
          f"{after['still_share']:.3f}; moving patches change {before['moving_change_rate']:.3f} -> "
          f"{after['moving_change_rate']:.3f}")
    assert before["still_share"] > 0.1, before  # there is flicker to remove on these frames
    assert after["still_share"] < 0.25 * before["still_share"], (before, after)
    assert after["moving_change_rate"] > 0.8 * before["moving_change_rate"], (before, after)  # motion still shows
    # held codes still describe the frames: reconstruction within 0.5 dB of encoding each frame afresh
    for (imgs, fresh), (_, kept) in zip(plain, stable):
        fresh_psnr = psnr(tok.decode(torch.from_numpy(fresh)).numpy(), imgs).mean()
        held_psnr = psnr(held.decode(torch.from_numpy(kept)).numpy(), imgs).mean()
        assert held_psnr > fresh_psnr - 0.5, (fresh_psnr, held_psnr)
    # without the option a sequence is encoded frame by frame
    imgs = sim_episodes[0][0]
    assert torch.equal(tok.encode_sequence(imgs), tok.encode(imgs))


def test_changed_patches_are_re_encoded_and_a_slow_drift_is_not_held_forever():
    torch.manual_seed(0)
    tok = FrameTokenizer(replace(TOK, hold_threshold=0.01)).eval()
    d = TOK.downsample
    frames = np.full((6, SIZE, SIZE, 3), 100, np.uint8)
    frames[:, :d, :d] += np.arange(6, dtype=np.uint8)[:, None, None, None] * 20  # one patch brightens each frame
    frames[1:, d:2 * d, :d] += 1  # the patch below it changes by 1/255 once: below the threshold
    fresh, held = tok.encode(frames), tok.encode_sequence(frames)
    assert torch.equal(held[:, 0, 0], fresh[:, 0, 0])  # a patch that changes is re-encoded every frame
    assert (held[:, 1, 0] == held[0, 1, 0]).all()  # a still one keeps its first code, whatever its neighbours do
    # a drift of 1/255 per frame: held until the change since the code was set reaches 0.01 (3/255)
    drifting = np.full((8, SIZE, SIZE, 3), 100, np.uint8) + np.arange(8, dtype=np.uint8)[:, None, None, None]
    codes, fresh = tok.encode_sequence(drifting), tok.encode(drifting)
    assert torch.equal(codes[1], codes[0]) and torch.equal(codes[2], codes[0])
    assert torch.equal(codes[3], fresh[3]) and torch.equal(codes[5], fresh[3]) and torch.equal(codes[6], fresh[6])


def test_sequences_are_encoded_as_in_training(trained_tokenizer, sim_episodes):
    """The dynamics model's training tokens and a multi-frame rollout context both hold still codes."""
    from embodied.train_worldmodel import tokenize_episodes
    from worldmodel.data import Episode

    held = _holding(trained_tokenizer[0], 0.01)
    imgs, acts, _ = sim_episodes[1]
    expected = held.encode_sequence(imgs)
    assert not torch.equal(expected, held.encode(imgs))  # (this episode has flicker to hold)
    episode = Episode("sim", imgs, acts, acts, np.zeros(len(acts), np.float32), "")
    tokenize_episodes(held, [episode], show_progress=False)
    assert np.array_equal(episode.tokens, expected.numpy())
    rollout = tiny_world(held).rollout(imgs[None, :3], acts[None, :2], seed=0)
    assert torch.equal(torch.stack(rollout.frames, 1)[0], expected[:3].reshape(3, -1))


def test_bad_hold_thresholds_are_named():
    for value in (-0.01, 1.0, float("nan")):
        with pytest.raises(ValueError, match=r"hold_threshold must be in \[0, 1\)"):
            TokenizerConfig(hold_threshold=value)
    with pytest.raises(ValueError, match=r"encode_sequence takes one episode's frames \(T, H, W, 3\)"):
        FrameTokenizer(replace(TOK, hold_threshold=0.01)).encode_sequence(np.zeros((2, 3, SIZE, SIZE, 3), np.uint8))
