"""Kinematic bicycle (reference point: the rear axle) and the waypoint-tracking controller.

The controller runs at the simulation rate between policy steps: pure pursuit on the plan's
polyline for steering, and a proportional speed controller whose set-point is read from the
spacing of the waypoints (waypoints ``waypoint_dt`` apart imply the speeds between them).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

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
    new_speed = torch.add(state.speed, accel, alpha=dt).clamp_min(0.0)
    accel = (new_speed - state.speed) / dt
    distance = (state.speed + new_speed) * (0.5 * dt)  # along the arc
    dyaw = distance * torch.tan(steer) / cfg.wheelbase_m
    # The chord of an arc of length ``distance`` turning by ``dyaw`` has length
    # ``distance * sin(dyaw / 2) / (dyaw / 2)`` and points along the mid-arc heading; ``sinc``
    # is 1 at 0, so a straight line needs no branch.
    chord = distance * torch.sinc(dyaw / (2 * torch.pi))
    mid_yaw = torch.add(state.yaw, dyaw, alpha=0.5)
    return VehicleState(
        torch.addcmul(state.x, chord, torch.cos(mid_yaw)),
        torch.addcmul(state.y, chord, torch.sin(mid_yaw)),
        state.yaw + dyaw,
        new_speed,
        steer,
        accel,
    )


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


class PlanPolyline(NamedTuple):
    """A plan's polyline ``[N, K+1, 2]`` (world frame) cut into its K segments, computed once per
    policy step and used by every controller substep."""

    start: torch.Tensor  # [N, K, 2] segment start points
    seg: torch.Tensor  # [N, K, 2] segment vectors
    seg_len2: torch.Tensor  # [N, K] squared segment lengths (at least 1e-9)
    end: torch.Tensor  # [N, 2] the plan's last point
    order: torch.Tensor  # [K] segment numbers 0 .. K - 1 (float)

    @classmethod
    def of(cls, plan_world: torch.Tensor) -> PlanPolyline:
        start = plan_world[:, :-1]
        seg = plan_world[:, 1:] - start
        order = torch.arange(seg.shape[1], device=seg.device, dtype=seg.dtype)
        return cls(start, seg, torch.linalg.vecdot(seg, seg).clamp_min(1e-9), plan_world[:, -1], order)


def pure_pursuit_steer(
    state: VehicleState, plan_world: torch.Tensor | PlanPolyline, cfg: ToyWorldConfig
) -> torch.Tensor:
    """Steering angle that arcs the rear axle through the plan point one look-ahead away.

    ``plan_world`` ``[N, K+1, 2]`` is the plan's polyline in the world frame, starting at the
    pose where it was made (or that polyline's :class:`PlanPolyline`). The target is the farthest
    intersection of the polyline with a circle of radius ``max(min_lookahead_m,
    lookahead_time_s * v)`` around the rear axle; if the whole plan lies inside the circle, its
    last point.
    """
    plan = plan_world if isinstance(plan_world, PlanPolyline) else PlanPolyline.of(plan_world)
    lookahead = (state.speed * cfg.lookahead_time_s).clamp_min(cfg.min_lookahead_m)
    ego = torch.stack([state.x, state.y], dim=-1)
    rel = plan.start - ego[:, None, :]
    # segment point start + t * seg at distance lookahead: seg_len2 t^2 + 2 b t + c = 0
    b = torch.linalg.vecdot(plan.seg, rel)
    c = torch.linalg.vecdot(rel, rel) - (lookahead * lookahead)[:, None]
    disc = b * b - plan.seg_len2 * c
    t = (disc.clamp_min(0.0).sqrt() - b) / plan.seg_len2
    valid = (disc >= 0) & (t >= 0) & (t <= 1)
    # the farthest valid segment wins: score k + t, or -1 where there is no intersection
    best, pick = torch.where(valid, plan.order + t, -1.0).max(dim=1, keepdim=True)
    hits = torch.addcmul(plan.start, t[..., None], plan.seg)  # [N, K, 2]
    hit = torch.take_along_dim(hits, pick[..., None], dim=1)[:, 0]
    dx, dy = (torch.where(best >= 0, hit, plan.end) - ego).unbind(-1)
    # the target's lateral coordinate in the ego frame, and its squared distance
    lateral = torch.cos(state.yaw) * dy - torch.sin(state.yaw) * dx
    dist2 = dx * dx + dy * dy
    curvature = torch.where(dist2 > 0.25, lateral / dist2, 0.0)  # half the arc's curvature
    return torch.atan((2.0 * cfg.wheelbase_m) * curvature)


def setpoint_weights(
    num_waypoints: int, times_in_plan: list[float], cfg: ToyWorldConfig, device: torch.device | None = None
) -> torch.Tensor:
    """``[K, T]`` weights: ``plan_speed @ weights`` is the speed set-point at each time in the plan.

    The set-point at time ``t`` is the plan's speed ``speed_lead_time_s`` later, linearly
    interpolated between interval midpoints (``plan_speed`` ``[N, K]`` holds the mean speed over
    each waypoint interval).
    """
    weights = [[0.0] * len(times_in_plan) for _ in range(num_waypoints)]
    for column, time_in_plan in enumerate(times_in_plan):
        u = (time_in_plan + cfg.speed_lead_time_s) / cfg.waypoint_dt - 0.5
        i0 = min(max(int(u // 1), 0), num_waypoints - 1)
        i1 = min(i0 + 1, num_waypoints - 1)
        frac = min(max(u - i0, 0.0), 1.0)
        weights[i0][column] += 1 - frac
        weights[i1][column] += frac
    return torch.tensor(weights, device=device)


def speed_command(
    state: VehicleState, plan_speed: torch.Tensor, time_in_plan: float, cfg: ToyWorldConfig
) -> torch.Tensor:
    """Acceleration that drives the speed towards the plan's speed a short lead time ahead
    (``plan_speed`` ``[N, K]``, the set-point of :func:`setpoint_weights`)."""
    weights = setpoint_weights(plan_speed.shape[1], [time_in_plan], cfg, plan_speed.device)
    setpoint = (plan_speed @ weights.to(plan_speed.dtype))[:, 0]
    return cfg.speed_gain * (setpoint - state.speed)
