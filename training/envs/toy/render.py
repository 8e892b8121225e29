"""Bird's-eye-view raster rendered on the device, for a whole batch at once.

Image convention: ``[C, H, W]`` uint8, the ego's rear axle at row ``bev_ego_row`` and between
the two middle columns, facing up (ego x forward = up, ego y left = left). A point at ego
coordinates ``(x, y)`` falls in row ``floor(ego_row - x / res)`` and column
``floor(W / 2 - y / res)``. Channels (``BEV_CHANNELS``): drivable area, route centre line
(anti-aliased, so its sub-pixel position is visible), oncoming vehicles, parked obstacles.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from training.envs.toy.config import ToyWorldConfig
from training.envs.toy.dynamics import world_to_ego
from training.envs.toy.scenario import interpolate_route

_DRIVABLE, _ROUTE, _VEHICLES, _OBSTACLES = 0, 1, 2, 3
_SAMPLE_STEP_M = 0.25  # road surface sampling: half a pixel
_LINE_STEP_M = 0.125  # route line sampling: a quarter pixel


@dataclass
class RenderInputs:
    """What the renderer needs, batched over ``N`` worlds (world frame unless said)."""

    route_xy: torch.Tensor  # [N, P, 2]
    route_heading: torch.Tensor  # [N, P]
    ego_pose: torch.Tensor  # [N, 3] rear axle x, y, yaw
    ego_s: torch.Tensor  # [N] arc length of the rear axle
    vehicle_boxes: torch.Tensor  # [N, V, 3] centre x, y, heading of oncoming cars
    vehicle_active: torch.Tensor  # [N, V] bool
    obstacle_boxes: torch.Tensor  # [N, O, 3]
    obstacle_active: torch.Tensor  # [N, O] bool


def pixel_centre(row: int, col: int, cfg: ToyWorldConfig) -> tuple[float, float]:
    """Ego-frame coordinates (x forward, y left) of the centre of pixel ``(row, col)``."""
    res = cfg.bev_resolution_m
    return (cfg.bev_ego_row - (row + 0.5)) * res, (cfg.bev_size_px / 2 - (col + 0.5)) * res


def _to_pixels(points_ego: torch.Tensor, cfg: ToyWorldConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous (row, col) of ego-frame points; pixel ``(i, j)`` spans ``[i, i+1) x [j, j+1)``."""
    res = cfg.bev_resolution_m
    row = cfg.bev_ego_row - points_ego[..., 0] / res
    col = cfg.bev_size_px / 2 - points_ego[..., 1] / res
    return row, col


def _flat_index(
    row: torch.Tensor, col: torch.Tensor, channel: int | torch.Tensor, cfg: ToyWorldConfig
) -> torch.Tensor:
    """Index into a flat ``[N * C * H * W + 1]`` buffer; off-image points go to the last slot.

    ``row`` and ``col`` are ``[N, ...]``; ``channel`` is one channel or one per point (broadcast)."""
    size = cfg.bev_size_px
    n = row.shape[0]
    inside = (row >= 0) & (row < size) & (col >= 0) & (col < size)
    batch = torch.arange(n, device=row.device).view(n, *([1] * (row.dim() - 1))) * (4 * size * size)
    index = batch + channel * size * size + row.clamp(0, size - 1) * size + col.clamp(0, size - 1)
    return torch.where(inside, index, n * 4 * size * size)


@dataclass(frozen=True)
class _Layout:
    """What every render of one config draws at the same relative places, made once."""

    route_offsets: torch.Tensor  # [S] arc lengths around the ego of the route line's samples
    road_lateral: torch.Tensor  # [D] lateral offsets of the road surface's samples
    road_stride: int  # every ``road_stride``-th route sample carries road samples
    box_grid: torch.Tensor  # [G, 2] samples filling a car-sized box, box frame
    corner_rows: torch.Tensor  # [2, 2] the 4 pixels around a line sample: row offsets
    corner_cols: torch.Tensor  # [2, 2] ... and column offsets


@functools.lru_cache(maxsize=8)
def _layout(cfg: ToyWorldConfig, device: torch.device) -> _Layout:
    behind = (cfg.bev_size_px - cfg.bev_ego_row) * cfg.bev_resolution_m + 3.0
    ahead = cfg.bev_ego_row * cfg.bev_resolution_m + 6.0
    along = torch.arange(-cfg.length_m / 2, cfg.length_m / 2 + 1e-6, _SAMPLE_STEP_M, device=device)
    across = torch.arange(-cfg.width_m / 2, cfg.width_m / 2 + 1e-6, _SAMPLE_STEP_M, device=device)
    grid_a, grid_c = torch.meshgrid(along, across, indexing="ij")
    return _Layout(
        route_offsets=torch.arange(-behind, ahead, _LINE_STEP_M, device=device, dtype=torch.float32),
        road_lateral=torch.arange(
            cfg.drivable_right_m + _SAMPLE_STEP_M / 2, cfg.drivable_left_m, _SAMPLE_STEP_M, device=device
        ),
        road_stride=int(round(_SAMPLE_STEP_M / _LINE_STEP_M)),
        box_grid=torch.stack([grid_a.reshape(-1), grid_c.reshape(-1)], dim=-1),
        corner_rows=torch.tensor([[0, 0], [1, 1]], device=device),
        corner_cols=torch.tensor([[0, 1], [0, 1]], device=device),
    )


