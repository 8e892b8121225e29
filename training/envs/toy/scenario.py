"""Procedural scenarios: road (a curvature profile), target speeds, parked cars, oncoming traffic.

Every quantity is generated for a batch of scenario seeds at once with the counter-based
generator of ``rng.py``: a scenario depends only on its seed and the world config.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from training.envs.toy.config import ToyWorldConfig
from training.envs.toy.rng import in_range, uniform_streams

# One stream id per random quantity, so adding a quantity never shifts the others.
_S_SEG_LEN, _S_SEG_KIND, _S_SEG_MAG, _S_SEG_SIGN = 1, 2, 3, 4
_S_OBS_S, _S_OBS_ON, _S_VEH_S, _S_VEH_V, _S_VEH_ON = 5, 6, 7, 8, 9
_S_START = 10
_SEGMENT_STREAMS = (_S_SEG_LEN, _S_SEG_KIND, _S_SEG_MAG, _S_SEG_SIGN)


@dataclass
class Scenarios:
    """A batch of scenarios, ``M`` of them; route arrays are sampled every ``route_spacing_m``.

    Route point ``i`` sits at arc length ``s_i = -lead_in_m + i * route_spacing_m`` (``s = 0`` is
    the start, ``s = route_length_m`` the goal).
    """

    route_xy: torch.Tensor  # [M, P, 2] world frame, metres
    route_heading: torch.Tensor  # [M, P] rad, unwrapped
    route_curvature: torch.Tensor  # [M, P] 1/m, left turns positive
    target_speed: torch.Tensor  # [M, P] m/s, curvature-limited and smoothed for braking
    obstacle_s: torch.Tensor  # [M, O] arc length of parked cars
    obstacle_active: torch.Tensor  # [M, O] bool
    vehicle_s0: torch.Tensor  # [M, V] arc length of oncoming cars at t = 0
    vehicle_speed: torch.Tensor  # [M, V] m/s, driving towards decreasing s
    vehicle_active: torch.Tensor  # [M, V] bool
    start_speed: torch.Tensor  # [M]
    start_lateral: torch.Tensor  # [M] metres, left positive
    start_heading_error: torch.Tensor  # [M] rad


def _num_segments(cfg: ToyWorldConfig) -> int:
    return math.ceil((cfg.route_length_m + cfg.lead_out_m) / cfg.min_segment_m) + 1


def _curvature_profile(segments: list[torch.Tensor], cfg: ToyWorldConfig, s: torch.Tensor) -> torch.Tensor:
    """Piecewise curvature (straights, arcs, S-bends) of the road ahead of the start, ``[M, P]``,
    from the segments' uniform draws ``[M, G]`` (length, kind, magnitude, sign)."""
    length_u, kind, magnitude_u, sign_u = segments
    num_segments = kind.shape[1]
    lengths = in_range(length_u, cfg.min_segment_m, cfg.max_segment_m)
    ends = torch.cumsum(lengths, dim=1)  # [M, G]
    starts = ends - lengths
    s_batch = s.expand(kind.shape[0], -1).contiguous()
    seg = torch.searchsorted(ends, s_batch, right=True).clamp(max=num_segments - 1)  # [M, P]
    # kind: < 0.3 straight, < 0.7 arc, else S-bend
    magnitude = cfg.max_curvature * in_range(magnitude_u, 0.4, 1.0)
    sign = torch.where(sign_u < 0.5, -1.0, 1.0)
    seg_kind = kind.gather(1, seg)
    seg_curv = (magnitude * sign).gather(1, seg)
    seg_start = starts.gather(1, seg)
    seg_len = lengths.gather(1, seg)
    second_half = (s_batch - seg_start) > 0.5 * seg_len
    s_bend_sign = torch.where(second_half, -1.0, 1.0)
    curvature = torch.where(
        seg_kind < 0.3, 0.0, torch.where(seg_kind < 0.7, seg_curv, seg_curv * s_bend_sign)
    )
    return torch.where(s_batch < 0.0, 0.0, curvature)


