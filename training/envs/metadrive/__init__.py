"""MetaDrive behind the waypoint protocol (``--env metadrive``); see ``docs/metadrive.md``.

Needs the ``metadrive`` extra (``pip install -e '.[metadrive]'``); importing this package
without it raises ImportError, which ``make_env`` turns into a one-line install hint.
"""

from __future__ import annotations

import dataclasses
import importlib.util

if importlib.util.find_spec("metadrive") is None:
    raise ImportError("No module named 'metadrive'")

import torch

from training.common.errors import UserError
from training.envs.metadrive.config import MetaDriveWorldConfig
from training.envs.metadrive.env import MetaDriveWaypointEnv
from training.envs.options import EnvOptions
from training.envs.toy.config import run_reward

__all__ = ["MetaDriveWaypointEnv", "MetaDriveWorldConfig", "make_metadrive_env"]


def make_metadrive_env(
    num_envs: int, device: torch.device | str, options: EnvOptions
) -> MetaDriveWaypointEnv:
    """``num_envs`` MetaDrive worlds, one worker process each (MetaDrive: one engine per process).

    ``options.sim_workers``: 0 starts one worker per world; a smaller positive number cannot hold
    the worlds and is refused; a larger one is capped at ``num_envs``. ``options.asynchronous``: the
    worlds step apart (``MetaDriveWaypointEnv``).
    """
    if 0 < options.sim_workers < num_envs:
        raise UserError(
            f"--env metadrive runs one world per worker process (MetaDrive allows one engine per process): "
            f"--sim-workers {options.sim_workers} cannot hold {num_envs} worlds; use 0 or >= --num-envs"
        )
    config = MetaDriveWorldConfig()
    if options.difficulty is not None:
        config = MetaDriveWorldConfig(difficulty=options.difficulty)
    config = dataclasses.replace(config, reward=run_reward(config.reward, options))
    return MetaDriveWaypointEnv(num_envs, device, config, asynchronous=options.asynchronous)
