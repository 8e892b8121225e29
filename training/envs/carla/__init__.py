"""The CARLA adapter: ``make_carla_env`` connects one CARLA server per world (see docs/carla.md).

The geometry (``raster``, ``route``), the controller and the reward are plain numpy and import
without the CARLA client; only ``session`` and ``connection.carla_client`` talk to a server.
"""

from __future__ import annotations

import atexit
import dataclasses
import weakref

import torch

from training.envs.carla.config import CARLA_PORT_STRIDE, CarlaConfig
from training.envs.carla.connection import (
    carla_client,
    connect_all,
    import_carla,
    lease_slots,
    release_slots,
    server_addresses,
)
from training.envs.carla.env import CarlaWaypointEnv
from training.envs.carla.session import CarlaSession
from training.envs.options import EnvOptions
from training.envs.toy.config import run_reward

__all__ = ["CARLA_PORT_STRIDE", "CarlaConfig", "CarlaWaypointEnv", "make_carla_env"]

_open_envs: weakref.WeakSet[CarlaWaypointEnv] = weakref.WeakSet()


def make_carla_env(num_envs: int, device: torch.device | str, options: EnvOptions) -> CarlaWaypointEnv:
    """``num_envs`` worlds; world ``i`` on ``carla_host:(carla_port + slot_i * CARLA_PORT_STRIDE)``.

    Every server is probed at once with ``carla_timeout``; the set-up (town, synchronous mode,
    map geometry) runs in parallel. Whatever fails, nothing is left behind: actors destroyed,
    settings restored, slots released.

    Raises:
        UserError: the client is not installed, a server does not answer, the town is unknown.
    """
    carla = import_carla()
    cfg = CarlaConfig(town=options.town)
    if options.difficulty is not None:
        cfg = CarlaConfig(town=options.town, difficulty=options.difficulty)
    cfg = dataclasses.replace(cfg, reward=run_reward(cfg.reward, options))
    slots = lease_slots(num_envs)
    try:
        addresses = server_addresses(options.carla_host, options.carla_port, slots)
        clients = connect_all(addresses, options.carla_timeout, carla_client)
    except BaseException:
        release_slots(slots)
        raise
    sessions = [
        CarlaSession(carla, client, address, cfg, options.carla_timeout)
        for client, address in zip(clients, addresses, strict=True)
    ]
    env = CarlaWaypointEnv(sessions, cfg, device, on_close=lambda: release_slots(slots))
    _open_envs.add(env)
    env.open()  # closes the env itself when a world fails to set up
    return env


@atexit.register
def _close_open_envs() -> None:
    """A run that ends without closing its environments still leaves every server clean."""
    for env in list(_open_envs):
        env.close()
