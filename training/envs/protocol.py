"""The environment protocol every driving environment meets (toy world, MetaDrive, CARLA).

One object holds ``num_envs`` worlds and speaks batched torch tensors on ``env.device``,
as GPU-vectorised simulators (ManiSkill, Isaac Lab) do.

Conventions
-----------
* Observation: ``bev`` uint8 ``[N, C, H, W]`` (bird's-eye raster, ego near the bottom centre
  facing up, channel ``c`` is 0 or 255) and ``state`` float32 ``[N, S]`` (ego state).
* Action: ``waypoints`` float32 ``[N, K, 2]``: the ego's planned positions at times
  ``waypoint_dt, 2 * waypoint_dt, ..., K * waypoint_dt`` seconds ahead, in metres, in the ego
  frame at the moment of the observation (x forward, y left).
* Scenario seeds: ``reset(seed)`` gives world ``i`` the scenario seed ``seed + i``; every later
  episode takes the next unused seed ``seed + num_envs + j`` in the order the worlds finish
  (ties by world index). A scenario (road, obstacles, traffic, start state) depends only on its
  seed, never on the device or on the other worlds, so two policies can be compared on
  exactly the same scenarios.
* Autoreset: a world whose episode ends in ``step`` starts its next episode within the same
  call. The returned observation is the new episode's first one; the finished episode's
  last observation is ``info.final_observation`` and its statistics are ``info.episode``.
* Terminated (collision, off-road, goal reached) and truncated (time limit) are different:
  a learner bootstraps the value of ``info.final_observation`` through a truncation, never
  through a termination.

Optional members
----------------
What an environment may offer beyond the core is declared on :class:`BatchedWaypointEnv` too,
with a default that says "not offered" (``None`` or ``False``). An environment subclasses the
protocol to inherit those defaults and overrides what it offers, so a caller asks the member
and reads its answer instead of probing with ``hasattr``:

* ``state_dict()`` / ``load_state_dict(state)``: save and restore every world exactly, so a
  resumed training run continues as if never stopped (the toy world). ``None``: the run re-seeds
  the worlds on fresh scenarios on resume.
* ``set_difficulty(level)``: ``level`` in [0, 1] changes the scenarios generated from then on (a
  training curriculum uses it); ``False``: this environment has no difficulty.
* ``ego_pose()``: the ego poses, for drawing episodes; ``None``: unknown.
* ``route_xy_for_seeds(seeds)``: the route centre lines of scenarios, for drawing; ``None``: unknown.
* ``groups``: a mix of environments names each one's slice of the batch (per-environment
  metrics); ``None``: one environment.
* ``asynchronous`` with ``send(worlds, waypoints)`` / ``recv()``: worlds that step apart. ``send``
  starts some worlds stepping and returns at once; ``recv`` waits for at least one and returns
  every world done by then with its rows of a ``StepResult`` (``WorldsStepped``), so a fast world
  never waits for a slow one (a simulator with a process per world). ``step`` still steps all.
  Scenario seeds then follow each world: world ``i`` plays ``seed + i``, ``seed + i + N``,
  ``seed + i + 2N``, ... (the order worlds finish in would depend on timing). ``False``: no.
* ``collision_reports()``: for the episodes finished so far that ended in a collision, by scenario
  seed, what the ego touched and which of the two was moving into the other (MetaDrive, whose
  traffic never yields); ``None``: not offered.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol, runtime_checkable

import torch

Tensor = torch.Tensor

# Who closed the gap of a collision, in ``collision_reports()``: the ego moving into the other object,
# the ego standing while the other came, or the other moving into the ego faster.
CLOSED_BY = ("ego", "ego standing", "other")

__all__ = [
    "CLOSED_BY",
    "BatchedWaypointEnv",
    "EnvSpec",
    "EpisodeStats",
    "Observation",
    "StepInfo",
    "StepResult",
    "WorldsStepped",
]


@dataclass(frozen=True)
class EnvSpec:
    """Static shapes and timing of an environment; the SFT model is built to match it."""

    bev_shape: tuple[int, int, int]  # (C, H, W)
    state_dim: int  # S
    num_waypoints: int  # K
    waypoint_dt: float  # seconds between consecutive waypoints
    policy_dt: float  # seconds of simulated time per ``step``
    max_episode_steps: int  # policy steps before truncation
    bev_channels: tuple[str, ...]  # meaning of each BEV channel
    state_names: tuple[str, ...]  # meaning of each state entry
    # A mix's worlds have different limits: ``max_episode_steps`` is the longest (it bounds an
    # episode), this the shortest (it bounds how often a world can truncate); None: the same.
    shortest_time_limit: int | None = None

    @property
    def steps_between_truncations(self) -> int:
        """The fewest policy steps after which a world can truncate again."""
        return self.shortest_time_limit or self.max_episode_steps

    def to_dict(self) -> dict[str, object]:
        return {
            "bev_shape": list(self.bev_shape),
            "state_dim": self.state_dim,
            "num_waypoints": self.num_waypoints,
            "waypoint_dt": self.waypoint_dt,
            "policy_dt": self.policy_dt,
            "max_episode_steps": self.max_episode_steps,
            "bev_channels": list(self.bev_channels),
            "state_names": list(self.state_names),
        }


@dataclass
class Observation:
    """A batch of observations, all tensors on the environment's device."""

    bev: Tensor  # uint8 [N, C, H, W]
    state: Tensor  # float32 [N, S]

    def index(self, mask_or_index: Tensor) -> Observation:
        return Observation(self.bev[mask_or_index], self.state[mask_or_index])


