"""Where the MetaDrive expert must stop: behind what is in its lane, and before the paths of cars
that will cross or merge into its lane when it gets there.

Everything is in the local route's coordinates (``s`` along the route from the toy layout's origin,
``d`` to its left; see ``route.py``). Two kinds of stop, each a route arc length where the rear axle
must be at rest (or at the lead's speed):

- **lead**: the nearest object whose box lies in the ego's corridor now (its footprint across the
  route overlaps the ego's width plus a margin), ahead of the ego: stop ``lead_gap_m`` +
  ``lead_time_gap_s`` x its speed behind it, at its speed along the route (car following; zero for
  cones, parked and crossing cars).
- **pass**: a car in a lane beside the corridor, ahead and driving the same way slower than the
  ego, may change into the ego's lane at any moment (MetaDrive's traffic changes lanes round a
  stopped car or a blocked lane without looking at the ego, and cut-ins from such cars were most of
  the expert's collisions): the ego passes it at most ``pass_speed_delta_mps`` faster, slow enough
  to brake behind it if it cuts in. The stop sits where a lead stop would, at the car's speed plus
  that margin, until the ego's front reaches the car's rear. Such a car already turned towards the
  corridor by more than ``merge_heading_deg`` is changing into the ego's lane: it is a lead.
- **yield**: a moving car not in the corridor now whose predicted path (its lane and the lanes of its
  own route, at its speed accelerating towards the cruise speed) enters the corridor ahead of the ego
  while the ego, going on at up to the cruise speed, would be there too (occupancy windows within
  ``yield_buffer_s``). A car that would cross stops the ego ``yield_gap_m`` before the nearest place
  its box reaches in the corridor (a car crossing at an angle reaches closer than its centre; an
  oncoming car turning across the ego's lane drives on towards the ego inside it); a car that merges
  and drives on along the route is followed as a lead from the place it merges. Traffic in MetaDrive
  never yields to the ego, so the ego yields to everything it still can: when a comfortable brake
  (``comfort_decel``) would no longer stop its front before the crossing car's path, it drives on and
  clears the path instead (seen on development seeds: a yield found that late left the ego standing
  at a roundabout's entry, where the car hit it) - except before a car whose path runs back towards
  the ego inside the corridor, which meets the ego wherever it drives: there the ego stays unless it
  clears the path before the car gets there (held-out seeds: a slow ego at an intersection's mouth
  drove on into oncoming cars turning across its lane).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from training.envs.metadrive.single import project_to_route
from training.envs.toy.config import ToyWorldConfig

_ALIGNED_COS = 0.7  # a car whose heading is within ~45 degrees of the route drives along it


@dataclass(frozen=True)
class YieldSettings:
    """The expert's gaps and look-ahead (``MetaDriveWorldConfig`` holds the values)."""

    lead_gap_m: float  # bumper to bumper, to a stopped lead
    lead_time_gap_s: float  # plus this many seconds at the lead's speed
    corridor_margin_m: float  # beyond the ego's half width, on each side
    yield_margin_m: float  # the same for the predicted paths of other cars (they cut corners)
    yield_horizon_s: float  # how far ahead other cars' paths are predicted
    yield_step_s: float  # prediction time step
    yield_buffer_s: float  # occupancy windows closer than this conflict
    yield_gap_m: float  # ego front bumper to the place a crossing car passes
    traffic_accel_mps2: float  # other cars' predicted acceleration towards the cruise speed
    moving_mps: float  # slower cars are not predicted to move
    pass_speed_delta_mps: float  # at most this much faster than a car beside the corridor, ahead
    merge_heading_deg: float  # a car beside the corridor turned towards it by more leads


@dataclass
class Traffic:
    """Objects near the ego. ``boxes`` ``[B, 5]``: x, y, heading, length, width (world frame);
    ``speeds`` ``[B]`` m/s; ``paths[i]``: the polyline ``[P, 2]`` car ``i`` will follow from where it
    is (1 m spacing), or None (static objects, cars off any lane); ``waiting[i]``: car ``i`` stands
    only because MetaDrive has not started its block's traffic yet (it starts at the cruise speed
    when the ego enters the block, so it is predicted to drive at that speed); ``vehicle[i]``: a
    car (False: cones, barriers and other objects that never move)."""

    boxes: np.ndarray
    speeds: np.ndarray
    paths: list[np.ndarray | None]
    waiting: np.ndarray
    vehicle: np.ndarray


@dataclass(frozen=True)
class Stop:
    """Where the rear axle must be at ``speed_mps`` (route arc length, m)."""

    s: float
    speed_mps: float


