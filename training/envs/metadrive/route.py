"""The local route: a polyline along MetaDrive lanes, and the expert's speed profile on it.

Every policy step the adapter samples, every ``route_spacing_m`` metres, the centre line of the
lane the expert drives in (chosen by MetaDrive's IDM policy) and of the lanes that continue it
along the navigation's route, from ``lead_in_m`` behind the ego to ``route_ahead_m`` ahead. Its
layout is the toy world's route layout (``s = -lead_in_m + index * route_spacing_m``), so the toy
world's projection, Frenet and expert-plan functions work on it unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from metadrive.component.lane.circular_lane import CircularLane
from metadrive.component.lane.straight_lane import StraightLane


@dataclass
class LocalRoute:
    """Route samples in the world frame; index ``lead_in_m / spacing`` is the ego's projection."""

    xy: np.ndarray  # float32 [P, 2]
    heading: np.ndarray  # float32 [P], rad


def _lane_samples(lane: Any, start: float, stop: float, step: float) -> tuple[np.ndarray, np.ndarray]:
    """Centre-line points ``[M, 2]`` and headings ``[M]`` every ``step`` metres in ``[start, stop)``.

    Straight and circular lanes (MetaDrive's procedural maps) are sampled in closed form, with
    their own ``position`` / ``heading_theta_at`` formulas; any other lane point by point.
    """
    longs = np.arange(start, stop, step)
    kind = type(lane)
    if kind.position is StraightLane.position and kind.heading_theta_at is StraightLane.heading_theta_at:
        xy = np.asarray(lane.start, dtype=np.float64)[:2] + longs[:, None] * np.asarray(lane.direction)[:2]
        return xy.reshape(-1, 2), np.full(len(longs), float(lane.heading))
    if kind.position is CircularLane.position and kind.heading_theta_at is CircularLane.heading_theta_at:
        phi = lane.direction * longs / lane.radius + lane.start_phase
        xy = np.asarray(lane.center, dtype=np.float64)[:2] + lane.radius * np.stack(
            [np.cos(phi), np.sin(phi)], -1
        )
        return xy.reshape(-1, 2), phi + math.pi / 2 * lane.direction
    xy = np.array([lane.position(float(s), 0.0) for s in longs], dtype=np.float64).reshape(-1, 2)
    heading = np.array([lane.heading_theta_at(float(s)) for s in longs], dtype=np.float64)
    return xy, heading


def next_route_lane(lane: Any, checkpoints: list[str], graph: dict) -> Any | None:
    """The lane of the route's next road that starts nearest to where ``lane`` ends, or None."""
    start, end = lane.index[0], lane.index[1]
    for i in range(len(checkpoints) - 2):
        if checkpoints[i] == start and checkpoints[i + 1] == end:
            candidates = graph[checkpoints[i + 1]][checkpoints[i + 2]]
            lane_end = np.asarray(lane.position(lane.length, 0.0))
            gaps = [float(np.linalg.norm(np.asarray(c.position(0.0, 0.0)) - lane_end)) for c in candidates]
            return candidates[int(np.argmin(gaps))]
    return None


def build_local_route(
    lane: Any,
    ego_xy: np.ndarray,
    checkpoints: list[str],
    graph: dict,
    behind_m: float,
    ahead_m: float,
    spacing_m: float,
    successors: dict[Any, Any] | None = None,
) -> LocalRoute:
    """Sample ``lane`` and its successors along the route around the ego's projection on ``lane``.

    Before the lane's start MetaDrive's lane geometry is extended (a straight line continues, an
    arc keeps turning); past the route's last lane the polyline continues straight.
    ``successors`` caches ``next_route_lane`` by lane index: pass one dict per episode (one route).
    """
    successors = {} if successors is None else successors
    count = int(round((behind_m + ahead_m) / spacing_m)) + 1
    long0 = float(lane.local_coordinates(ego_xy)[0])
    pieces_xy, pieces_heading = [], []
    have, cursor, current = 0, long0 - behind_m, lane
    while have < count and current is not None:
        stop = min(current.length, cursor + (count - have) * spacing_m - 1e-6)
        stop = max(stop, cursor)
        xy, heading = _lane_samples(current, cursor, stop, spacing_m)
        pieces_xy.append(xy)
        pieces_heading.append(heading)
        have += len(xy)
        cursor = (cursor + len(xy) * spacing_m) - current.length  # carry the spacing into the next lane
        if have >= count:
            break
        if current.index not in successors:
            successors[current.index] = next_route_lane(current, checkpoints, graph)
        current = successors[current.index]
    xy = np.concatenate(pieces_xy) if pieces_xy else np.zeros((0, 2))
    heading = np.concatenate(pieces_heading) if pieces_heading else np.zeros(0)
    if len(xy) < count:  # the route ends: continue straight along its last heading
        xy, heading = _extend_straight(xy, heading, count, spacing_m, lane)
    return LocalRoute(xy=xy[:count].astype(np.float32), heading=np.unwrap(heading[:count]).astype(np.float32))


def _extend_straight(
    xy: np.ndarray, heading: np.ndarray, count: int, spacing_m: float, lane: Any
) -> tuple[np.ndarray, np.ndarray]:
    if len(xy) == 0:
        xy = np.asarray([lane.position(lane.length, 0.0)], dtype=np.float64)
        heading = np.asarray([lane.heading_theta_at(lane.length)], dtype=np.float64)
    missing = count - len(xy)
    steps = spacing_m * np.arange(1, missing + 1)
    direction = np.array([math.cos(heading[-1]), math.sin(heading[-1])])
    extra = xy[-1] + steps[:, None] * direction
    return np.concatenate([xy, extra]), np.concatenate([heading, np.full(missing, heading[-1])])


def speed_profile(
    route: LocalRoute,
    spacing_m: float,
    road_speed_mps: float,
    max_lateral_accel: float,
    comfort_decel: float,
    stop_s_index: float | None = None,
    lead_speed_mps: float = 0.0,
) -> np.ndarray:
    """Target speed ``[P]`` (m/s) along the route: the road speed, limited by curvature
    (``v^2 * curvature <= max_lateral_accel``) and, when ``stop_s_index`` is given, by the speed
    from which a ``comfort_decel`` brake reaches ``lead_speed_mps`` at that route index; then
    lowered ahead of every limit so the same brake reaches it (backward pass, O(P))."""
    dheading = np.diff(route.heading.astype(np.float64), append=route.heading[-1])
    curvature = np.abs(dheading) / spacing_m
    v = np.minimum(road_speed_mps, np.sqrt(max_lateral_accel / np.maximum(curvature, 1e-6)))
    s = np.arange(len(v)) * spacing_m
    if stop_s_index is not None:
        stop_s = stop_s_index * spacing_m
        reach = np.sqrt(np.maximum(0.0, lead_speed_mps**2 + 2 * comfort_decel * (stop_s - s)))
        v = np.where(s <= stop_s, np.minimum(v, reach), np.minimum(v, lead_speed_mps))
    # reachable_i^2 = min_{j >= i} (v_j^2 + 2 a (s_j - s_i))
    budget = v**2 + 2 * comfort_decel * s
    suffix_min = np.minimum.accumulate(budget[::-1])[::-1]
    return np.sqrt(np.maximum(suffix_min - 2 * comfort_decel * s, 0.0)).astype(np.float32)