@dataclass
class EpisodeStats:
    """Statistics of the episodes that ended in a ``step``; entries are valid where ``done``.

    ``mean_abs_lateral_m`` is the mean absolute distance from the route centre line;
    ``mean_abs_jerk`` (m/s^3) and ``mean_abs_steer_rate`` (rad/s) measure comfort.
    """

    done: Tensor  # bool [N]: the episode of world i ended in this step
    episode_return: Tensor  # float [N]
    length: Tensor  # int64 [N], policy steps
    route_completion: Tensor  # float [N] in [0, 1]
    collision: Tensor  # bool [N]
    off_road: Tensor  # bool [N]
    goal_reached: Tensor  # bool [N]
    mean_abs_lateral_m: Tensor  # float [N]
    mean_abs_jerk: Tensor  # float [N]
    mean_abs_steer_rate: Tensor  # float [N]
    scenario_seed: Tensor  # int64 [N]


@dataclass
class StepInfo:
    """What a ``step`` reports besides observation, reward and end flags.

    ``expert_waypoints`` [N, K, 2] is the expert's plan for the *returned* observation (after
    autoreset), so that ADE/FDE can compare it with the next action. An environment passes it
    as ``expert``: the tensor, or a function of no arguments that computes it on first use (a
    trainer never reads it, so the toy world does not plan for the expert at every step).
    ``final_observation`` holds, for worlds where ``episode.done``, the last observation of the
    finished episode (for bootstrapping a truncation); elsewhere it equals the returned
    observation.
    """

    expert: Tensor | Callable[[], Tensor]
    final_observation: Observation
    episode: EpisodeStats
    lateral_deviation_m: Tensor  # float [N], signed distance from the route centre line, left > 0
    speed_mps: Tensor  # float [N]
    ego_pose: Tensor  # float [N, 3]: x, y (metres), yaw (rad) in the world frame, returned obs

    @functools.cached_property
    def expert_waypoints(self) -> Tensor:
        return self.expert if isinstance(self.expert, Tensor) else self.expert()


class StepResult(NamedTuple):
    obs: Observation
    reward: Tensor  # float32 [N]
    terminated: Tensor  # bool [N]
    truncated: Tensor  # bool [N]
    info: StepInfo


class WorldsStepped(NamedTuple):
    """What ``recv`` returns: the worlds that stepped (ascending indices) and their rows, in that order."""

    worlds: list[int]
    result: StepResult


@runtime_checkable
class BatchedWaypointEnv(Protocol):
    """A batch of ``num_envs`` driving worlds that execute waypoint plans.

    Implementations subclass it (``class ToyWaypointEnv(BatchedWaypointEnv)``) to inherit the
    defaults of the optional members below.
    """

    num_envs: int
    device: torch.device
    spec: EnvSpec
    # Optional: a mix's slice of the batch per environment name (``MixedEnv``); None: one environment.
    groups: dict[str, slice] | None = None
    # Optional: worlds that step apart through ``send`` / ``recv``; False: ``step`` only.
    asynchronous: bool = False

    def reset(self, seed: int | None = None) -> Observation:
        """Start a fresh episode in every world; world ``i`` gets scenario seed ``seed + i``."""
        ...

    def step(self, waypoints: Tensor) -> StepResult:
        """Track ``waypoints`` ``[N, K, 2]`` (metres, ego frame) for ``spec.policy_dt`` seconds."""
        ...

    def expert_waypoints(self) -> Tensor:
        """The expert's plan ``[N, K, 2]`` from each world's current state."""
        ...

    def close(self) -> None:
        """Release simulator resources (a no-op for in-process worlds)."""
        ...

    # --- optional members: the defaults say "not offered" ----------------------------------------

    def state_dict(self) -> dict[str, Tensor] | None:
        """Every world's state (CPU tensors) for an exact resume; ``None``: this environment cannot
        save it, and a resumed run re-seeds its worlds on fresh scenarios."""
        return None

    def load_state_dict(self, state: dict[str, Tensor]) -> Observation:
        """Restore what :meth:`state_dict` returned; returns the observation to act on next."""
        raise NotImplementedError(f"{type(self).__name__} cannot restore a saved state")

    def set_difficulty(self, level: float) -> bool:
        """Scenarios generated from now on use difficulty ``level`` in [0, 1]; returns whether this
        environment has a difficulty (``False``: it has none, and nothing changed)."""
        return False

    def ego_pose(self) -> Tensor | None:
        """Ego poses ``[N, 3]`` (x, y in metres, yaw in rad, world frame); ``None``: unknown."""
        return None

    def send(self, worlds: Sequence[int], waypoints: Tensor) -> None:
        """Start stepping ``worlds`` with plans ``[len(worlds), K, 2]``, no wait (``asynchronous`` only)."""
        raise NotImplementedError(f"{type(self).__name__} steps its worlds together: use step()")

    def recv(self) -> WorldsStepped:
        """The worlds sent that have stepped by now (waits for one at least; ``asynchronous`` only)."""
        raise NotImplementedError(f"{type(self).__name__} steps its worlds together: use step()")

    def collision_reports(self) -> dict[int, dict[str, Any]] | None:
        """Each collision of the episodes finished so far (the latest episode of a seed), by
        scenario seed: its ``closed_by`` (one of ``CLOSED_BY``) and what was touched; ``None``: this
        environment does not tell."""
        return None

    def route_xy_for_seeds(self, seeds: Sequence[int]) -> Tensor | None:
        """Route centre lines ``[M, P, 2]`` (world frame, m) of the scenarios with these seeds, for
        drawing; ``None``: this environment cannot tell."""
        return None