def expert_stops(
    route_xy: np.ndarray,
    route_heading: np.ndarray,
    ego_s: float,
    ego_speed: float,
    traffic: Traffic,
    geometry: ToyWorldConfig,
    settings: YieldSettings,
) -> list[Stop]:
    """The lead stop, the pass stops and the nearest yield stop (each when there is one), for the
    rear axle at route arc length ``ego_s`` moving at ``ego_speed``."""
    if len(traffic.boxes) == 0:
        return []
    s, d, heading = project_to_route(route_xy, route_heading, traffic.boxes[:, :2], geometry)
    half = _half_corridor(traffic.boxes, heading, geometry, settings.corridor_margin_m)
    in_corridor = np.abs(d) < half
    relative = traffic.boxes[:, 2] - heading  # each object's heading relative to the route there
    extent = _half_extent_along(traffic.boxes, relative)
    aligned = np.cos(relative) > _ALIGNED_COS
    beside = ~in_corridor & aligned & traffic.vehicle & (np.abs(d) < half + geometry.lane_width_m)
    # turned towards the corridor: it is changing into the ego's lane, so it leads
    towards = -np.sign(d) * np.sin(relative)
    merging = beside & (towards > math.sin(math.radians(settings.merge_heading_deg)))
    stops = []
    lead = _lead_stop(traffic, s, relative, extent, in_corridor | merging, ego_s, geometry, settings)
    if lead is not None:
        stops.append(lead)
    stops += _pass_stops(traffic, s, relative, extent, beside & ~merging, ego_s, geometry, settings)
    yields = [
        _yield_stop(route_xy, route_heading, traffic, i, ego_s, ego_speed, geometry, settings)
        for i in range(len(traffic.boxes))
        if not (in_corridor[i] and aligned[i])  # a car driving in the corridor is a lead
        and traffic.paths[i] is not None
        and (traffic.speeds[i] >= settings.moving_mps or traffic.waiting[i])
    ]
    yields = [stop for stop in yields if stop is not None]
    if yields:
        stops.append(min(yields, key=lambda stop: stop.s - 2 * stop.speed_mps))
    return stops


def _half_corridor(
    boxes: np.ndarray, route_heading_at: np.ndarray, geometry: ToyWorldConfig, margin_m: float
) -> np.ndarray:
    """Largest centre offset ``[B]`` at which a box still overlaps the ego's corridor."""
    relative = boxes[:, 2] - route_heading_at
    across = np.abs(np.sin(relative)) * boxes[:, 3] / 2 + np.abs(np.cos(relative)) * boxes[:, 4] / 2
    return geometry.width_m / 2 + margin_m + across


def _half_extent_along(boxes: np.ndarray, relative: np.ndarray) -> np.ndarray:
    """Half the extent ``[B]`` of each box along the route, at heading ``relative`` to it: a car
    across the route reaches out by its width."""
    return np.abs(np.cos(relative)) * boxes[:, 3] / 2 + np.abs(np.sin(relative)) * boxes[:, 4] / 2


def _front_m(geometry: ToyWorldConfig) -> float:
    return geometry.length_m - geometry.rear_overhang_m  # rear axle to front bumper


def _lead_stop(
    traffic: Traffic,
    s: np.ndarray,
    relative: np.ndarray,
    extent: np.ndarray,
    in_corridor: np.ndarray,
    ego_s: float,
    geometry: ToyWorldConfig,
    settings: YieldSettings,
) -> Stop | None:
    ahead = in_corridor & (s + extent > ego_s + _front_m(geometry))  # some of it beyond the front bumper
    if not ahead.any():
        return None
    lead = int(np.argmin(np.where(ahead, s - extent, np.inf)))
    speed = max(0.0, float(traffic.speeds[lead]) * math.cos(relative[lead]))
    return _follow(float(s[lead]), 2 * float(extent[lead]), speed, geometry, settings)


def _pass_stops(
    traffic: Traffic,
    s: np.ndarray,
    relative: np.ndarray,
    extent: np.ndarray,
    beside: np.ndarray,
    ego_s: float,
    geometry: ToyWorldConfig,
    settings: YieldSettings,
) -> list[Stop]:
    """A stop at ``pass_speed_delta_mps`` above its speed for each car ``beside`` the corridor whose
    rear is still ahead of the ego's front (see the module docstring); once beside it, the ego
    passes without the limit (lingering beside a car is where a cut-in cannot be braked for)."""
    along = np.maximum(traffic.speeds * np.cos(relative), 0.0)
    ahead = beside & (s - extent > ego_s + _front_m(geometry))
    return [
        _follow(
            float(s[i]),
            2 * float(extent[i]),
            float(along[i]) + settings.pass_speed_delta_mps,
            geometry,
            settings,
        )
        for i in np.flatnonzero(ahead)
        if along[i] + settings.pass_speed_delta_mps < geometry.road_speed_mps
    ]


def _follow(s: float, length: float, speed: float, geometry: ToyWorldConfig, settings: YieldSettings) -> Stop:
    """Stop ``lead_gap_m`` + ``lead_time_gap_s`` x ``speed`` behind an object of ``length`` along the
    route centred at ``s``."""
    gap = settings.lead_gap_m + settings.lead_time_gap_s * speed
    return Stop(s - length / 2 - _front_m(geometry) - gap, speed)


