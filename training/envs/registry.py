"""Build a batched environment by name: the one place ``--env`` is resolved.

The simulators' packages are optional extras, imported only when their environment is asked
for; a missing extra is a ``UserError`` naming the install command, never an ImportError.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from collections.abc import Callable, Sequence

import torch

from training.common.compiling import check_compiled_on_cpu
from training.common.errors import UserError
from training.envs.options import EnvOptions
from training.envs.protocol import BatchedWaypointEnv
from training.envs.toy.config import COMPILE_ON_CPU_ONLY

EnvFactory = Callable[[int, torch.device | str, EnvOptions], BatchedWaypointEnv]

# name -> (module, factory function, pip extra that provides its simulator or None)
_FACTORIES: dict[str, tuple[str, str, str | None]] = {
    "toy": ("training.envs.registry", "make_toy_env", None),
    "metadrive": ("training.envs.metadrive", "make_metadrive_env", "metadrive"),
    "carla": ("training.envs.carla", "make_carla_env", "carla"),
}
KNOWN_ENVS = tuple(_FACTORIES)


def make_toy_env(num_envs: int, device: torch.device | str, options: EnvOptions) -> BatchedWaypointEnv:
    from training.envs.toy import ToyWaypointEnv, ToyWorldConfig
    from training.envs.toy.config import RewardWeights, run_reward

    difficulty = {} if options.difficulty is None else {"difficulty": options.difficulty}
    reward = run_reward(RewardWeights(), options)
    config = ToyWorldConfig(num_envs=num_envs, reward=reward, **difficulty)
    return ToyWaypointEnv(config, device=device, compile_step=options.compile_world)


def check_compile_world(env_names: Sequence[str], device: torch.device, device_flag: str) -> None:
    """``--compile-world`` compiles the toy world's step, on the CPU only (``device_flag``: the
    ``--device`` that ``device`` was resolved from)."""
    if not any(name == "toy" for name in env_names):
        raise UserError(
            f"--compile-world compiles the toy world's step; --env {','.join(env_names)} has no toy world"
        )
    check_compiled_on_cpu("--compile-world", COMPILE_ON_CPU_ONLY, device, device_flag)


def make_env(
    name: str,
    num_envs: int,
    device: torch.device | str = "cpu",
    difficulty: float | None = None,
    options: EnvOptions | None = None,
) -> BatchedWaypointEnv:
    """The named environment with ``num_envs`` worlds on ``device``.

    ``difficulty`` overrides ``options.difficulty`` when given.

    Raises:
        UserError: an unknown name, a bad size, a missing extra, or a simulator that cannot start.
    """
    check_env_choice(name)
    if num_envs < 1:
        raise UserError(f"num-envs must be >= 1, got {num_envs}")
    options = options or EnvOptions()
    if difficulty is not None:
        options = dataclasses.replace(options, difficulty=difficulty)
    if options.difficulty is not None and not 0.0 <= options.difficulty <= 1.0:
        raise UserError(f"difficulty must be in [0, 1], got {options.difficulty}")
    return _factory(name)(num_envs, device, options)


def _factory(name: str) -> EnvFactory:
    module_name, function_name, extra = _FACTORIES[name]
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        if extra is None:
            raise
        raise UserError(
            f"--env {name} needs the '{extra}' extra, which is not installed ({error}); "
            f"install it with: pip install -e '.[{extra}]'"
        ) from None
    return getattr(module, function_name)


def check_env_choice(name: str) -> None:
    """Validate an ``--env`` value early (before anything is written)."""
    if name not in _FACTORIES:
        raise UserError(f"unknown --env {name!r} (known: {', '.join(KNOWN_ENVS)})")


def split_env_mix(env: str, weights: str | None, num_envs: int) -> list[tuple[str, int]]:
    """``[(name, worlds)]`` for ``--env a,b`` and ``--env-weights wa,wb`` sharing ``num_envs`` worlds.

    Worlds are shared in proportion to the weights (largest remainder), each environment at
    least one. A single ``--env`` gets all the worlds.

    Raises:
        UserError: an unknown or repeated name, malformed or non-positive weights, a count of
            weights that differs from the environments', or fewer worlds than environments.
    """
    names = [name.strip() for name in env.split(",")]
    for name in names:
        check_env_choice(name)
    if len(set(names)) != len(names):
        raise UserError(f"--env {env!r} names an environment twice")
    shares = _parse_weights(weights, len(names))
    if num_envs < len(names):
        raise UserError(f"--num-envs {num_envs} cannot give each of the {len(names)} environments a world")
    exact = [num_envs * share / sum(shares) for share in shares]
    counts = [max(1, int(value)) for value in exact]
    by_remainder = sorted(range(len(names)), key=lambda i: exact[i] - int(exact[i]), reverse=True)
    for i in by_remainder:
        if sum(counts) >= num_envs:
            break
        counts[i] += 1
    while sum(counts) > num_envs:  # the minimum of one world per environment overshot
        largest = max(range(len(counts)), key=counts.__getitem__)
        counts[largest] -= 1
    return list(zip(names, counts, strict=True))


def _parse_weights(weights: str | None, count: int) -> list[float]:
    if weights is None:
        return [1.0] * count
    try:
        shares = [float(part) for part in weights.split(",")]
    except ValueError:
        raise UserError(f"--env-weights must be numbers separated by commas, got {weights!r}") from None
    if len(shares) != count:
        raise UserError(f"--env-weights has {len(shares)} weights for {count} environments")
    if not all(share > 0 and share < float("inf") for share in shares):
        raise UserError(f"--env-weights must all be > 0, got {weights!r}")
    if not math.isfinite(sum(shares)):
        raise UserError(f"--env-weights are too large to add up, got {weights!r}")
    return shares


def make_envs(
    mix: list[tuple[str, int]], device: torch.device | str, options: EnvOptions
) -> dict[str, BatchedWaypointEnv]:
    """``{name: environment}`` for ``[(name, worlds)]``; if one cannot start, those built are closed."""
    built: dict[str, BatchedWaypointEnv] = {}
    try:
        for name, count in mix:
            built[name] = make_env(name, count, device, options=options)
    except BaseException:
        for env in built.values():
            env.close()
        raise
    return built


def make_env_mix(
    mix: list[tuple[str, int]], device: torch.device | str, options: EnvOptions
) -> BatchedWaypointEnv:
    """One batched environment from ``[(name, worlds)]``: the named one, or a ``MixedEnv`` of several."""
    envs = make_envs(mix, device, options)
    if len(envs) == 1:
        return next(iter(envs.values()))
    from training.envs.mixed import MixedEnv

    try:
        return MixedEnv(list(envs.items()))
    except BaseException:
        for env in envs.values():
            env.close()
        raise
