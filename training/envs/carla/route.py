"""A route as a polyline with arc lengths, projection onto it, and the expert's plan along it.

Pure numpy, right-handed world frame. The route comes from the CARLA map (``session.py`` follows
``waypoint.next`` from the spawn point); everything here only sees its points.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from training.envs.carla.config import CarlaConfig
from training.envs.carla.raster import world_to_ego

FloatArray = np.ndarray


@dataclass(frozen=True)
class Route:
    """Centre line ``xy`` ``[P, 2]``, arc length ``s`` ``[P]``, ``heading`` ``[P]`` (rad) and the
    curvature-limited ``target_speed`` ``[P]`` (m/s) at each point."""

    xy: FloatArray
    s: FloatArray
    heading: FloatArray
    target_speed: FloatArray

    @property
    def length_m(self) -> float:
        return float(self.s[-1])


@dataclass(frozen=True)
class RoutePosition:
    """Where a point lies relative to the route: arc length, signed offset (left > 0), heading."""

    s: float
    d: float
    heading: float


def build_route(xy: FloatArray, cfg: CarlaConfig) -> Route:
    """A ``Route`` through ``xy`` ``[P, 2]`` (P >= 2, distinct consecutive points).

    The target speed is ``min(target_speed_mps, sqrt(max_lateral_accel / curvature))``, smoothed
    backwards so that braking before a curve needs at most ``expert_decel``.
    """
    xy = np.asarray(xy, dtype=np.float64)
    step = np.linalg.norm(np.diff(xy, axis=0), axis=-1)
    s = np.concatenate([[0.0], np.cumsum(step)])
    delta = np.diff(xy, axis=0)
    seg_heading = np.arctan2(delta[:, 1], delta[:, 0])
    heading = np.concatenate([seg_heading, seg_heading[-1:]])
    turn = np.abs(_wrap(np.diff(seg_heading)))
    curvature = np.zeros(len(xy))
    curvature[1:-1] = turn / np.maximum(0.5 * (step[:-1] + step[1:]), 1e-6)
    limit = np.sqrt(cfg.max_lateral_accel / np.maximum(curvature, 1e-9))
    speed = np.minimum(cfg.target_speed_mps, limit)
    for i in range(len(speed) - 2, -1, -1):  # reachable by braking at expert_decel
        speed[i] = min(speed[i], math.sqrt(speed[i + 1] ** 2 + 2 * cfg.expert_decel * step[i]))
    return Route(xy=xy, s=s, heading=heading, target_speed=speed)


def _wrap(angle: FloatArray | float) -> FloatArray:
    return np.arctan2(np.sin(angle), np.cos(angle))


def project(route: Route, point: FloatArray, s_window: tuple[float, float] | None = None) -> RoutePosition:
    """Nearest point of the route to ``point`` ``[2]``, searched among segments starting within
    ``s_window`` (metres of arc length) when given, so a route that passes near itself twice is
    not confused."""
    start, end = route.xy[:-1], route.xy[1:]
    candidates = np.arange(len(start))
    if s_window is not None:
        inside = (route.s[:-1] >= s_window[0]) & (route.s[:-1] <= s_window[1])
        candidates = candidates[inside] if inside.any() else candidates
    seg = end[candidates] - start[candidates]
    length2 = np.maximum((seg * seg).sum(-1), 1e-12)
    rel = np.asarray(point, dtype=np.float64) - start[candidates]
    t = np.clip((rel * seg).sum(-1) / length2, 0.0, 1.0)
    closest = rel - t[:, None] * seg
    best = int(np.argmin((closest * closest).sum(-1)))
    index = candidates[best]
    heading = float(route.heading[index])
    cross = seg[best, 0] * rel[best, 1] - seg[best, 1] * rel[best, 0]
    d = math.copysign(float(np.linalg.norm(closest[best])), cross) if cross != 0 else 0.0
    s = float(route.s[index] + t[best] * np.sqrt(length2[best]))
    return RoutePosition(s=s, d=d, heading=heading)


def interpolate(route: Route, s: FloatArray) -> tuple[FloatArray, FloatArray]:
    """Points ``[..., 2]`` and headings ``[...]`` at arc lengths ``s`` (extrapolated linearly)."""
    s = np.asarray(s, dtype=np.float64)
    index = np.clip(np.searchsorted(route.s, s, side="right") - 1, 0, len(route.s) - 2)
    seg = route.xy[index + 1] - route.xy[index]
    length = np.maximum(route.s[index + 1] - route.s[index], 1e-9)
    t = (s - route.s[index]) / length
    return route.xy[index] + t[..., None] * seg, route.heading[index]


def offset_points(route: Route, s: FloatArray, d: FloatArray) -> FloatArray:
    """World points ``[..., 2]`` at arc lengths ``s`` and left offsets ``d``."""
    xy, heading = interpolate(route, s)
    normal = np.stack([-np.sin(heading), np.cos(heading)], axis=-1)
    return xy + np.asarray(d)[..., None] * normal


def target_speed_at(route: Route, s: FloatArray) -> FloatArray:
    return np.interp(s, route.s, route.target_speed)


def expert_plan(
    route: Route,
    pose: FloatArray,
    speed_mps: float,
    position: RoutePosition,
    cfg: CarlaConfig,
    stop_s: float = math.inf,
) -> FloatArray:
    """Expert waypoints ``[K, 2]`` in the ego frame of ``pose`` (metres; x forward, y left).

    Follows the route centre line at its target speed within the expert's acceleration limits,
    never faster than a stop at arc length ``stop_s`` (a vehicle ahead, a red light) allows at
    ``expert_decel``. The lateral offset decays as a critically damped motion with time
    constant ``expert_recovery_time_s``, as the toy world's expert does, so demonstrations also
    show recoveries.
    """
    dt, tau = cfg.waypoint_dt, cfg.expert_recovery_time_s
    heading_error = float(_wrap(pose[2] - position.heading))
    lateral_rate = speed_mps * math.sin(heading_error)
    s, v, d0 = position.s, speed_mps, position.d
    points = []
    for k in range(1, cfg.num_waypoints + 1):
        v_target = float(target_speed_at(route, s + v * dt))
        v_stop = math.sqrt(2 * cfg.expert_decel * max(stop_s - s, 0.0))
        v_target = min(v_target, v_stop)
        v_next = min(max(v_target, v - cfg.expert_decel * dt), v + cfg.expert_accel * dt)
        v_next = max(v_next, 0.0)
        s = min(s + 0.5 * (v + v_next) * dt, max(stop_s, position.s))
        v = v_next
        t = k * dt
        d = (d0 + (lateral_rate + d0 / tau) * t) * math.exp(-t / tau)
        points.append((s, d))
    s_all, d_all = np.array(points).T
    return world_to_ego(offset_points(route, s_all, d_all), np.asarray(pose, dtype=np.float64))


def plan_quality(
    route: Route, plan_world: FloatArray, s_start: float, waypoint_dt: float
) -> tuple[float, float]:
    """Mean distance (m) of a plan's waypoints from the route centre line and mean
    |planned speed - target speed| (m/s) over its intervals.

    ``plan_world`` ``[K + 1, 2]`` starts at the pose where the plan was made.
    """
    speeds = np.linalg.norm(np.diff(plan_world, axis=0), axis=-1) / waypoint_dt
    distances, errors = [], []
    s_prev = s_start
    for point, speed in zip(plan_world[1:], speeds, strict=True):
        position = project(route, point, (s_prev - 5.0, s_prev + 2 * speed * waypoint_dt + 10.0))
        distances.append(abs(position.d))
        errors.append(abs(speed - float(target_speed_at(route, position.s))))
        s_prev = position.s
    return float(np.mean(distances)), float(np.mean(errors))