def _yield_stop(
    route_xy: np.ndarray,
    route_heading: np.ndarray,
    traffic: Traffic,
    index: int,
    ego_s: float,
    ego_speed: float,
    geometry: ToyWorldConfig,
    settings: YieldSettings,
) -> Stop | None:
    """The stop car ``index`` asks for, or None when its path and the ego's do not meet in time."""
    box, speed = traffic.boxes[index], float(traffic.speeds[index])
    if traffic.waiting[index]:
        speed = max(speed, geometry.road_speed_mps)
    times = np.arange(0.0, settings.yield_horizon_s + 1e-9, settings.yield_step_s)
    cruise = max(speed, geometry.road_speed_mps)
    travelled = _distance(times, speed, settings.traffic_accel_mps2, cruise)
    positions, headings = _along_path(traffic.paths[index], travelled)
    s, d, route_heading_at = project_to_route(route_xy, route_heading, positions, geometry)
    boxes = np.repeat(box[None], len(times), axis=0)
    boxes[:, 2] = headings
    front = ego_s + _front_m(geometry)
    inside = (np.abs(d) < _half_corridor(boxes, route_heading_at, geometry, settings.yield_margin_m)) & (
        s > ego_s
    )
    if not inside.any():
        return None
    first = int(np.argmax(inside))
    # the nearest place its box reaches in the corridor: a car crossing at an angle, or turning
    # towards the ego along the corridor, reaches closer than where its centre first enters
    near_s = float((s - _half_extent_along(boxes, headings - route_heading_at))[inside].min())
    entry_s = float(s[first])
    exit_s = float(s[inside].max())
    # occupancy windows: the car's, widened by half its length at its speed; the ego's, from its
    # front reaching the entry to its rear leaving the exit, going on at up to the cruise speed
    widen = box[3] / 2 / max(speed, 1.0)
    car_in, car_out = float(times[first]) - widen, float(times[inside].max()) + widen
    ego_in = _time_to_cover(near_s - front, ego_speed, geometry.expert_accel, geometry.road_speed_mps)
    ego_out = _time_to_cover(
        exit_s - ego_s + geometry.rear_overhang_m + box[4],
        ego_speed,
        geometry.expert_accel,
        geometry.road_speed_mps,
    )
    if ego_in > car_out + settings.yield_buffer_s or ego_out < car_in - settings.yield_buffer_s:
        return None
    if math.cos(headings[first] - route_heading_at[first]) > _ALIGNED_COS and exit_s > entry_s + box[3]:
        return _follow(entry_s, float(box[3]), speed, geometry, settings)  # merges ahead of us: follow it
    last = len(inside) - 1 - int(np.argmax(inside[::-1]))
    towards = float(s[last]) < entry_s - box[3]  # inside the corridor it drives on towards the ego
    if ego_speed**2 / (2 * geometry.comfort_decel) > near_s - front and not (towards and ego_out >= car_in):
        return None  # too late to stop before its path: stopping would leave the ego standing in it
    return Stop(near_s - _front_m(geometry) - settings.yield_gap_m, 0.0)


def _distance(times: np.ndarray, speed: float, accel: float, cruise: float) -> np.ndarray:
    """Distance covered at ``times`` starting at ``speed``, accelerating at ``accel`` up to ``cruise``."""
    reach = (cruise - speed) / accel if accel > 0 else 0.0
    accelerating = speed * times + 0.5 * accel * times**2
    cruising = speed * reach + 0.5 * accel * reach**2 + cruise * (times - reach)
    return np.where(times < reach, accelerating, cruising)


def _time_to_cover(distance: float, speed: float, accel: float, cruise: float) -> float:
    """Seconds to cover ``distance`` from ``speed``, accelerating at ``accel`` up to ``cruise``."""
    distance, speed = max(distance, 0.0), max(speed, 0.0)
    if speed >= cruise:
        return distance / max(speed, 1e-3)
    reach = (cruise**2 - speed**2) / (2 * accel)
    if distance <= reach:
        return (math.sqrt(speed**2 + 2 * accel * distance) - speed) / accel
    return (cruise - speed) / accel + (distance - reach) / cruise


def _along_path(path: np.ndarray, distance: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Points ``[T, 2]`` and headings ``[T]`` at arc lengths ``distance`` along a polyline ``[P, 2]``
    (beyond its end it continues straight)."""
    step = np.diff(path, axis=0)
    lengths = np.hypot(step[:, 0], step[:, 1])
    cumulative = np.concatenate([[0.0], np.cumsum(lengths)])
    index = np.clip(np.searchsorted(cumulative, distance, side="right") - 1, 0, len(step) - 1)
    frac = (distance - cumulative[index]) / np.maximum(lengths[index], 1e-9)
    points = path[index] + frac[:, None] * step[index]
    return points, np.arctan2(step[index, 1], step[index, 0])
