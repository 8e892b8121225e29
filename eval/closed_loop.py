"""Deterministic closed-loop evaluation of a waypoint policy on a batched environment.

Each world plays exactly one episode (its first after ``reset``); the episodes that autoreset
starts afterwards are masked out. World ``i`` of ``reset(seed)`` plays scenario seed ``seed + i``,
so two policies evaluated with the same seed drive exactly the same scenarios and their
per-episode records pair up by ``scenario_seed``.

Per-episode record (a dict of plain Python numbers):
    scenario_seed (int), ade, fde (m, means over the episode's policy steps of the displacement
    error between the policy's plan and the expert's plan for the same observation),
    episode_return, length (policy steps), route_completion ([0, 1]), collision, off_road,
    goal_reached, failure (collision or off-road) (0/1 ints), mean_abs_lateral_m (m), mean_abs_jerk (m/s^3),
    mean_abs_steer_rate (rad/s), nonfinite_actions (steps whose plan held a NaN/inf).

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
from training.envs.protocol import BatchedWaypointEnv, Observation

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

# Steps between checks (one device sync each) of whether every world has finished its episode.
_DONE_CHECK_INTERVAL = 8


@dataclass
class ClosedLoopResult:
    """What :func:`run_closed_loop` returns (see the module docstring for the formats)."""

    episodes: list[dict[str, Any]]
    trajectories: list[dict[str, Any]] = field(default_factory=list)
    wall_time_s: float = 0.0
    env_steps: int = 0  # world-steps simulated, including masked-out ones
    nonfinite_actions: int = 0  # policy steps (within counted episodes) with a NaN/inf waypoint


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


def _run_chunk(
    env: BatchedWaypointEnv,
    policy_fn: Callable[[Observation], Tensor],
    seed: int,
    num_worlds: int,
    num_record: int,
) -> tuple[list[dict[str, Any]], list[dict[str, Any]], int]:
    """Play the first episode of the first ``num_worlds`` worlds of ``env.reset(seed)``."""
    device = env.device
    n = env.num_envs
    obs = env.reset(seed=seed)
    expert = env.expert_waypoints()
    active = torch.arange(n, device=device) < num_worlds  # first episode still running
    ade_sum = torch.zeros(n, dtype=torch.float64, device=device)
    fde_sum = torch.zeros(n, dtype=torch.float64, device=device)
    finite_steps = torch.zeros(n, dtype=torch.int64, device=device)
    nonfinite_steps = torch.zeros(n, dtype=torch.int64, device=device)
    captured: dict[str, Tensor] | None = None

    record = num_record > 0
    pose = _initial_pose(env)[:num_record] if record else None
    poses: list[Tensor] = []
    policy_plans: list[Tensor] = []
    expert_plans: list[Tensor] = []

    env_steps = 0
    for step in range(env.spec.max_episode_steps):
        waypoints = policy_fn(obs)
        ade, fde = displacement_errors(waypoints, expert)
        finite = torch.isfinite(ade) & torch.isfinite(fde)
        counted = active & finite
        ade_sum += torch.where(counted, ade.to(torch.float64), 0.0)
        fde_sum += torch.where(counted, fde.to(torch.float64), 0.0)
        finite_steps += counted.to(torch.int64)
        nonfinite_steps += (active & ~finite).to(torch.int64)
        if record:
            poses.append(pose)
            policy_plans.append(waypoints[:num_record].to(torch.float32).clone())
            expert_plans.append(expert[:num_record].to(torch.float32).clone())

        obs, _reward, _terminated, _truncated, info = env.step(waypoints)
        env_steps += n
        expert = info.expert_waypoints
        if record:
            pose = info.ego_pose[:num_record].to(torch.float32).clone()

        ep = info.episode
        newly_done = active & ep.done
        values = {name: getattr(ep, name) for name, _ in _EPISODE_FIELDS}
        if captured is None:
            captured = {name: torch.zeros_like(v) for name, v in values.items()}
        for name, value in values.items():
            captured[name] = torch.where(newly_done, value, captured[name])
        active = active & ~ep.done
        if (step + 1) % _DONE_CHECK_INTERVAL == 0 and not bool(active.any()):
            break
    if bool(active.any()):
        raise RuntimeError(
            f"{int(active.sum())} world(s) did not finish their episode within "
            f"spec.max_episode_steps={env.spec.max_episode_steps} steps"
        )

    assert captured is not None
    stats = {name: captured[name][:num_worlds].cpu().tolist() for name, _ in _EPISODE_FIELDS}
    steps = finite_steps[:num_worlds].clamp(min=1).to(torch.float64)
    ade_mean = torch.where(finite_steps[:num_worlds] > 0, ade_sum[:num_worlds] / steps, math.nan)
    fde_mean = torch.where(finite_steps[:num_worlds] > 0, fde_sum[:num_worlds] / steps, math.nan)
    ade_list, fde_list = ade_mean.cpu().tolist(), fde_mean.cpu().tolist()
    nonfinite_list = nonfinite_steps[:num_worlds].cpu().tolist()

    episodes: list[dict[str, Any]] = []
    for i in range(num_worlds):
        record_i: dict[str, Any] = {
            "scenario_seed": int(stats["scenario_seed"][i]),
            "ade": float(ade_list[i]),
            "fde": float(fde_list[i]),
        }
        for name, kind in _EPISODE_FIELDS:
            if name != "scenario_seed":
                record_i[name] = kind(stats[name][i])
        record_i["failure"] = int(bool(record_i["collision"] or record_i["off_road"]))
        record_i["nonfinite_actions"] = int(nonfinite_list[i])
        episodes.append(record_i)

    trajectories: list[dict[str, Any]] = []
    if record:
        pose_t = torch.stack(poses, dim=1)  # [R, T, 3]
        policy_t = torch.stack(policy_plans, dim=1)  # [R, T, K, 2]
        expert_t = torch.stack(expert_plans, dim=1)
        policy_world = ego_to_world(policy_t, pose_t).cpu().numpy()
        expert_world = ego_to_world(expert_t, pose_t).cpu().numpy()
        pose_np, policy_np, expert_np = pose_t.cpu().numpy(), policy_t.cpu().numpy(), expert_t.cpu().numpy()
        for i in range(num_record):
            length = episodes[i]["length"]
            trajectories.append(
                {
                    "scenario_seed": episodes[i]["scenario_seed"],
                    "ego_pose": pose_np[i, :length].astype(np.float64),
                    "policy_waypoints_ego": policy_np[i, :length].astype(np.float64),
                    "expert_waypoints_ego": expert_np[i, :length].astype(np.float64),
                    "policy_waypoints_world": policy_world[i, :length].astype(np.float64),
                    "expert_waypoints_world": expert_world[i, :length].astype(np.float64),
                }
            )
    return episodes, trajectories, env_steps


def run_closed_loop(
    env: BatchedWaypointEnv,
    policy_fn: Callable[[Observation], Tensor],
    seed: int,
    num_episodes: int,
    record_trajectories: int = 0,
) -> ClosedLoopResult:
    """Drive ``num_episodes`` scenarios (seeds ``seed .. seed + num_episodes - 1``) with a policy.

    Args:
        env: a batched environment; when ``num_episodes`` exceeds ``env.num_envs`` the episodes
            are played in chunks of ``env.num_envs`` worlds, chunk ``c`` resetting with seed
            ``seed + c * env.num_envs`` (so the scenario seeds stay consecutive).
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
    record_trajectories = max(0, min(record_trajectories, num_episodes))
    start = time.perf_counter()
    episodes: list[dict[str, Any]] = []
    trajectories: list[dict[str, Any]] = []
    env_steps = 0
    with torch.inference_mode():
        for offset in range(0, num_episodes, env.num_envs):
            num_worlds = min(env.num_envs, num_episodes - offset)
            num_record = max(0, min(num_worlds, record_trajectories - offset))
            chunk_eps, chunk_traj, chunk_steps = _run_chunk(
                env, policy_fn, seed + offset, num_worlds, num_record
            )
            episodes.extend(chunk_eps)
            trajectories.extend(chunk_traj)
            env_steps += chunk_steps
    return ClosedLoopResult(
        episodes=episodes,
        trajectories=trajectories,
        wall_time_s=time.perf_counter() - start,
        env_steps=env_steps,
        nonfinite_actions=sum(e["nonfinite_actions"] for e in episodes),
    )
