"""The toy world's controller, route geometry and expert plan for ONE world, in numpy and ``math``.

The toy world's functions (``training/envs/toy/dynamics.py``, ``scenario.py``, ``expert.py``) work on
batches of torch tensors. A MetaDrive worker steps one world, where building 1-element tensors
per call cost more than the arithmetic (a profile showed them at a fifth of the adapter's time), so
these are their one-world equivalents: same formulas, float64 instead of float32, equal to the
torch functions within float tolerance (``tests/envs/test_metadrive_single.py`` checks it).

Routes use the toy layout: ``route_xy`` ``[P, 2]`` and ``route_heading`` ``[P]`` sampled every
``cfg.route_spacing_m`` metres from ``s = -cfg.lead_in_m``.
"""

from __future__ import annotations

import math

import numpy as np

from training.envs.toy.config import ToyWorldConfig


# ---------------------------------------------------------------------------------- controller
def plan_speeds(plan_world: np.ndarray, cfg: ToyWorldConfig) -> np.ndarray:
    """Speeds ``[K]`` (m/s) implied by a plan's polyline ``[K+1, 2]`` (origin first)."""
    step = np.diff(plan_world, axis=0)
    return np.hypot(step[:, 0], step[:, 1]) / cfg.waypoint_dt


def pure_pursuit_steer(
    pose: tuple[float, float, float], speed: float, plan_world: np.ndarray, cfg: ToyWorldConfig
) -> float:
    """Steering angle (rad) arcing the rear axle at ``pose`` through the plan point one look-ahead
    away (``toy.dynamics.pure_pursuit_steer`` for one world; ``plan_world`` ``[K+1, 2]``)."""
    x, y, yaw = pose
    lookahead = max(speed * cfg.lookahead_time_s, cfg.min_lookahead_m)
    start = plan_world[:-1]
    seg = plan_world[1:] - start
    rel = start - np.array([x, y])
    a = np.maximum((seg * seg).sum(-1), 1e-9)
    b = (seg * rel).sum(-1)
    c = (rel * rel).sum(-1) - lookahead**2
    disc = b * b - a * c
    t = (-b + np.sqrt(np.maximum(disc, 0.0))) / a
    valid = np.flatnonzero((disc >= 0) & (t >= 0) & (t <= 1))
    target = start[valid[-1]] + t[valid[-1]] * seg[valid[-1]] if len(valid) else plan_world[-1]
    dx, dy = float(target[0]) - x, float(target[1]) - y
    cos, sin = math.cos(yaw), math.sin(yaw)
    forward, left = cos * dx + sin * dy, -sin * dx + cos * dy
    dist2 = forward * forward + left * left
    curvature = 2.0 * left / max(dist2, 1e-6) if dist2 > 0.25 else 0.0
    return math.atan(cfg.wheelbase_m * curvature)


