"""Deterministic closed-loop evaluation of a waypoint policy on a batched environment.

``num_episodes`` scenarios, seeds ``seed .. seed + num_episodes - 1``: world ``i`` of ``reset(seed)``
plays ``seed + i``, and a world whose episode ends goes on with the next seed, in the protocol's
autoreset order, while the others drive on (with few worlds, as a simulator with a process per
world has, waiting for the slowest episode of each batch of worlds cost a quarter to a third of a
MetaDrive evaluation's steps). Episodes started beyond the last seed are played but not counted. Two
policies evaluated with the same seed drive exactly the same scenarios, and their per-episode
records pair up by ``scenario_seed``.

Per-episode record (a dict of plain Python numbers):
    scenario_seed (int), ade, fde (m, means over the episode's policy steps of the displacement
    error between the policy's plan and the expert's plan for the same observation),
    episode_return, length (policy steps), route_completion ([0, 1]), collision, off_road,
    goal_reached, failure (collision or off-road) (0/1 ints), mean_abs_lateral_m (m), mean_abs_jerk (m/s^3),
    mean_abs_steer_rate (rad/s), nonfinite_actions (steps whose plan held a NaN/inf).

Per-step errors (``ClosedLoopResult.step_errors``, one numpy array ``[T, 2]`` per episode, in the
records' order): each policy step's ADE and FDE (NaN where the plan was not finite), for measures
over the steps two policies both drive (``eval.metrics.add_shared_window_errors``).

Trajectory (for the first ``record_trajectories`` episodes; numpy arrays, T = episode length):
    scenario_seed (int), ego_pose [T, 3] (x, y metres, yaw rad, world frame, at each observation
    the policy acted on; row 0 is NaN unless the env has an ``ego_pose()`` method),
    policy_waypoints_ego / expert_waypoints_ego [T, K, 2] (metres, ego frame),
    policy_waypoints_world / expert_waypoints_world [T, K, 2] (metres, world frame; NaN where the
    pose is unknown).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from eval.metrics import displacement_errors
from training.envs.protocol import CLOSED_BY, BatchedWaypointEnv, EpisodeStats, Observation

Tensor = torch.Tensor

# Episode statistics copied from ``info.episode`` into each record, with their Python type.
_EPISODE_FIELDS: tuple[tuple[str, type], ...] = (
    ("episode_return", float),
    ("length", int),
    ("route_completion", float),
    ("collision", int),
    ("off_road", int),
    ("goal_reached", int),
    ("mean_abs_lateral_m", float),
    ("mean_abs_jerk", float),
    ("mean_abs_steer_rate", float),
    ("scenario_seed", int),
)

# Steps between checks (one device sync each) of whether every counted episode has finished.
_DONE_CHECK_INTERVAL = 8


@dataclass
class ClosedLoopResult:
    """What :func:`run_closed_loop` returns (see the module docstring for the formats)."""

    episodes: list[dict[str, Any]]
    trajectories: list[dict[str, Any]] = field(default_factory=list)
    step_errors: list[np.ndarray] = field(default_factory=list)  # per episode, [T, 2]: ADE, FDE
    wall_time_s: float = 0.0
    env_steps: int = 0  # world-steps simulated, including those of episodes not counted
    nonfinite_actions: int = 0  # policy steps (within counted episodes) with a NaN/inf waypoint


# Worlds simulated at once by default; a world that finishes goes on to the next scenario.
MAX_WORLDS = 256


def ego_to_world(waypoints_ego: Tensor, pose: Tensor) -> Tensor:
    """Waypoints ``[..., K, 2]`` in the ego frame (x forward, y left) to the world frame.

    ``pose`` ``[..., 3]`` is the ego's (x, y, yaw) in the world frame, metres and radians.
    """
    cos = torch.cos(pose[..., 2]).unsqueeze(-1)
    sin = torch.sin(pose[..., 2]).unsqueeze(-1)
    x, y = waypoints_ego[..., 0], waypoints_ego[..., 1]
    world_x = pose[..., 0].unsqueeze(-1) + cos * x - sin * y
    world_y = pose[..., 1].unsqueeze(-1) + sin * x + cos * y
    return torch.stack((world_x, world_y), dim=-1)


def _initial_pose(env: BatchedWaypointEnv) -> Tensor:
    """The ego poses after ``reset`` when the env can tell them (optional ``ego_pose()``), else NaN."""
    pose = env.ego_pose()
    if pose is None:
        return torch.full((env.num_envs, 3), math.nan, device=env.device)
    return pose.to(torch.float32)


class _Tally:
    """Which episode each world plays (``slot``: episode ``j`` is scenario ``seed + j``), the running
    sums of those episodes, and the finished episodes' records in tensors of ``n + 1`` entries: the
    last one takes the writes of worlds whose episode is not one of the ``n`` (no host sync)."""

    def __init__(self, env: BatchedWaypointEnv, seed: int, num_episodes: int) -> None:
        n, device = num_episodes, env.device
        worlds = env.num_envs
        self.n, self.seed = n, seed
        self.slot = torch.arange(worlds, device=device)
        self.next_slot = torch.tensor(worlds, device=device)
        self.wrong_seeds = torch.zeros((), dtype=torch.int64, device=device)
        self.ade_sum = torch.zeros(worlds, dtype=torch.float64, device=device)
        self.fde_sum = torch.zeros(worlds, dtype=torch.float64, device=device)
        self.finite_steps = torch.zeros(worlds, dtype=torch.int64, device=device)
        self.nonfinite_steps = torch.zeros(worlds, dtype=torch.int64, device=device)
        self.step_in_episode = torch.zeros(worlds, dtype=torch.int64, device=device)
        self.max_steps = env.spec.max_episode_steps
        # every counted episode's per-step ADE and FDE; row n takes the writes of the uncounted ones
        self.step_errors = torch.full((n + 1, self.max_steps, 2), math.nan, device=device)
        self.finished = torch.zeros(n + 1, dtype=torch.bool, device=device)
        self.records: dict[str, Tensor] = {}

    def add_step(self, waypoints: Tensor, expert: Tensor) -> None:
        ade, fde = displacement_errors(waypoints, expert)
        finite = torch.isfinite(ade) & torch.isfinite(fde)
        row = self.slot.clamp(max=self.n)
        column = self.step_in_episode.clamp(max=self.max_steps - 1)
        errors = torch.stack((ade, fde), dim=-1).to(torch.float32)
        self.step_errors[row, column] = torch.where(finite.unsqueeze(-1), errors, math.nan)
        self.step_in_episode += 1
        self.ade_sum += torch.where(finite, ade.to(torch.float64), 0.0)
        self.fde_sum += torch.where(finite, fde.to(torch.float64), 0.0)
        self.finite_steps += finite.to(torch.int64)
        self.nonfinite_steps += (~finite).to(torch.int64)

    def finish(self, episode: EpisodeStats) -> None:
        """Record the episodes that ended in this step; their worlds take the next seeds, in world
        order (the protocol's autoreset)."""
        done, slot = episode.done, self.slot
        self.wrong_seeds += (done & (episode.scenario_seed != self.seed + slot)).sum()
        target = torch.where(done & (slot < self.n), slot, self.n)
        steps = self.finite_steps.clamp(min=1).to(torch.float64)
        values = {name: getattr(episode, name) for name, _ in _EPISODE_FIELDS}
        values["ade"] = torch.where(self.finite_steps > 0, self.ade_sum / steps, math.nan)
        values["fde"] = torch.where(self.finite_steps > 0, self.fde_sum / steps, math.nan)
        values["nonfinite_actions"] = self.nonfinite_steps
        for name, value in values.items():
            if name not in self.records:
                self.records[name] = torch.zeros(self.n + 1, dtype=value.dtype, device=value.device)
            self.records[name].scatter_(0, target, value)
        self.finished.scatter_(0, target, done)
        per_episode = (
            self.ade_sum,
            self.fde_sum,
            self.finite_steps,
            self.nonfinite_steps,
            self.step_in_episode,
        )
        for running in per_episode:
            running.masked_fill_(done, 0)
        self.slot = torch.where(done, self.next_slot + torch.cumsum(done, 0) - 1, slot)
        self.next_slot = self.next_slot + done.sum()

    def all_finished(self) -> bool:
        return bool(self.finished[: self.n].all())

    def episodes(self, steps: int) -> list[dict[str, Any]]:
        """The ``n`` records in scenario-seed order, after ``steps`` steps (RuntimeError when the env
        broke the protocol's seed order or an episode has not finished)."""
        if int(self.wrong_seeds):
            raise RuntimeError("the environment's autoreset does not hand out the protocol's scenario seeds")
        unfinished = int((~self.finished[: self.n]).sum())
        if unfinished:
            raise RuntimeError(f"{unfinished} episode(s) did not finish within {steps} steps")
        columns = {name: values[: self.n].cpu().tolist() for name, values in self.records.items()}
        episodes: list[dict[str, Any]] = []
        for j in range(self.n):
            record: dict[str, Any] = {"scenario_seed": self.seed + j}
            record["ade"], record["fde"] = float(columns["ade"][j]), float(columns["fde"][j])
            for name, kind in _EPISODE_FIELDS:
                record[name] = kind(columns[name][j])
            record["failure"] = int(bool(record["collision"] or record["off_road"]))
            record["nonfinite_actions"] = int(columns["nonfinite_actions"][j])
            episodes.append(record)
        return episodes

    def step_error_arrays(self, episodes: list[dict[str, Any]]) -> list[np.ndarray]:
        """Each episode's per-step ADE and FDE, ``[length, 2]`` float64."""
        errors = self.step_errors[: self.n].cpu().numpy().astype(np.float64)
        return [errors[j, : episode["length"]] for j, episode in enumerate(episodes)]


class _Recording:
    """Every step's poses and plans of all worlds, with the episode each world was playing, for
    drawing the first ``count`` episodes; episode ``j`` is the steps in which a world played it."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.slots: list[Tensor] = []
        self.poses: list[Tensor] = []
        self.policy: list[Tensor] = []
        self.expert: list[Tensor] = []

    def add(self, slot: Tensor, pose: Tensor, waypoints: Tensor, expert: Tensor) -> None:
        if self.count:
            self.slots.append(slot)
            self.poses.append(pose.to(torch.float32).clone())
            self.policy.append(waypoints.to(torch.float32).clone())
            self.expert.append(expert.to(torch.float32).clone())

    def trajectories(self, episodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
        if not self.count:
            return []
        slot_np = torch.stack(self.slots).cpu().numpy()  # [T, N]
        pose_t, policy_t, expert_t = (torch.stack(rows) for rows in (self.poses, self.policy, self.expert))
        trajectories: list[dict[str, Any]] = []
        for j in range(self.count):
            steps, worlds = np.nonzero(slot_np == j)
            rows = torch.as_tensor(steps[: episodes[j]["length"]], device=pose_t.device)
            world = int(worlds[0])
            pose, policy, expert = pose_t[rows, world], policy_t[rows, world], expert_t[rows, world]
            as_numpy = lambda t: t.cpu().numpy().astype(np.float64)  # noqa: E731
            trajectories.append(
                {
                    "scenario_seed": episodes[j]["scenario_seed"],
                    "ego_pose": as_numpy(pose),
                    "policy_waypoints_ego": as_numpy(policy),
                    "expert_waypoints_ego": as_numpy(expert),
                    "policy_waypoints_world": as_numpy(ego_to_world(policy, pose)),
                    "expert_waypoints_world": as_numpy(ego_to_world(expert, pose)),
                }
            )
        return trajectories


def run_closed_loop(
    env: BatchedWaypointEnv,
    policy_fn: Callable[[Observation], Tensor],
    seed: int,
    num_episodes: int,
    record_trajectories: int = 0,
) -> ClosedLoopResult:
    """Drive ``num_episodes`` scenarios (seeds ``seed .. seed + num_episodes - 1``) with a policy.

    Args:
        env: a batched environment. ``reset(seed)`` starts world ``i`` on scenario ``seed + i`` and
            a world whose episode ends goes on with the next unused seed (the protocol's autoreset
            order), so with more episodes than worlds no world waits for another's episode to end.
            The episodes started beyond the last seed are played but not counted. An env that
            hands out other seeds is refused (RuntimeError).
        policy_fn: maps an observation batch to waypoints ``[N, K, 2]`` (metres, ego frame) on
            ``env.device``; it should be deterministic. Non-finite plans are counted and still
            passed to the env (which handles them); they are left out of ADE/FDE.
        seed: scenario seed of the first episode.
        num_episodes: number of episodes (one per scenario seed).
        record_trajectories: keep poses and plans of the first this-many episodes for drawing.

    Returns:
        A :class:`ClosedLoopResult` with one record per episode, in scenario-seed order.
    """
    if num_episodes < 1:
        raise ValueError(f"num_episodes must be positive, got {num_episodes}")
    start = time.perf_counter()
    worlds = env.num_envs
    tally = _Tally(env, seed, num_episodes)
    recording = _Recording(max(0, min(record_trajectories, num_episodes)))
    env_steps = 0
    with torch.inference_mode():
        obs = env.reset(seed=seed)
        expert = env.expert_waypoints()
        pose = _initial_pose(env)
        max_steps = math.ceil(num_episodes / worlds) * env.spec.max_episode_steps
        for step in range(max_steps):
            waypoints = policy_fn(obs)
            tally.add_step(waypoints, expert)
            recording.add(tally.slot, pose, waypoints, expert)
            obs, _reward, _terminated, _truncated, info = env.step(waypoints)
            env_steps += worlds
            expert = info.expert_waypoints
            pose = info.ego_pose
            tally.finish(info.episode)
            if (step + 1) % _DONE_CHECK_INTERVAL == 0 and tally.all_finished():
                break
    episodes = tally.episodes(step + 1)
    return ClosedLoopResult(
        episodes=episodes,
        trajectories=recording.trajectories(episodes),
        step_errors=tally.step_error_arrays(episodes),
        wall_time_s=time.perf_counter() - start,
        env_steps=env_steps,
        nonfinite_actions=sum(e["nonfinite_actions"] for e in episodes),
    )


def collisions_closed_by(
    reports: dict[int, dict[str, Any]] | None, episodes: list[dict[str, Any]]
) -> dict[str, int] | None:
    """How many of ``episodes``' collisions the ego closed the gap of, stood in, or had the other
    party close, from an env's ``collision_reports()`` ("not found" where it had none for the
    seed); None when the environment does not tell."""
    if reports is None:
        return None
    counts = dict.fromkeys((*CLOSED_BY, "not found"), 0)
    for episode in episodes:
        if episode["collision"]:
            report = reports.get(episode["scenario_seed"])
            counts[report["closed_by"] if report else "not found"] += 1
    return counts
