"""Settings that only some environments read, shared by the three commands' flags.

``SimulatorFlags`` is a keyword-only dataclass mixin: the SFT trainer, the PPO trainer and the
comparison inherit it, so ``--carla-host``, ``--carla-port``, ``--carla-timeout``, ``--town`` and
``--sim-workers`` mean the same thing everywhere and are validated in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from training.common.cli import config_field, require


@dataclass(frozen=True)
class EnvOptions:
    """What ``make_env`` passes to an environment factory besides size and device."""

    difficulty: float | None = None  # toy world: 0..1; simulators map it to traffic density
    carla_host: str = "localhost"
    carla_port: int = 2000
    carla_timeout: float = 10.0  # seconds
    town: str = "Town01"
    sim_workers: int = 0  # worker processes; 0: one per world (MetaDrive needs one per world)
    reward: str = "shaped"  # reward preset (training/envs/toy/config.py: REWARD_PRESETS)
    collision_penalty: float | None = None  # None: the environment's own weight
    off_road_penalty: float | None = None
    compile_world: bool = False  # toy world: each step one compiled graph (``--compile-world``)
    asynchronous: bool = (
        False  # worlds that step apart (``send``/``recv``), MetaDrive only (``--async-worlds``)
    )


def for_process(options: EnvOptions, rank: int, worlds_per_process: int) -> EnvOptions:
    """The options of process ``rank`` of a distributed run: its own block of simulator servers.

    CARLA world ``i`` of a process talks to the server at ``carla_port + i * CARLA_PORT_STRIDE``;
    process ``r`` starts ``r * worlds_per_process`` servers further on (see docs/carla.md).
    """
    from training.envs.carla.config import CARLA_PORT_STRIDE

    return replace(options, carla_port=options.carla_port + rank * worlds_per_process * CARLA_PORT_STRIDE)


@dataclass(kw_only=True)
class SimulatorFlags:
    """Command-line flags of the real simulators (ignored by the toy world)."""

    carla_host: str = config_field("localhost", "CARLA server host (--env carla)")
    carla_port: int = config_field(2000, "CARLA server RPC port (--env carla)")
    carla_timeout: float = config_field(10.0, "CARLA client timeout (--env carla)", "s")
    town: str = config_field("Town01", "CARLA map to load (--env carla)")
    sim_workers: int = config_field(
        0,
        "simulator worker processes (--env metadrive needs one per world, >= --num-envs); 0: one per world",
    )

    def validate_simulator_flags(self) -> None:
        require(bool(self.carla_host.strip()), "--carla-host must not be empty")
        require(0 < self.carla_port < 65536, f"--carla-port must be in [1, 65535], got {self.carla_port}")
        require(
            math.isfinite(self.carla_timeout) and self.carla_timeout > 0,
            f"--carla-timeout must be > 0 seconds, got {self.carla_timeout}",
        )
        require(self.sim_workers >= 0, f"--sim-workers must be >= 0, got {self.sim_workers}")

    def env_options(self, difficulty: float | None) -> EnvOptions:
        """The flags as the ``EnvOptions`` a factory reads (every flag here is a field there)."""
        flags = {field.name: getattr(self, field.name) for field in fields(SimulatorFlags)}
        return EnvOptions(difficulty=difficulty, **flags)