def _smooth(values: torch.Tensor, width: int) -> torch.Tensor:
    """Moving average along the last axis with edge replication, so curvature ramps in.

    Written as element-wise adds rather than ``conv1d``: a convolution's result depends on the
    batch size on the CPU, which would make a scenario depend on the other worlds in its batch.
    """
    if width <= 1:
        return values
    padded = F.pad(values[:, None, :], ((width - 1) // 2, width // 2), mode="replicate")[:, 0, :]
    length = values.shape[1]
    total = padded[:, :length].clone()
    for shift in range(1, width):
        total = total + padded[:, shift : shift + length]
    return total / width


def _integrate_route(
    curvature: torch.Tensor, ds: float, start_index: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Heading and positions from curvature (trapezoid rule), with the start at the origin facing +x."""
    dheading = 0.5 * (curvature[:, 1:] + curvature[:, :-1]) * ds
    heading = torch.cat([torch.zeros_like(curvature[:, :1]), torch.cumsum(dheading, dim=1)], dim=1)
    heading = heading - heading[:, start_index : start_index + 1]
    mid = 0.5 * (heading[:, 1:] + heading[:, :-1])
    steps = torch.stack([torch.cos(mid), torch.sin(mid)], dim=-1) * ds
    xy = torch.cat([torch.zeros_like(steps[:, :1]), torch.cumsum(steps, dim=1)], dim=1)
    xy = xy - xy[:, start_index : start_index + 1]
    return xy, heading


def _target_speed(curvature: torch.Tensor, cfg: ToyWorldConfig) -> torch.Tensor:
    """Curvature-limited speed, lowered ahead of curves so a comfortable brake reaches it."""
    v_curve = torch.sqrt(cfg.max_lateral_accel / curvature.abs().clamp_min(1e-6)).clamp(
        max=cfg.road_speed_mps
    )
    ds = cfg.route_spacing_m
    window = int(math.ceil(cfg.road_speed_mps**2 / (2 * cfg.comfort_decel) / ds)) + 1
    padded = F.pad(v_curve[:, None, :], (0, window - 1), mode="replicate")[:, 0, :]
    ahead = padded.unfold(1, window, 1)  # [M, P, W]: v_curve at s + j * ds
    dist = torch.arange(window, device=curvature.device, dtype=curvature.dtype) * ds
    reachable = torch.sqrt(ahead**2 + 2 * cfg.comfort_decel * dist)
    return reachable.min(dim=-1).values


def generate_scenarios(seeds: torch.Tensor, cfg: ToyWorldConfig) -> Scenarios:
    """Scenarios for scenario seeds ``seeds`` ``[M]`` (int64) on ``seeds.device``."""
    device = seeds.device
    ds = cfg.route_spacing_m
    start_index = int(round(cfg.lead_in_m / ds))
    s = -cfg.lead_in_m + torch.arange(cfg.route_points, device=device, dtype=torch.float32) * ds
    obstacles, vehicles = cfg.max_obstacles, cfg.max_vehicles
    segment_draws = [(stream, _num_segments(cfg)) for stream in _SEGMENT_STREAMS]
    object_draws = [(_S_OBS_S, obstacles), (_S_OBS_ON, obstacles), (_S_VEH_S, vehicles)]
    object_draws += [(_S_VEH_V, vehicles), (_S_VEH_ON, vehicles), (_S_START, 3)]
    draws = uniform_streams(seeds, segment_draws + object_draws)
    segments = draws[: len(segment_draws)]
    obstacle_u, obstacle_on_u, vehicle_s_u, vehicle_v_u, vehicle_on_u, start = draws[len(segment_draws) :]
    smoothing = int(round(cfg.curvature_smoothing_m / ds))
    curvature = _smooth(_curvature_profile(segments, cfg, s[None, :]), smoothing)
    xy, heading = _integrate_route(curvature, ds, start_index)

    traffic_share = 0.15 + 0.6 * cfg.difficulty
    obstacle_s = in_range(obstacle_u, cfg.min_object_s_m, cfg.route_length_m)
    obstacle_on = obstacle_on_u < traffic_share
    far = cfg.route_length_m + cfg.lead_out_m
    vehicle_s0 = in_range(vehicle_s_u, cfg.min_object_s_m, far)
    v_lo, v_hi = cfg.vehicle_speed_range
    vehicle_speed = in_range(vehicle_v_u, v_lo, v_hi)
    vehicle_on = vehicle_on_u < traffic_share
    lo, hi = cfg.start_speed_range
    return Scenarios(
        route_xy=xy,
        route_heading=heading,
        route_curvature=curvature,
        target_speed=_target_speed(curvature, cfg),
        obstacle_s=obstacle_s,
        obstacle_active=obstacle_on,
        vehicle_s0=vehicle_s0,
        vehicle_speed=vehicle_speed,
        vehicle_active=vehicle_on,
        start_speed=lo + (hi - lo) * start[:, 0],
        start_lateral=cfg.start_lateral_m * (2 * start[:, 1] - 1),
        start_heading_error=cfg.start_heading_rad * (2 * start[:, 2] - 1),
    )


def interpolate_route(
    route_xy: torch.Tensor, route_heading: torch.Tensor, s: torch.Tensor, cfg: ToyWorldConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """Position ``[N, Q, 2]`` and heading ``[N, Q]`` of the route at arc lengths ``s`` ``[N, Q]``."""
    ds = cfg.route_spacing_m
    last = route_xy.shape[1] - 1
    u = ((s + cfg.lead_in_m) / ds).clamp(0.0, last - 1e-4)
    i0 = u.floor().long()
    frac = u - i0
    i1 = (i0 + 1).clamp(max=last)
    p0 = route_xy.gather(1, i0[..., None].expand(-1, -1, 2))
    p1 = route_xy.gather(1, i1[..., None].expand(-1, -1, 2))
    h0 = route_heading.gather(1, i0)
    h1 = route_heading.gather(1, i1)
    # Beyond either end, extend the road straight along its end heading.
    s_lo = -cfg.lead_in_m
    s_hi = s_lo + last * ds
    overshoot = torch.where(s < s_lo, s - s_lo, torch.where(s > s_hi, s - s_hi, torch.zeros_like(s)))
    heading = h0 + frac * (h1 - h0)
    xy = p0 + frac[..., None] * (p1 - p0)
    xy = xy + overshoot[..., None] * torch.stack([torch.cos(heading), torch.sin(heading)], dim=-1)
    return xy, heading


def frenet_to_world(
    route_xy: torch.Tensor, route_heading: torch.Tensor, s: torch.Tensor, d: torch.Tensor, cfg: ToyWorldConfig
) -> tuple[torch.Tensor, torch.Tensor]:
    """World position ``[N, Q, 2]`` of route coordinates (arc length ``s``, left offset ``d``)."""
    xy, heading = interpolate_route(route_xy, route_heading, s, cfg)
    normal = torch.stack([-torch.sin(heading), torch.cos(heading)], dim=-1)
    return xy + d[..., None] * normal, heading


def project_points_to_route(
    route_xy: torch.Tensor,
    route_heading: torch.Tensor,
    points: torch.Tensor,
    hint: torch.Tensor,
    cfg: ToyWorldConfig,
    window: tuple[int, int] = (-4, 16),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route coordinates of ``points`` ``[N, Q, 2]``, each searched near route index ``hint`` ``[N, Q]``.

    The nearest route segment among indices ``hint + window[0] .. hint + window[1]`` wins.
    Returns arc length ``s``, signed lateral offset ``d`` (left positive), route heading at the
    projection and the segment index, each ``[N, Q]``.
    """
    n, q = hint.shape
    last = route_xy.shape[1] - 1
    offsets = torch.arange(window[0], window[1], device=points.device)
    idx = (hint[..., None] + offsets).clamp(0, last - 1)  # [N, Q, W] segment starts
    flat = idx.reshape(n, -1)
    a = route_xy.gather(1, flat[..., None].expand(-1, -1, 2)).view(n, q, -1, 2)
    b = route_xy.gather(1, (flat + 1)[..., None].expand(-1, -1, 2)).view(n, q, -1, 2)
    seg = b - a
    rel = points[..., None, :] - a
    t = ((rel * seg).sum(-1) / (seg * seg).sum(-1).clamp_min(1e-9)).clamp(0.0, 1.0)
    dist2 = ((rel - t[..., None] * seg) ** 2).sum(-1)
    best = dist2.argmin(dim=-1, keepdim=True)  # [N, Q, 1]
    seg_b = seg.gather(2, best[..., None].expand(-1, -1, -1, 2))[..., 0, :]
    rel_b = rel.gather(2, best[..., None].expand(-1, -1, -1, 2))[..., 0, :]
    t_b = t.gather(2, best)[..., 0]
    i_b = idx.gather(2, best)[..., 0]
    seg_len = seg_b.norm(dim=-1).clamp_min(1e-9)
    d = (seg_b[..., 0] * rel_b[..., 1] - seg_b[..., 1] * rel_b[..., 0]) / seg_len
    s = -cfg.lead_in_m + (i_b.to(points.dtype) + t_b) * cfg.route_spacing_m
    h0 = route_heading.gather(1, i_b)
    h1 = route_heading.gather(1, i_b + 1)
    return s, d, h0 + t_b * (h1 - h0), i_b


def project_to_route(
    route_xy: torch.Tensor,
    route_heading: torch.Tensor,
    point: torch.Tensor,
    hint: torch.Tensor,
    cfg: ToyWorldConfig,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Route coordinates of one point per world, ``point`` ``[N, 2]`` near route index ``hint`` ``[N]``.

    Returns arc length ``s`` [N], signed lateral offset ``d`` [N] (left positive), the route
    heading at the projection [N] and the new index hint [N].
    """
    s, d, heading, index = project_points_to_route(
        route_xy, route_heading, point[:, None], hint[:, None], cfg
    )
    return s[:, 0], d[:, 0], heading[:, 0], index[:, 0]


def interpolate_profile(values: torch.Tensor, s: torch.Tensor, cfg: ToyWorldConfig) -> torch.Tensor:
    """A per-route-point profile ``values`` ``[N, P]`` read at arc lengths ``s`` ``[N, Q]``."""
    last = values.shape[1] - 1
    u = ((s + cfg.lead_in_m) / cfg.route_spacing_m).clamp(0.0, last - 1e-4)
    i0 = u.floor().long()
    frac = u - i0
    v0 = values.gather(1, i0)
    v1 = values.gather(1, (i0 + 1).clamp(max=last))
    return v0 + frac * (v1 - v0)


class ScenarioBank:
    """Scenarios generated in bulk for a run of consecutive seeds, so an autoreset gathers the
    finished worlds' new scenarios instead of generating a few at a time (scenario generation
    is some 200 small tensor ops whatever the batch, the gather a handful).

    A scenario depends only on its seed, so a world gets bit for bit the scenario it would
    have got from :func:`generate_scenarios`. The bank holds seeds ``start .. start + size - 1``;
    ``start`` is a device tensor, so refilling never reads a seed back to the host.
    """

    def __init__(self, cfg: ToyWorldConfig, size: int) -> None:
        self.cfg = cfg
        self.size = size
        self.start: torch.Tensor | None = None
        self.scenarios: Scenarios | None = None

    def refill(self, start: torch.Tensor) -> None:
        """Generate the scenarios of seeds ``start .. start + size - 1`` (``start`` a 0-d int64 tensor)."""
        self.start = start.clone()
        seeds = start + torch.arange(self.size, device=start.device)
        self.scenarios = generate_scenarios(seeds, self.cfg)

    def refill_front(self, start: torch.Tensor, count: int) -> None:
        """Write the scenarios of seeds ``start .. start + count - 1`` into the bank's first
        ``count`` places, in place (a step captured into a CUDA graph keeps its tensors); the
        bank then holds only those seeds."""
        seeds = start + torch.arange(count, device=start.device)
        fresh = generate_scenarios(seeds, self.cfg)
        self.start.copy_(start)
        for field in dataclasses.fields(Scenarios):
            getattr(self.scenarios, field.name)[:count].copy_(getattr(fresh, field.name))

    def index_of(self, seeds: torch.Tensor) -> torch.Tensor:
        """Places in the bank of ``seeds`` ``[M]``, each of which the bank must hold."""
        return seeds - self.start

    def take(self, seeds: torch.Tensor) -> Scenarios:
        """The scenarios of ``seeds`` ``[M]``, each of which the bank must hold."""
        index = self.index_of(seeds)
        return Scenarios(
            *(getattr(self.scenarios, f.name)[index] for f in dataclasses.fields(self.scenarios))
        )

    def holds(self, first: int, count: int) -> bool:
        """Whether seeds ``first .. first + count - 1`` are in the bank (reads ``start``: CPU only)."""
        if self.start is None:
            return False
        start = int(self.start)
        return start <= first and first + count <= start + self.size
