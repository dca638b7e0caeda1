"""The Robot interface every arm implements (ARCHITECTURE.md: Robot)."""
from __future__ import annotations

from abc import ABC, abstractmethod

import numpy as np


class Robot(ABC):
    """connect / get_observation / send_action / disconnect, and a context manager.

    `send_action` passes the safety layer first and returns the action actually sent.
    """

    @abstractmethod
    def connect(self) -> None: ...

    @abstractmethod
    def get_observation(self) -> dict:
        """`image` (uint8 H x W x 3), `state` (float32 (8,): position 3, quaternion xyzw 4, gripper 1)."""

    @abstractmethod
    def send_action(self, action) -> np.ndarray: ...

    @abstractmethod
    def disconnect(self) -> None: ...

    def __enter__(self) -> "Robot":
        self.connect()
        return self

    def __exit__(self, *exc) -> None:
        self.disconnect()
