"""Kinematic bicycle (reference point: the rear axle) and the waypoint-tracking controller.

The controller runs at the simulation rate between policy steps: pure pursuit on the plan's
polyline for steering, and a proportional speed controller whose set-point is read from the
spacing of the waypoints (waypoints ``waypoint_dt`` apart imply the speeds between them).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from training.envs.toy.config import ToyWorldConfig


@dataclass
class VehicleState:
    """Batched ego state, world frame. ``x, y`` is the rear axle; ``yaw`` in rad."""

    x: torch.Tensor
    y: torch.Tensor
    yaw: torch.Tensor
    speed: torch.Tensor
    steer: torch.Tensor
    accel: torch.Tensor

    @staticmethod
    def fields() -> tuple[str, ...]:
        return ("x", "y", "yaw", "speed", "steer", "accel")


def bicycle_step(
    state: VehicleState, steer_cmd: torch.Tensor, accel_cmd: torch.Tensor, cfg: ToyWorldConfig, dt: float
) -> VehicleState:
    """Advance the kinematic bicycle by ``dt`` seconds under steering-rate and acceleration limits.

    The steering angle moves towards ``steer_cmd`` at most ``max_steer_rate * dt``; the
    acceleration is clipped to ``[-max_decel, max_accel]`` and the speed never goes below 0.
    Over the step the steering angle and the mean speed are held, so the motion is an exact
    circular arc (or straight line): ``yaw_rate = v * tan(steer) / wheelbase``.
    """
    max_change = cfg.max_steer_rate * dt
    target = steer_cmd.clamp(-cfg.max_steer_rad, cfg.max_steer_rad)
    steer = state.steer + (target - state.steer).clamp(-max_change, max_change)
    accel = accel_cmd.clamp(-cfg.max_decel, cfg.max_accel)
    new_speed = (state.speed + accel * dt).clamp_min(0.0)
    accel = (new_speed - state.speed) / dt
    mean_speed = 0.5 * (state.speed + new_speed)
    yaw_rate = mean_speed * torch.tan(steer) / cfg.wheelbase_m
    dyaw = yaw_rate * dt
    new_yaw = state.yaw + dyaw
    straight = dyaw.abs() < 1e-6
    safe_rate = torch.where(straight, torch.ones_like(yaw_rate), yaw_rate)
    arc_dx = mean_speed / safe_rate * (torch.sin(new_yaw) - torch.sin(state.yaw))
    arc_dy = mean_speed / safe_rate * (torch.cos(state.yaw) - torch.cos(new_yaw))
    mid_yaw = state.yaw + 0.5 * dyaw
    dx = torch.where(straight, mean_speed * dt * torch.cos(mid_yaw), arc_dx)
    dy = torch.where(straight, mean_speed * dt * torch.sin(mid_yaw), arc_dy)
    return VehicleState(state.x + dx, state.y + dy, new_yaw, new_speed, steer, accel)


def ego_to_world(points: torch.Tensor, x: torch.Tensor, y: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """Points ``[N, Q, 2]`` in an ego frame (x forward, y left) to the world frame."""
    cos, sin = torch.cos(yaw)[:, None], torch.sin(yaw)[:, None]
    px, py = points[..., 0], points[..., 1]
    return torch.stack([x[:, None] + cos * px - sin * py, y[:, None] + sin * px + cos * py], dim=-1)


def world_to_ego(points: torch.Tensor, x: torch.Tensor, y: torch.Tensor, yaw: torch.Tensor) -> torch.Tensor:
    """Points ``[N, Q, 2]`` in the world frame to the ego frame of pose ``(x, y, yaw)``."""
    cos, sin = torch.cos(yaw)[:, None], torch.sin(yaw)[:, None]
    dx, dy = points[..., 0] - x[:, None], points[..., 1] - y[:, None]
    return torch.stack([cos * dx + sin * dy, -sin * dx + cos * dy], dim=-1)


def plan_speeds(plan_world: torch.Tensor, cfg: ToyWorldConfig) -> torch.Tensor:
    """Speeds ``[N, K]`` implied by a plan's polyline (origin first, then K waypoints), m/s."""
    return (plan_world[:, 1:] - plan_world[:, :-1]).norm(dim=-1) / cfg.waypoint_dt


def pure_pursuit_steer(state: VehicleState, plan_world: torch.Tensor, cfg: ToyWorldConfig) -> torch.Tensor:
    """Steering angle that arcs the rear axle through the plan point one look-ahead away.

    ``plan_world`` ``[N, K+1, 2]`` is the plan's polyline in the world frame, starting at the
    pose where it was made. The target is the farthest intersection of the polyline with a
    circle of radius ``max(min_lookahead_m, lookahead_time_s * v)`` around the rear axle; if the
    whole plan lies inside the circle, its last point.
    """
    lookahead = (state.speed * cfg.lookahead_time_s).clamp_min(cfg.min_lookahead_m)
    ego = torch.stack([state.x, state.y], dim=-1)[:, None, :]
    start = plan_world[:, :-1]
    seg = plan_world[:, 1:] - start
    rel = start - ego
    a = (seg * seg).sum(-1).clamp_min(1e-9)
    b = (seg * rel).sum(-1)
    c = (rel * rel).sum(-1) - lookahead[:, None] ** 2
    disc = b * b - a * c
    t = (-b + disc.clamp_min(0.0).sqrt()) / a
    valid = (disc >= 0) & (t >= 0) & (t <= 1)
    k = valid.shape[1]
    order = torch.arange(k, device=plan_world.device).expand_as(valid)
    last_valid = torch.where(valid, order, torch.full_like(order, -1)).max(dim=1).values
    has = last_valid >= 0
    pick = last_valid.clamp_min(0)[:, None]
    t_pick = t.gather(1, pick)
    hit = (
        start.gather(1, pick[..., None].expand(-1, -1, 2))[:, 0]
        + t_pick * seg.gather(1, pick[..., None].expand(-1, -1, 2))[:, 0]
    )
    target = torch.where(has[:, None], hit, plan_world[:, -1])
    local = world_to_ego(target[:, None, :], state.x, state.y, state.yaw)[:, 0]
    dist2 = (local**2).sum(-1)
    curvature = torch.where(dist2 > 0.25, 2.0 * local[:, 1] / dist2.clamp_min(1e-6), torch.zeros_like(dist2))
    return torch.atan(cfg.wheelbase_m * curvature)


def speed_command(
    state: VehicleState, plan_speed: torch.Tensor, time_in_plan: float, cfg: ToyWorldConfig
) -> torch.Tensor:
    """Acceleration that drives the speed towards the plan's speed a short lead time ahead.

    ``plan_speed`` ``[N, K]`` holds the mean speed over each waypoint interval; the set-point is
    linearly interpolated between interval midpoints at ``time_in_plan + speed_lead_time_s``.
    """
    k = plan_speed.shape[1]
    t = (time_in_plan + cfg.speed_lead_time_s) / cfg.waypoint_dt - 0.5
    i0 = min(max(int(t // 1), 0), k - 1)
    i1 = min(i0 + 1, k - 1)
    frac = min(max(t - i0, 0.0), 1.0)
    setpoint = plan_speed[:, i0] * (1 - frac) + plan_speed[:, i1] * frac
    return cfg.speed_gain * (setpoint - state.speed)
