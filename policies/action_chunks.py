"""Open-loop execution of predicted action chunks, shared by every caller that steps a policy.

A chunked policy predicts K actions at once. Each stream (one env of a vector env, or one episode of
`select_action`, the policy server or the deploy loop) runs the first `n_action_steps` of a chunk before
asking for the next, as LeRobot's `n_action_steps` and OpenVLA-OFT do, and remembers the last gripper
command it executed: a policy with `gripper_switch_threshold` switches the gripper from that command.

With `temporal_ensemble_coeff` (ACT's temporal ensembling, LeRobot's setting of the same name) a stream
predicts at every step instead, and the action for a step is the average of every chunk's prediction for
it, weighted exp(-coeff * i) with i = 0 for the oldest: each step's motion is smoothed over K re-plans. A
binary gripper (`binary_gripper`) is snapped back to 0 or 1 at 0.5: a weighted vote of the chunks. Taking
the newest chunk's command instead lets a gripper that switches from its current state (at most once per
chunk) flip at every step, and a cube is never let go (PlaceInTray 83% -> 30%, benchmarks/RESULTS.md).

With `instruction_clauses` a stream prompts the policy with one clause of a multi-step instruction at a time
(`prompt`; policies.instructions.split_instruction) and moves to the next once the arm has stood still: over
the last `clause_still_steps` steps it moved less than `clause_hold_tolerance` metres and kept its gripper
command. A press ends resting on the lit button; a grasp stands still for fewer steps than that, and switches
the gripper. A policy that stalls mid-clause moves on too, which costs nothing it was going to get. With
`clause_release_opening` a clause also ends when the fingers let go of what they held: the gripper command
went open after the fingers, commanded closed, stayed wider than that (the state's last value, 0 closed to 1
open: something was between them). A cube let go over its tray is done, though the arm above it never stands
still. These are the keyframes of PerAct-style demonstration segmentation: the arm at rest, the gripper's change.
"""
from __future__ import annotations

from typing import Iterable

import numpy as np

from policies.instructions import split_instruction

GRIPPER_OPEN = 1.0  # every stream starts an episode with the gripper open


