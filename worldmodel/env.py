"""`ImaginedEnv`: a gymnasium env whose steps are imagined by a `WorldModel`.

    env = ImaginedEnv("runs/wm/worldmodel", task="PickCube", backend="pybullet")
    obs, info = env.reset(seed=0)              # a real first frame: the sim suite's reset for that seed
    obs, reward, terminated, truncated, info = env.step(action)   # the imagined next frame

* `reset_from="sim"` (default) renders the task's real initial frame with the simulator (same seed →
  same layout and randomization as `TabletopEnv`); `reset_from="episodes"` starts from the first
  frames of recorded episodes (`episodes=`, a list of `worldmodel.data.Episode`; `options=
  {"episode": i}` picks one, else the seed does; `context_frames` real frames and the actions
  between them are used as context).
* Observations: `image` (uint8, the world model's frame size), `instruction` and, when the world
  model imagines the robot state (`state_dim > 0`, the default), `state` as `TabletopEnv` gives it:
  the real one at reset, the imagined one after each step. A policy that reads proprioception can
  therefore run closed-loop in imagination.
* `step(action)`: the 7-D action is validated like `TabletopEnv` (wrong shape or NaN → ValueError
  naming it; values clipped to the bounds); the success detector judges whether the imagined
  frame after the action shows the task complete; reward 1 and `terminated` on success;
  `truncated` after `max_episode_steps` (default: the task's own limit).
* Rollouts longer than the dynamics model's context slide its window (see `worldmodel.dynamics.Rollout`).
* Frames are rendered by residual decoding by default (`pixel_anchor=True`): the real reset frame
  plus the decoded difference between the imagined tokens and the reset frame's tokens, so parts of
  the scene the model leaves unchanged keep their real pixels rather than the tokenizer's
  reconstruction.
"""
from __future__ import annotations

import os
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from gymnasium import spaces

from worldmodel.model import WorldModel


