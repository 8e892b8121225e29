"""Build a batched environment by name: the one place ``--env`` is resolved."""

from __future__ import annotations

import torch

from training.common.errors import UserError
from training.rl.env_interface import BatchedWaypointEnv

KNOWN_ENVS = ("toy",)


def make_env(
    name: str, num_envs: int, device: torch.device | str = "cpu", difficulty: float | None = None
) -> BatchedWaypointEnv:
    """The named environment with ``num_envs`` worlds on ``device``.

    Raises:
        UserError: an unknown name or a bad size.
    """
    if num_envs < 1:
        raise UserError(f"num-envs must be >= 1, got {num_envs}")
    if name == "toy":
        from training.envs.toy import ToyWaypointEnv, ToyWorldConfig

        config = ToyWorldConfig(num_envs=num_envs)
        if difficulty is not None:
            if not 0.0 <= difficulty <= 1.0:
                raise UserError(f"difficulty must be in [0, 1], got {difficulty}")
            config = ToyWorldConfig(num_envs=num_envs, difficulty=difficulty)
        return ToyWaypointEnv(config, device=device)
    raise UserError(f"unknown --env {name!r} (known: {', '.join(KNOWN_ENVS)})")


def check_env_choice(name: str) -> None:
    """Validate an ``--env`` value early (before anything is written)."""
    if name not in KNOWN_ENVS:
        raise UserError(f"unknown --env {name!r} (known: {', '.join(KNOWN_ENVS)})")