def speed_command(speed: float, plan_speed: np.ndarray, time_in_plan: float, cfg: ToyWorldConfig) -> float:
    """Acceleration (m/s^2) towards the plan's speed a short lead time ahead (``toy.dynamics``)."""
    k = len(plan_speed)
    t = (time_in_plan + cfg.speed_lead_time_s) / cfg.waypoint_dt - 0.5
    i0 = min(max(int(t // 1), 0), k - 1)
    i1 = min(i0 + 1, k - 1)
    frac = min(max(t - i0, 0.0), 1.0)
    setpoint = float(plan_speed[i0]) * (1 - frac) + float(plan_speed[i1]) * frac
    return cfg.speed_gain * (setpoint - speed)


# ---------------------------------------------------------------------------------- frames
def ego_to_world(points: np.ndarray, pose: tuple[float, float, float]) -> np.ndarray:
    """Ego-frame points ``[..., 2]`` (x forward, y left) to the world frame of pose ``(x, y, yaw)``."""
    cos, sin = math.cos(pose[2]), math.sin(pose[2])
    x, y = points[..., 0], points[..., 1]
    return np.stack([pose[0] + cos * x - sin * y, pose[1] + sin * x + cos * y], axis=-1)


def world_to_ego(points: np.ndarray, pose: tuple[float, float, float]) -> np.ndarray:
    """World points ``[..., 2]`` to the ego frame of pose ``(x, y, yaw)``."""
    cos, sin = math.cos(pose[2]), math.sin(pose[2])
    dx, dy = points[..., 0] - pose[0], points[..., 1] - pose[1]
    return np.stack([cos * dx + sin * dy, -sin * dx + cos * dy], axis=-1)


# ---------------------------------------------------------------------------------- route
def _route_u(s: np.ndarray, length: int, cfg: ToyWorldConfig) -> tuple[np.ndarray, np.ndarray]:
    """Segment index and fraction of arc lengths ``s`` on a route of ``length`` points."""
    u = np.clip(
        (np.asarray(s, dtype=np.float64) + cfg.lead_in_m) / cfg.route_spacing_m, 0.0, length - 1 - 1e-4
    )
    i0 = np.floor(u).astype(np.int64)
    return i0, u - i0


def interpolate_profile(values: np.ndarray, s: np.ndarray, cfg: ToyWorldConfig) -> np.ndarray:
    """A per-route-point profile ``values`` ``[P]`` read at arc lengths ``s`` ``[Q]``."""
    i0, frac = _route_u(s, len(values), cfg)
    v0 = values[i0].astype(np.float64)
    return v0 + frac * (values[np.minimum(i0 + 1, len(values) - 1)] - v0)


def _profile_at(values: np.ndarray, s: float, cfg: ToyWorldConfig) -> float:
    """``interpolate_profile`` at one arc length, in plain floats (the expert reads 8 per step)."""
    u = min(max((s + cfg.lead_in_m) / cfg.route_spacing_m, 0.0), len(values) - 1 - 1e-4)
    i0 = int(u)
    v0 = float(values[i0])
    return v0 + (u - i0) * (float(values[min(i0 + 1, len(values) - 1)]) - v0)


def frenet_to_world(
    route_xy: np.ndarray, route_heading: np.ndarray, s: np.ndarray, d: np.ndarray, cfg: ToyWorldConfig
) -> np.ndarray:
    """World positions ``[Q, 2]`` of route coordinates ``s``, ``d`` ``[Q]``; beyond either end the
    route continues straight along its end heading (``toy.scenario.frenet_to_world``)."""
    last = len(route_xy) - 1
    s = np.asarray(s, dtype=np.float64)
    i0, frac = _route_u(s, len(route_xy), cfg)
    i1 = np.minimum(i0 + 1, last)
    h0 = route_heading[i0].astype(np.float64)
    heading = h0 + frac * (route_heading[i1] - h0)
    p0 = route_xy[i0].astype(np.float64)
    xy = p0 + frac[:, None] * (route_xy[i1] - p0)
    s_lo = -cfg.lead_in_m
    s_hi = s_lo + last * cfg.route_spacing_m
    overshoot = np.where(s < s_lo, s - s_lo, np.where(s > s_hi, s - s_hi, 0.0))
    cos, sin = np.cos(heading), np.sin(heading)
    along = overshoot[:, None] * np.stack([cos, sin], axis=-1)
    across = np.asarray(d, dtype=np.float64)[:, None] * np.stack([-sin, cos], axis=-1)
    return xy + along + across


def project_to_route(
    route_xy: np.ndarray, route_heading: np.ndarray, points: np.ndarray, cfg: ToyWorldConfig
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Arc length ``s``, signed lateral offset ``d`` (left > 0) and route heading ``[Q]`` of world
    points ``[Q, 2]`` on the nearest segment of the whole route (``project_points_to_route`` with a
    window spanning the route)."""
    a = route_xy[:-1].astype(np.float64)
    seg = np.diff(route_xy.astype(np.float64), axis=0)  # [P-1, 2]
    rel = np.asarray(points, dtype=np.float64)[:, None, :] - a  # [Q, P-1, 2]
    seg_len2 = np.maximum((seg * seg).sum(-1), 1e-9)
    t = np.clip((rel * seg).sum(-1) / seg_len2, 0.0, 1.0)
    closest = rel - t[..., None] * seg
    best = np.argmin((closest * closest).sum(-1), axis=1)  # [Q]
    rows = np.arange(len(best))
    seg_b, rel_b, t_b = seg[best], rel[rows, best], t[rows, best]
    d = (seg_b[:, 0] * rel_b[:, 1] - seg_b[:, 1] * rel_b[:, 0]) / np.maximum(np.sqrt(seg_len2[best]), 1e-9)
    s = -cfg.lead_in_m + (best + t_b) * cfg.route_spacing_m
    h0 = route_heading[best].astype(np.float64)
    return s, d, h0 + t_b * (route_heading[best + 1] - h0)


# ---------------------------------------------------------------------------------- expert
def expert_plan(
    route_xy: np.ndarray,
    route_heading: np.ndarray,
    target_speed: np.ndarray,
    pose: tuple[float, float, float],
    speed: float,
    frenet: tuple[float, float, float],
    cfg: ToyWorldConfig,
) -> np.ndarray:
    """Expert waypoints ``[K, 2]`` in the ego frame (``toy.expert.expert_plan`` for one world).

    ``frenet``: arc length, lateral offset and route heading at the rear axle; ``target_speed``
    ``[P]`` the speed profile along the route (m/s).
    """
    s0, d0, road_heading = frenet
    dt, tau = cfg.waypoint_dt, cfg.expert_recovery_time_s
    heading_error = math.atan2(math.sin(pose[2] - road_heading), math.cos(pose[2] - road_heading))
    lateral_rate = speed * math.sin(heading_error)
    s_points, d_points = [], []
    s, v = s0, speed
    for k in range(1, cfg.num_waypoints + 1):
        v_target = _profile_at(target_speed, s + v * dt, cfg)
        v_next = max(min(max(v_target, v - cfg.expert_decel * dt), v + cfg.expert_accel * dt), 0.0)
        s += 0.5 * (v + v_next) * dt
        v = v_next
        t = k * dt
        s_points.append(s)
        d_points.append((d0 + (lateral_rate + d0 / tau) * t) * math.exp(-t / tau))
    world = frenet_to_world(route_xy, route_heading, np.array(s_points), np.array(d_points), cfg)
    return world_to_ego(world, pose)