class ImaginedEnv(gym.Env):
    metadata = {"render_modes": ["rgb_array"], "render_fps": 10}

    def __init__(self, world_model: WorldModel | str | os.PathLike, task: str | None = None,
                 backend: str = "pybullet", randomization: Any = "default", reset_from: str = "sim",
                 episodes: list | None = None, context_frames: int = 1, method: str | None = None,
                 steps: int | None = None, temperature: float = 1.0, sample_temperature: float = 0.0,
                 pixel_anchor: bool = True, max_episode_steps: int | None = None, render_mode: str | None = None):
        from envs.env import (ACTION_HIGH, ACTION_LOW, INSTRUCTION_CHARSET, INSTRUCTION_MAX_LENGTH, STATE_HIGH,
                              STATE_LOW)

        if not isinstance(world_model, WorldModel):
            world_model = WorldModel.from_pretrained(world_model)
        if world_model.detector is None:
            raise ValueError("ImaginedEnv needs a world model with a success detector")
        if reset_from not in ("sim", "episodes"):
            raise ValueError(f"reset_from must be 'sim' or 'episodes', got {reset_from!r}")
        if reset_from == "sim" and task is None:
            raise ValueError("reset_from='sim' needs task= (a tabletop10 task name)")
        if reset_from == "episodes" and not episodes:
            raise ValueError("reset_from='episodes' needs episodes= (a non-empty list of recorded episodes)")
        if render_mode not in (None, "rgb_array"):
            raise ValueError(f"unsupported render_mode {render_mode!r}; valid: 'rgb_array' or None")
        self.world = world_model
        self.task, self.backend, self.randomization = task, backend, randomization
        self.reset_from, self.episodes = reset_from, episodes
        self.context_frames = max(1, int(context_frames))
        from worldmodel.evaluate import rollout_decoding

        self.method, self.steps = rollout_decoding(world_model, method, steps)  # default: as the detector was trained
        self.temperature = float(temperature)
        self.sample_temperature, self.pixel_anchor = float(sample_temperature), bool(pixel_anchor)
        self.render_mode = render_mode
        self._sim = None
        if max_episode_steps is None:
            if task is not None:
                from envs.tasks import make_task

                max_episode_steps = make_task(task).max_steps
            else:
                max_episode_steps = max(len(e) for e in episodes)
        self.max_episode_steps = int(max_episode_steps)
        size = world_model.image_size
        obs = {"image": spaces.Box(0, 255, (size, size, 3), np.uint8)}
        if world_model.uses_states:
            obs["state"] = spaces.Box(STATE_LOW, STATE_HIGH, dtype=np.float32)
        obs["instruction"] = spaces.Text(INSTRUCTION_MAX_LENGTH, min_length=1, charset=INSTRUCTION_CHARSET)
        self.observation_space = spaces.Dict(obs)
        self._state_bounds = (STATE_LOW, STATE_HIGH)
        self._state = None
        self.action_space = spaces.Box(ACTION_LOW, ACTION_HIGH, dtype=np.float32)
        self.instruction = ""
        self._rollout = None
        self._tokens = None
        self._image = None
        self._steps = 0

    # -- reset sources -----------------------------------------------------------------------
    def _sim_env(self):
        if self._sim is None:
            import envs

            self._sim = envs.make_env(self.task, backend=self.backend, randomization=self.randomization,
                                      image_size=self.world.image_size)
        return self._sim

    def _initial(self, seed: int, options: dict) -> tuple[np.ndarray, np.ndarray | None, np.ndarray | None, str]:
        """(context frames, actions between them, their raw states or None, instruction)."""
        if self.reset_from == "sim":
            obs, _ = self._sim_env().reset(seed=seed)
            return obs["image"][None], None, obs["state"][None], str(obs["instruction"])
        index = int(options.get("episode", seed % len(self.episodes)))
        if not 0 <= index < len(self.episodes):
            raise IndexError(f"episode {index} out of range: {len(self.episodes)} episodes")
        ep = self.episodes[index]
        n = min(self.context_frames, len(ep))
        states = None if ep.states is None else ep.states[:n]
        return ep.images[:n], ep.actions[: n - 1], states, ep.instruction or "do the task"

    # -- gymnasium API -----------------------------------------------------------------------
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        options = dict(options or {})
        episode_seed = int(seed) if seed is not None else int(self.np_random.integers(2**31))
        frames, actions, states, self.instruction = self._initial(episode_seed, options)
        if self.world.uses_states and states is None:
            raise ValueError("this world model imagines the robot state, but the reset episode has no states")
        self._anchor_image = frames[-1]
        self._rollout = self.world.rollout(frames, None if actions is None else actions[None], self.method,
                                           self.steps, self.temperature, self.sample_temperature, seed=episode_seed,
                                           context_states=None if states is None else states[None])
        self._state = None if states is None else np.asarray(states[-1], np.float32)
        self._tokens = self._rollout.frames[-1]
        self._anchor_tokens = self._tokens
        self._image = self._render_tokens(self._tokens, first=True)
        self._steps = 0
        return self._obs(), {"success": False, "is_success": False, "steps": 0, "seed": episode_seed}

    def step(self, action):
        from envs.env import TabletopEnv

        if self._rollout is None:
            raise RuntimeError("call reset() before step()")
        action = TabletopEnv.validate_action(action).astype(np.float32)
        self._tokens = self._rollout.step(torch.from_numpy(self.world.normalize_actions(action[None])))
        state = self._rollout.states[-1] if self._rollout.states else None
        success = bool(self.world.success(self._tokens, state, self._anchor_tokens)[0])
        if state is not None:
            self._state = np.clip(self.world.unnormalize_states(state.cpu().numpy())[0], *self._state_bounds)
        self._image = self._render_tokens(self._tokens)
        self._steps += 1
        truncated = self._steps >= self.max_episode_steps and not success
        info = {"success": success, "is_success": success, "steps": self._steps}
        return self._obs(), float(success), success, truncated, info

    def render(self):
        return self._image if self.render_mode == "rgb_array" else None

    def close(self):
        if self._sim is not None:
            self._sim.close()
            self._sim = None

    # -- helpers -----------------------------------------------------------------------------
    def _render_tokens(self, tokens: torch.Tensor, first: bool = False) -> np.ndarray:
        if first:
            return np.asarray(self._anchor_image, np.uint8)
        if self.pixel_anchor:
            return render_anchored(self.world, tokens, self._anchor_tokens, self._anchor_image)[0]
        return self.world.decode(tokens)[0]

    def _obs(self) -> dict:
        obs = {"image": self._image.copy()}
        if self.world.uses_states:
            obs["state"] = self._state.astype(np.float32).copy()
        obs["instruction"] = self.instruction
        return obs


def render_anchored(world: WorldModel, tokens: torch.Tensor, anchor_tokens: torch.Tensor,
                    anchor_image: np.ndarray) -> np.ndarray:
    """Real anchor frame + decode(tokens) − decode(anchor tokens), as uint8 (B, S, S, 3)."""
    g = world.tokenizer.config.grid
    pred = world.tokenizer.decode(torch.as_tensor(tokens).reshape(-1, g, g))
    base = world.tokenizer.decode(torch.as_tensor(anchor_tokens).reshape(-1, g, g))
    anchor = torch.from_numpy(np.asarray(anchor_image)).float().div(255)
    if anchor.ndim == 3:
        anchor = anchor.expand(pred.shape[0], *anchor.shape)
    anchor = anchor.reshape(pred.shape)
    return ((anchor + pred - base).clamp(0, 1) * 255).round().to(torch.uint8).numpy()