class ActionChunkQueue:
    """Per-stream queues of the actions still to run, and each stream's last gripper command."""

    def __init__(self, n_action_steps: int | None = None, temporal_ensemble_coeff: float | None = None,
                 binary_gripper: bool = False, instruction_clauses: bool = False, clause_hold_tolerance: float = 0.003,
                 clause_still_steps: int = 8, clause_done_threshold: float | None = None,
                 clause_release_opening: float = 0.0):
        if n_action_steps is not None and n_action_steps < 1:
            raise ValueError(f"n_action_steps must be >= 1 (or None: the whole chunk), got {n_action_steps}")
        if temporal_ensemble_coeff is not None and n_action_steps != 1:
            raise ValueError("temporal_ensemble_coeff averages a new chunk at every step: it needs n_action_steps=1, "
                             f"got {n_action_steps}")
        if clause_hold_tolerance <= 0:
            raise ValueError(f"clause_hold_tolerance must be > 0 (metres), got {clause_hold_tolerance}")
        if clause_still_steps < 1:
            raise ValueError(f"clause_still_steps must be >= 1, got {clause_still_steps}")
        if not 0 <= clause_release_opening < 1:
            raise ValueError(f"clause_release_opening must be in [0, 1) (the gripper's opening, 0 closed to 1 open; "
                             f"0: off), got {clause_release_opening}")
        self.n_action_steps = n_action_steps
        self.temporal_ensemble_coeff = temporal_ensemble_coeff
        self.binary_gripper = binary_gripper
        self.instruction_clauses = instruction_clauses
        self.clause_hold_tolerance = clause_hold_tolerance
        self.clause_still_steps = clause_still_steps
        # set: a clause also ends once the policy's clause-done probability for it (`clause_done`) passes this
        self.clause_done_threshold = clause_done_threshold
        # > 0: a clause also ends once the fingers let go of something they held wider than this opening
        self.clause_release_opening = float(clause_release_opening)
        # per stream with instruction_clauses: the instruction, its clauses and the one being done
        self._clauses: dict[int, _ClauseProgress] = {}
        self._steps: dict[int, int] = {}  # actions popped per stream this episode
        self._grippers: dict[int, list[float]] = {}  # the last clause_still_steps gripper commands per stream
        self._actions: dict[int, list[np.ndarray]] = {}
        self._gripper: dict[int, float] = {}
        # temporal ensembling: per stream, the running weighted mean of the predictions for each coming step
        # (K, D), and how many chunks each step's mean holds
        self._ensembled: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    @classmethod
    def for_config(cls, config) -> "ActionChunkQueue":
        """The queue a policy config asks for (`n_action_steps`, `temporal_ensemble_coeff`, and a binary gripper
        with `classify_gripper` or `binarize_gripper`); defaults for a policy without them."""
        binary = bool(getattr(config, "classify_gripper", False) or getattr(config, "binarize_gripper", False))
        return cls(getattr(config, "n_action_steps", None), getattr(config, "temporal_ensemble_coeff", None),
                   binary_gripper=binary, instruction_clauses=bool(getattr(config, "instruction_clauses", False)),
                   clause_hold_tolerance=float(getattr(config, "clause_hold_tolerance", 0.003)),
                   clause_still_steps=int(getattr(config, "clause_still_steps", 8)),
                   clause_done_threshold=(float(config.clause_done_threshold)
                                          if getattr(config, "clause_done_loss_weight", 0) > 0 else None),
                   clause_release_opening=float(getattr(config, "clause_release_opening", 0.0)))

    def settings(self) -> dict:
        """The settings that decide which actions run, as results.json records them beside the numbers."""
        return {"n_action_steps": self.n_action_steps, "temporal_ensemble_coeff": self.temporal_ensemble_coeff,
                "instruction_clauses": self.instruction_clauses, "clause_hold_tolerance": self.clause_hold_tolerance,
                "clause_still_steps": self.clause_still_steps, "clause_done_threshold": self.clause_done_threshold,
                "clause_release_opening": self.clause_release_opening}

    def reset(self, streams: Iterable[int] | None = None) -> None:
        """Forget the queued actions and gripper command of `streams` (all of them when None)."""
        if streams is None:
            self._actions.clear()
            self._gripper.clear()
            self._ensembled.clear()
            self._clauses.clear()
            self._steps.clear()
            self._grippers.clear()
            return
        for stream in streams:
            self._actions.pop(int(stream), None)
            self._gripper.pop(int(stream), None)
            self._ensembled.pop(int(stream), None)
            self._clauses.pop(int(stream), None)
            self._steps.pop(int(stream), None)
            self._grippers.pop(int(stream), None)

    def prompt(self, stream: int, instruction: str | None, position=None,
               gripper_opening: float | None = None) -> str | None:
        """What to prompt the policy with for `stream` now: the instruction, or with `instruction_clauses` the
        clause of it the stream is on. `position`: the arm's position (the state's first 3 values), which says
        when the arm has stood still and the clause is done; without it the first clause never ends.
        `gripper_opening` (the state's last value) says, with `clause_release_opening`, when the fingers let go
        of what they held. A new instruction starts again at its first clause."""
        if not self.instruction_clauses or instruction is None:
            return instruction
        stream, instruction = int(stream), str(instruction)
        progress = self._clauses.get(stream)
        if progress is None or progress.instruction != instruction:
            progress = self._clauses[stream] = _ClauseProgress(instruction, split_instruction(instruction))
        said_done = self.clause_done_threshold is not None and progress.done >= self.clause_done_threshold
        if self.clause_release_opening > 0 and gripper_opening is not None:
            closed = self._gripper.get(stream, GRIPPER_OPEN) < 0.5
            if closed and float(gripper_opening) > self.clause_release_opening:
                progress.held = True
            let_go, progress.held = progress.held and not closed, progress.held and closed
        else:
            let_go = False
        if (said_done or let_go) and progress.index < len(progress.clauses) - 1:
            progress.index, progress.done, progress.positions = progress.index + 1, 0.0, []
        elif position is not None and progress.index < len(progress.clauses) - 1:
            step = self._steps.get(stream, 0)
            progress.positions.append((step, np.asarray(position, dtype=np.float64)[:3]))
            # the window: from the last position seen at least clause_still_steps ago
            starts = [i for i, (t, _) in enumerate(progress.positions) if t <= step - self.clause_still_steps]
            if starts:
                progress.positions = progress.positions[starts[-1]:]
                here = progress.positions[-1][1]
                still = max(np.linalg.norm(p - here) for _, p in progress.positions) < self.clause_hold_tolerance
                if still and len(set(self._grippers.get(stream, []))) <= 1:
                    progress.index, progress.done = progress.index + 1, 0.0
                    progress.positions = [progress.positions[-1]]
        return progress.clauses[progress.index]

    def prompt_for_state(self, stream: int, instruction: str | None, state=None) -> str | None:
        """`prompt` from an observation's `state` (position 3, orientation 4, gripper opening 1), or None."""
        if state is None:
            return self.prompt(stream, instruction)
        state = np.asarray(state)
        return self.prompt(stream, instruction, state[:3], float(state[-1]))

    def clause_done(self, stream: int, probability: float) -> None:
        """The policy's probability that the clause `stream` was last prompted with is done (its clause-done
        head, from the chunk just predicted): with `clause_done_threshold`, the next prompt moves on past it."""
        progress = self._clauses.get(int(stream))
        if progress is not None:
            progress.done = float(probability)

    def clause_done_probability(self, stream: int) -> float:
        """The last probability `clause_done` reported for the clause `stream` is on (0 when none)."""
        progress = self._clauses.get(int(stream))
        return 0.0 if progress is None else progress.done

    def clause(self, stream: int) -> int:
        """The index of the clause `stream` is on (0 before its first prompt)."""
        progress = self._clauses.get(int(stream))
        return 0 if progress is None else progress.index

    def needing(self, streams: Iterable[int]) -> list[int]:
        """The streams among `streams` whose queue is empty: they need a new chunk before `pop`."""
        return [int(s) for s in streams if not self._actions.get(int(s))]

    def gripper_state(self, streams: Iterable[int]) -> list[float]:
        """Each stream's last executed gripper command (open when the stream has not acted yet)."""
        return [self._gripper.get(int(s), GRIPPER_OPEN) for s in streams]

    def fill(self, stream: int, chunk: np.ndarray) -> None:
        """Queue the first `n_action_steps` actions of `chunk` ((K, D), or one action (D,)) for `stream`."""
        chunk = np.asarray(chunk, dtype=np.float32)
        if chunk.ndim == 1:
            chunk = chunk[None]
        if chunk.ndim != 2 or len(chunk) == 0:
            raise ValueError(f"a chunk is (K, action_dim) with K >= 1, got shape {chunk.shape}")
        if self.n_action_steps is not None and self.n_action_steps > len(chunk):
            raise ValueError(f"n_action_steps={self.n_action_steps} exceeds the predicted chunk of {len(chunk)} "
                             "actions")
        if self.temporal_ensemble_coeff is not None:
            chunk = self._ensemble(int(stream), chunk)
        self._actions[int(stream)] = list(chunk[:self.n_action_steps])

    def _ensemble(self, stream: int, chunk: np.ndarray) -> np.ndarray:
        """Fold `chunk` into the stream's running means; returns the actions for the coming steps (K, D)."""
        weights = np.exp(-self.temporal_ensemble_coeff * np.arange(len(chunk)))
        cumulative = np.cumsum(weights)
        previous = self._ensembled.get(stream)
        if previous is None or len(previous[0]) == 0:
            mean, count = chunk.copy(), np.ones(len(chunk), dtype=np.int64)
        else:
            mean, count = previous
            if len(mean) > len(chunk) - 1:
                raise ValueError(f"chunks of {len(chunk)} actions after chunks of {len(mean) + 1}")
            n = len(mean)  # steps the earlier chunks still cover; the new chunk adds one more at the end
            mean = (mean * cumulative[count - 1, None] + chunk[:n] * weights[count, None]) / cumulative[count, None]
            mean = np.concatenate([mean, chunk[n:]])
            count = np.concatenate([count + 1, np.ones(len(chunk) - n, dtype=np.int64)])
        self._ensembled[stream] = (mean[1:], count[1:])  # this step's action leaves the window
        actions = mean.copy()
        if self.binary_gripper:
            actions[:, -1] = (actions[:, -1] > 0.5).astype(np.float32)
        return actions

    def pop(self, stream: int) -> np.ndarray:
        """The next action of `stream`, recorded as its current gripper command."""
        queue = self._actions.get(int(stream))
        if not queue:
            raise RuntimeError(f"stream {stream} has no queued action: fill it with a predicted chunk first")
        action = queue.pop(0)
        self._gripper[int(stream)] = float(action[-1])
        if self.instruction_clauses:
            self._steps[int(stream)] = self._steps.get(int(stream), 0) + 1
            self._grippers[int(stream)] = (self._grippers.get(int(stream), []) + [float(action[-1])])[-self.clause_still_steps:]
        return action


class _ClauseProgress:
    """A stream's multi-step instruction, its clauses, the one being done and the arm's recent positions."""

    def __init__(self, instruction: str, clauses: list[str]):
        self.instruction, self.clauses, self.index = instruction, clauses, 0
        self.done = 0.0  # the clause-done head's last probability for the clause being done
        self.held = False  # the fingers, commanded closed, were last seen holding something (clause_release_opening)
        self.positions: list[tuple[int, np.ndarray]] = []  # (step, position) at each prompt
