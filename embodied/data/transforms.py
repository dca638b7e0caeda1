"""TensorFlow transforms of the reading pipeline: normalization, action chunks, image decode/resize/augment.

Augmentation follows OpenVLA's published settings: random-resized crop keeping 90% of the
area (aspect ratio 1), brightness ±0.2, contrast and saturation in [0.8, 1.2], hue ±0.05,
in that order. A policy trained with augmentation is evaluated on the centre crop of the same
area (`center_crop=True`).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from embodied.data.statistics import EPS, NormalizationMode


from embodied.data._tensorflow import tf as _tf


@dataclass(frozen=True)
class AugmentConfig:
    crop_scale: float = 0.9
    brightness: float = 0.2
    contrast: tuple[float, float] = (0.8, 1.2)
    saturation: tuple[float, float] = (0.8, 1.2)
    hue: float = 0.05


OPENVLA_AUGMENT = AugmentConfig()


def normalize_tf(x, entry: Mapping[str, Any], mode: NormalizationMode):
    """TF twin of `statistics.normalize` (broadcasts over leading axes)."""
    tf = _tf()
    mask = tf.constant(np.asarray(entry["mask"], dtype=bool))
    f = {k: tf.constant(np.asarray(entry[k], dtype=np.float32)) for k in ("mean", "std", "min", "max", "q01", "q99")}
    if mode is NormalizationMode.NORMAL:
        return tf.where(mask, (x - f["mean"]) / (f["std"] + EPS), x)
    low, high = (f["q01"], f["q99"]) if mode is NormalizationMode.BOUNDS_Q99 else (f["min"], f["max"])
    out = tf.where(mask, tf.clip_by_value(2 * (x - low) / (high - low + EPS) - 1, -1, 1), x)
    return tf.where(tf.equal(f["min"], f["max"]), tf.zeros_like(out), out)


CHUNK_PADDINGS = ("hold", "repeat", "continue")


def chunk_actions(action, horizon: int, padding: str = "repeat", ends_at_goal=True, instruction=None):
    """(T, D) actions → (T, K, D) windows of the K actions from t on, and a (T, K) mask of positions to train on.

    Past the episode's end, `padding` fills the window:
    - "repeat": the last action again, masked out of the loss (the policy never learns what follows the end);
    - "hold": standing still in the common delta convention (zero motion, the last gripper command),
      trained on, so that a chunk reaching the goal stops there instead of running on with untrained actions.
      Only where the episode ended at its goal (`ends_at_goal`, a boolean scalar): a failed or truncated
      episode stops anywhere, and standing still there is no answer to learn, so it is padded as "repeat".
    - "continue": the last action again, trained on, where the episode ended at its goal (else as "repeat").
      An episode that ends the moment a threshold is crossed (a cube 10 cm up, 4 cm from its goal) then
      teaches "keep doing what crossed it" rather than "stop about here", which a policy that sees the
      threshold imprecisely obeys short of it. Past a goal that ends the episode, nothing else is asked;
      a robot that should stand still after the goal wants "hold".

    `instruction` ((T,) strings): steps labelled with the clauses of a multi-step instruction (collect's
    `clause_instructions`) end a window where their clause ends, as an episode that reached its goal would
    (every clause but the last ends done): under one clause's prompt, a chunk is not trained on the next
    clause's motion (policies.instructions).
    """
    tf = _tf()
    if padding not in CHUNK_PADDINGS:
        raise ValueError(f"unknown chunk padding {padding!r}; valid: {', '.join(CHUNK_PADDINGS)}")
    length = tf.shape(action)[0]
    index = tf.range(length)[:, None] + tf.range(horizon)[None, :]
    ends_at_goal = tf.fill([length, 1], tf.cast(ends_at_goal, tf.bool))
    if instruction is None:
        last = tf.fill([length, 1], length - 1)
    else:  # the last step of each step's clause; a clause before the last one ended done
        changed = tf.cast(tf.not_equal(instruction[1:], instruction[:-1]), tf.int32)
        clause = tf.concat([tf.zeros([1], tf.int32), tf.cumsum(changed)], axis=0)
        last = tf.searchsorted(clause, clause, side="right")[:, None] - 1
        ends_at_goal = tf.logical_or(ends_at_goal, last < length - 1)
    inside = index <= last
    windows = tf.gather(action, tf.minimum(index, last))
    if padding == "repeat":
        return windows, inside
    held = tf.logical_and(tf.logical_not(inside), ends_at_goal)
    if padding == "continue":
        return windows, tf.logical_or(inside, held)
    motion = tf.concat([tf.ones_like(windows[..., :-1]), tf.zeros_like(windows[..., -1:])], axis=-1)
    hold = windows * (1.0 - motion)  # motion dims zeroed, gripper kept
    return tf.where(held[..., None], hold, windows), tf.logical_or(inside, held)


def with_clause_done_frames(frames: dict, count: int) -> dict:
    """Frames that show a clause done, for steps labelled clause by clause.

    `frames`: one trajectory's chunked frames (each key (T, ...), with `instruction` and `action_mask`). Returns
    them with a `clause_done` label (0), followed by the first `count` steps of every clause but the first
    again, prompted with the clause before it, labelled 1 and trained on no action: their images show that
    clause done (a lit button, a cube let go in its tray). A policy prompted one clause at a time must tell when
    its clause is done; its demonstrations never show a done clause under that clause's own prompt.
    """
    tf = _tf()
    instruction = frames["instruction"]
    changed = tf.cast(tf.not_equal(instruction[1:], instruction[:-1]), tf.int32)
    clause = tf.concat([tf.zeros([1], tf.int32), tf.cumsum(changed)], axis=0)
    start = tf.searchsorted(clause, clause, side="left")  # each step's clause's first step
    chosen = tf.logical_and(clause > 0, tf.range(tf.shape(clause)[0]) - start < count)
    index = tf.cast(tf.where(chosen)[:, 0], tf.int32)
    extra = {key: tf.gather(value, index) for key, value in frames.items()}
    extra["instruction"] = tf.gather(instruction, tf.gather(start, index) - 1)
    extra["action_mask"] = tf.zeros_like(extra["action_mask"])
    extra["clause_done"] = tf.ones(tf.shape(index), tf.float32)
    frames = {**frames, "clause_done": tf.zeros(tf.shape(clause), tf.float32)}
    return {key: tf.concat([frames[key], extra[key]], axis=0) for key in frames}


def next_keyframe_states(state, action, gripper_change: float = 0.5):
    """(T, S) states, (T, D) actions → (T, S): for each frame, the state at the episode's next keyframe.

    A keyframe is a frame whose gripper command (the action's last entry) differs from the previous
    frame's by more than `gripper_change` (the tool is where a grasp or a release happens), or the
    episode's last frame. These hindsight targets say where the arm is going next, which only the
    image can tell (the object, the drawer handle, the button); they need nothing but the recorded
    episode, so they exist for any RLDS dataset with a gripper action and an end-effector state.
    """
    tf = _tf()
    length = tf.shape(action)[0]
    gripper = action[:, -1]
    change = tf.abs(gripper[1:] - gripper[:-1]) > gripper_change
    is_key = tf.concat([[False], change], axis=0)
    is_key = tf.logical_or(is_key, tf.range(length) == length - 1)
    keys = tf.cast(tf.where(is_key)[:, 0], tf.int32)
    before = tf.cumsum(tf.cast(is_key, tf.int32), exclusive=True)  # keyframes strictly before each frame
    return tf.gather(state, tf.gather(keys, before))


def _crop_box(scale: float, center: bool, seed=None):
    tf = _tf()
    side = float(np.sqrt(scale))
    if center:
        offset = tf.fill([2], (1.0 - side) / 2.0)
    elif seed is None:
        offset = tf.random.uniform([2], 0.0, 1.0 - side)
    else:
        offset = tf.random.stateless_uniform([2], seed, 0.0, 1.0 - side)
    return tf.concat([offset, offset + side], axis=0)[None]  # [y1, x1, y2, x2]


def decode_image(encoded, size: tuple[int, int], augment: AugmentConfig | None = None, center_crop: bool = False,
                 crop_scale: float = 0.9, method: str = "bilinear", seed=None):
    """Encoded JPEG/PNG bytes → uint8 (H, W, 3) at `size`, optionally cropped and colour-jittered.

    `seed` (an int tensor of shape [2]) makes the augmentation a pure function of the seed
    (stateless random ops), so a seeded stream draws the same augmentations on every run.
    """
    tf = _tf()
    image = tf.io.decode_image(encoded, channels=3, expand_animations=False)
    image.set_shape([None, None, 3])
    if augment is None and not center_crop:
        def resize():
            resized = tf.image.resize(image, size, method=method, antialias=True)
            return tf.cast(tf.round(tf.clip_by_value(resized, 0.0, 255.0)), tf.uint8)

        same = tf.reduce_all(tf.equal(tf.shape(image)[:2], tf.constant(size, tf.int32)))
        out = tf.cond(same, lambda: image, resize)
        out.set_shape([size[0], size[1], 3])
        return out
    scale = augment.crop_scale if augment is not None else crop_scale
    seeds = None if seed is None else tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), 5)
    box = _crop_box(scale, center=augment is None, seed=None if seeds is None else seeds[0])
    image = tf.image.crop_and_resize(tf.cast(image[None], tf.float32), box, [0], size, method=method)[0] / 255.0
    if augment is not None and seeds is None:
        image = tf.image.random_brightness(image, augment.brightness)
        image = tf.image.random_contrast(image, *augment.contrast)
        image = tf.image.random_saturation(image, *augment.saturation)
        image = tf.image.random_hue(image, augment.hue)
    elif augment is not None:
        image = tf.image.stateless_random_brightness(image, augment.brightness, seeds[1])
        image = tf.image.stateless_random_contrast(image, *augment.contrast, seed=seeds[2])
        image = tf.image.stateless_random_saturation(image, *augment.saturation, seed=seeds[3])
        image = tf.image.stateless_random_hue(image, augment.hue, seeds[4])
    image = tf.clip_by_value(image, 0.0, 1.0)
    out = tf.cast(tf.round(image * 255.0), tf.uint8)
    out.set_shape([size[0], size[1], 3])
    return out
