"""Several batched environments behind one: a training run on a weighted mix of worlds.

World ``i`` of the mix is world ``i - start_k`` of the ``k``-th environment. Observations,
rewards and infos are concatenated along the batch; every environment must share the BEV shape,
ego state and waypoint layout (one SFT model drives them all).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from training.common.errors import UserError
from training.envs.protocol import BatchedWaypointEnv, EnvSpec, Observation, StepResult


def concat_batches(parts: list[Any]) -> Any:
    """Concatenate tensors, or dataclasses / named tuples of tensors field by field, along dim 0
    (a field computed on first use stays so)."""
    if any(callable(part) for part in parts):  # computed on first use (``StepInfo.expert``)
        return lambda: torch.cat([part() if callable(part) else part for part in parts])
    first = parts[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(parts)
    if dataclasses.is_dataclass(first):
        return type(first)(
            **{f.name: concat_batches([getattr(p, f.name) for p in parts]) for f in dataclasses.fields(first)}
        )
    if isinstance(first, tuple) and hasattr(first, "_fields"):
        return type(first)(*(concat_batches(list(items)) for items in zip(*parts, strict=True)))
    raise TypeError(f"cannot concatenate {type(first).__name__}")


class MixedEnv(BatchedWaypointEnv):
    """``BatchedWaypointEnv`` over named sub-environments, e.g. toy and MetaDrive worlds together.

    ``groups`` maps each name to its slice of the batch, for per-environment metrics. A reset
    with ``seed`` gives the ``k``-th environment ``seed + start_k``, so world ``i`` gets seed
    ``seed + i`` as the protocol asks; after that each environment hands out its own next seeds.
    """

    def __init__(self, envs: list[tuple[str, BatchedWaypointEnv]]) -> None:
        if len(envs) < 2:
            raise ValueError("MixedEnv needs at least two environments")
        self.names = [name for name, _ in envs]
        self.envs = [env for _, env in envs]
        self.spec = _common_spec(envs)
        self.device = self.envs[0].device
        self.num_envs = sum(env.num_envs for env in self.envs)
        starts = [0]
        for env in self.envs:
            starts.append(starts[-1] + env.num_envs)
        self.groups = {name: slice(a, b) for name, a, b in zip(self.names, starts, starts[1:], strict=False)}

    def reset(self, seed: int | None = None) -> Observation:
        parts = [
            env.reset(None if seed is None else seed + group.start)
            for env, group in zip(self.envs, self.groups.values(), strict=True)
        ]
        return concat_batches(parts)

    def step(self, waypoints: torch.Tensor) -> StepResult:
        results = [
            env.step(waypoints[group]) for env, group in zip(self.envs, self.groups.values(), strict=True)
        ]
        return concat_batches(results)

    def expert_waypoints(self) -> torch.Tensor:
        return torch.cat([env.expert_waypoints() for env in self.envs])

    def set_difficulty(self, difficulty: float) -> bool:
        """Forwarded to every environment; those without a difficulty ignore it. True when one has one."""
        applied = [env.set_difficulty(difficulty) for env in self.envs]
        return any(applied)

    def state_dict(self) -> dict[str, torch.Tensor] | None:
        """Every environment's state, or ``None`` when one cannot save it (the run re-seeds)."""
        states = [env.state_dict() for env in self.envs]
        if any(state is None for state in states):
            return None
        return {
            f"{name}/{key}": value
            for name, state in zip(self.names, states, strict=True)
            for key, value in state.items()
        }

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Observation:
        parts = []
        for name, env in zip(self.names, self.envs, strict=True):
            prefix = f"{name}/"
            parts.append(
                env.load_state_dict({k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)})
            )
        return concat_batches(parts)

    def close(self) -> None:
        for env in self.envs:
            env.close()


def _common_spec(envs: list[tuple[str, BatchedWaypointEnv]]) -> EnvSpec:
    first_name, first = envs[0]
    keys = ("bev_shape", "state_dim", "num_waypoints", "waypoint_dt", "policy_dt")
    for name, env in envs[1:]:
        for key in keys:
            if getattr(env.spec, key) != getattr(first.spec, key):
                raise UserError(
                    f"--env mix: {name} has {key} {getattr(env.spec, key)} but {first_name} has "
                    f"{getattr(first.spec, key)}; one policy cannot drive both"
                )
        if env.device != first.device:
            raise UserError(f"--env mix: {name} is on {env.device} but {first_name} on {first.device}")
    longest = max(env.spec.max_episode_steps for _, env in envs)
    shortest = min(env.spec.steps_between_truncations for _, env in envs)
    return dataclasses.replace(first.spec, max_episode_steps=longest, shortest_time_limit=shortest)