def _box_samples(boxes: torch.Tensor, active: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """World points ``[N, B * G, 2]`` filling each active box (inactive boxes sent far away)."""
    cos, sin = torch.cos(boxes[..., 2])[..., None], torch.sin(boxes[..., 2])[..., None]
    px = boxes[..., 0:1] + cos * grid[:, 0] - sin * grid[:, 1]
    py = boxes[..., 1:2] + sin * grid[:, 0] + cos * grid[:, 1]
    px = torch.where(active[..., None], px, 1e6)
    points = torch.stack([px, py], dim=-1)  # [N, B, G, 2]
    return points.reshape(points.shape[0], -1, 2)


def render_bev(inputs: RenderInputs, cfg: ToyWorldConfig) -> torch.Tensor:
    """The BEV raster ``[N, 4, H, W]`` uint8 for a batch of worlds.

    Surfaces (road, boxes) are sampled every half pixel and each sample marks its pixel, all
    channels in one write; the route line's samples spread anti-aliased weights to their 4
    nearest pixels and each pixel keeps the largest (an ``amax`` scatter on integers), so the
    result is the same in any order and on any device.
    """
    n = inputs.ego_s.shape[0]
    size = cfg.bev_size_px
    layout = _layout(cfg, inputs.ego_s.device)
    flat = torch.zeros(n * 4 * size * size + 1, dtype=torch.int32, device=inputs.ego_s.device)

    s = inputs.ego_s[:, None] + layout.route_offsets
    route_xy, heading = interpolate_route(inputs.route_xy, inputs.route_heading, s, cfg)
    normal = torch.stack([-torch.sin(heading), torch.cos(heading)], dim=-1)
    stride = layout.road_stride
    road = route_xy[:, ::stride, None, :] + layout.road_lateral[:, None] * normal[:, ::stride, None, :]
    boxes = torch.cat([inputs.vehicle_boxes, inputs.obstacle_boxes], dim=1)
    active = torch.cat([inputs.vehicle_active, inputs.obstacle_active], dim=1)
    num_vehicle_samples = inputs.vehicle_boxes.shape[1] * layout.box_grid.shape[0]
    surfaces = torch.cat([road.reshape(n, -1, 2), _box_samples(boxes, active, layout.box_grid)], dim=1)
    channel = _surface_channels(
        road.shape[1] * road.shape[2], num_vehicle_samples, surfaces.shape[1], flat.device
    )

    # one transform to pixels for the surfaces and the route line
    x, y, yaw = inputs.ego_pose.unbind(-1)
    row, col = _to_pixels(world_to_ego(torch.cat([surfaces, route_xy], dim=1), x, y, yaw), cfg)
    num_surface = surfaces.shape[1]
    index = _flat_index(
        row[:, :num_surface].floor().long(), col[:, :num_surface].floor().long(), channel, cfg
    )
    # every write is the same value, so duplicates cannot race: a plain fill, several times faster
    # than an ``amax`` scatter, gives the same image on any device
    flat.index_fill_(0, index.reshape(-1), 255)

    # Route centre line, anti-aliased: each sample spreads bilinear weights to its 4 nearest pixel
    # centres, and a pixel keeps the largest weight, so the line's sub-pixel position is visible.
    row, col = row[:, num_surface:] - 0.5, col[:, num_surface:] - 0.5  # relative to pixel centres
    r0, c0 = row.floor(), col.floor()
    fr, fc = row - r0, col - c0
    weight = torch.stack([1 - fr, fr], dim=-1)[..., :, None] * torch.stack([1 - fc, fc], dim=-1)[..., None, :]
    rows = r0.long()[..., None, None] + layout.corner_rows
    cols = c0.long()[..., None, None] + layout.corner_cols
    index = _flat_index(rows, cols, _ROUTE, cfg)
    flat.scatter_reduce_(0, index.reshape(-1), (weight * 255).round().to(torch.int32).reshape(-1), "amax")

    return flat[:-1].view(n, 4, size, size).to(torch.uint8)


@functools.lru_cache(maxsize=8)
def _surface_channels(num_road: int, num_vehicle: int, total: int, device: torch.device) -> torch.Tensor:
    """The channel ``[Q]`` of each surface sample: road, then vehicles, then obstacles."""
    channel = torch.full((total,), _OBSTACLES, device=device)
    channel[:num_road] = _DRIVABLE
    channel[num_road : num_road + num_vehicle] = _VEHICLES
    return channel
