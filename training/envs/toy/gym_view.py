"""A single-world ``gymnasium.Env`` view of the toy world, registered as ``ToyWaypoint-v0``."""

from __future__ import annotations

from typing import Any

import gymnasium as gym

ENV_ID = "ToyWaypoint-v0"


def register_gym_envs() -> None:
    """Register ``ToyWaypoint-v0`` once (idempotent)."""
    if ENV_ID not in gym.registry:
        gym.register(id=ENV_ID, entry_point="training.envs.toy.gym_view:ToyWaypointGymEnv")


class ToyWaypointGymEnv(gym.Env):
    """One toy world on the CPU behind the Gymnasium API (placeholder until the view lands)."""

    metadata: dict[str, Any] = {"render_modes": []}

    def __init__(self, **kwargs: Any) -> None:
        raise NotImplementedError
