"""What a MetaDrive worker sends back: plain numpy and floats (cheap to pickle, no simulator types).

Kept apart from ``world.py`` so the parent process never imports MetaDrive itself.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class WorldFrame:
    """What the policy and the evaluation see of one world at one moment."""

    bev: np.ndarray  # uint8 [4, H, W]
    state: np.ndarray  # float32 [5]: speed, steer, accel, yaw rate, distance to goal
    expert: np.ndarray  # float32 [K, 2], ego frame
    pose: np.ndarray  # float32 [3]: rear axle x, y, yaw (world frame)
    lateral_m: float  # signed distance of the body centre from the route centre line, left > 0
    speed_mps: float


@dataclass
class WorldStep:
    frame: WorldFrame  # after the step (the finished episode's last frame when it ended)
    reward: float
    terminated: bool
    truncated: bool
    episode: dict[str, float] = field(default_factory=dict)  # filled when the episode ended
