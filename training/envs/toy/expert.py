"""The expert: follow the route centre line at the curvature-limited target speed.

The plan starts from the ego's *current* state, so it also shows how to recover from a drift:
the lateral offset decays as a critically damped motion with time constant
``expert_recovery_time_s``, and the speed moves towards the target speed within the expert's
acceleration limits.
"""

from __future__ import annotations

import math

import torch

from training.envs.toy.config import ToyWorldConfig
from training.envs.toy.dynamics import world_to_ego
from training.envs.toy.scenario import frenet_to_world, interpolate_profile


def expert_plan(
    route_xy: torch.Tensor,
    route_heading: torch.Tensor,
    target_speed: torch.Tensor,
    pose: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    speed: torch.Tensor,
    frenet: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    cfg: ToyWorldConfig,
) -> torch.Tensor:
    """Expert waypoints ``[N, K, 2]`` in the ego frame (metres; x forward, y left).

    Args:
        pose: rear-axle ``x``, ``y``, ``yaw`` ``[N]`` in the world frame.
        speed: current speed ``[N]`` (m/s).
        frenet: arc length ``s``, lateral offset ``d`` and route heading at the rear axle ``[N]``.
    """
    x, y, yaw = pose
    s0, d0, road_heading = frenet
    dt = cfg.waypoint_dt
    tau = cfg.expert_recovery_time_s
    heading_error = torch.atan2(torch.sin(yaw - road_heading), torch.cos(yaw - road_heading))
    lateral_rate = speed * torch.sin(heading_error)

    s_points, d_points = [], []
    s, v = s0, speed
    for k in range(1, cfg.num_waypoints + 1):
        look = s + v * dt
        v_target = interpolate_profile(target_speed, look[:, None], cfg)[:, 0]
        v_next = torch.minimum(torch.maximum(v_target, v - cfg.expert_decel * dt), v + cfg.expert_accel * dt)
        v_next = v_next.clamp_min(0.0)
        s = s + 0.5 * (v + v_next) * dt
        v = v_next
        t = k * dt
        d = (d0 + (lateral_rate + d0 / tau) * t) * math.exp(-t / tau)
        s_points.append(s)
        d_points.append(d)
    s_all = torch.stack(s_points, dim=1)
    d_all = torch.stack(d_points, dim=1)
    world, _ = frenet_to_world(route_xy, route_heading, s_all, d_all, cfg)
    return world_to_ego(world, x, y, yaw)
