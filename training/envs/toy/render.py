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
from training.envs.toy.scenario import interpolate_route

_DRIVABLE, _ROUTE, _VEHICLES, _OBSTACLES = 0, 1, 2, 3
_CORNER_ROWS, _CORNER_COLS = [0, 0, 1, 1], [0, 1, 0, 1]  # the 4 pixels around a line sample
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


@dataclass(frozen=True)
class _Layout:
    """What every render of one config draws at the same relative places, made once."""

    route_offsets: torch.Tensor  # [S] arc lengths around the ego of the route line's samples
    road_lateral: torch.Tensor  # [D] lateral offsets of the road surface's samples
    road_stride: int  # every ``road_stride``-th route sample carries road samples
    box_grid: torch.Tensor  # [G, 2] samples filling a car-sized box, box frame
    corners: torch.Tensor  # [4, 2] the 4 pixels around a line sample: (row, col) offsets
    box_channel: torch.Tensor  # [(V + O) * G] channel of each box sample: vehicles, then obstacles


@functools.lru_cache(maxsize=8)
def _layout(cfg: ToyWorldConfig, device: torch.device, num_vehicles: int, num_obstacles: int) -> _Layout:
    behind = (cfg.bev_size_px - cfg.bev_ego_row) * cfg.bev_resolution_m + 3.0
    ahead = cfg.bev_ego_row * cfg.bev_resolution_m + 6.0
    along = torch.arange(-cfg.length_m / 2, cfg.length_m / 2 + 1e-6, _SAMPLE_STEP_M, device=device)
    across = torch.arange(-cfg.width_m / 2, cfg.width_m / 2 + 1e-6, _SAMPLE_STEP_M, device=device)
    grid_a, grid_c = torch.meshgrid(along, across, indexing="ij")
    road_lateral = torch.arange(
        cfg.drivable_right_m + _SAMPLE_STEP_M / 2, cfg.drivable_left_m, _SAMPLE_STEP_M, device=device
    )
    box_samples = grid_a.numel()
    planes = [_VEHICLES] * (num_vehicles * box_samples) + [_OBSTACLES] * (num_obstacles * box_samples)
    return _Layout(
        route_offsets=torch.arange(-behind, ahead, _LINE_STEP_M, device=device, dtype=torch.float32),
        road_lateral=road_lateral,
        road_stride=int(round(_SAMPLE_STEP_M / _LINE_STEP_M)),
        box_grid=torch.stack([grid_a.reshape(-1), grid_c.reshape(-1)], dim=-1),
        corners=torch.tensor([_CORNER_ROWS, _CORNER_COLS], dtype=torch.float32, device=device).T.contiguous(),
        box_channel=torch.tensor(planes, device=device),
    )


def _world_to_pixels(inputs: RenderInputs, cfg: ToyWorldConfig) -> torch.Tensor:
    """``[N, 2, 3]`` affine maps from world ``(x, y, 1)`` to continuous ``(row, col)`` of the image
    padded by one pixel on every side."""
    x, y, yaw = inputs.ego_pose.unbind(-1)
    cos, sin = torch.cos(yaw) / cfg.bev_resolution_m, torch.sin(yaw) / cfg.bev_resolution_m
    # row = ego_row - x_ego / res, col = W / 2 - y_ego / res, with x_ego = cos dx + sin dy and
    # y_ego = -sin dx + cos dy
    row_offset = 1 + cfg.bev_ego_row + cos * x + sin * y  # + 1: the padded image's border
    col_offset = 1 + cfg.bev_size_px / 2 - sin * x + cos * y
    return torch.stack([-cos, -sin, row_offset, sin, -cos, col_offset], dim=-1).view(-1, 2, 3)


def _apply(affine: torch.Tensor, points: torch.Tensor) -> torch.Tensor:
    """``points`` ``[N, Q, 2]`` through the affine maps ``[N, 2, 3]``: ``[N, Q, 2]``."""
    return torch.baddbmm(affine[:, None, :, 2], points, affine[:, :, :2].transpose(1, 2))


def _padded_index(pixels: torch.Tensor, plane: int | torch.Tensor, cfg: ToyWorldConfig) -> torch.Tensor:
    """Indices ``[N, Q]`` into each world's ``[4 * (H + 2) * (W + 2)]`` planes of the pixels holding
    the points ``[N, Q, 2]`` (continuous ``(row, col)`` of the padded image, so pixel ``(i, j)`` of
    the image is ``(i + 1, j + 1)``); ``pixels`` is overwritten.

    Points off the image land in the one-pixel border (cropped away afterwards), so no
    per-point bounds test is needed. The arithmetic stays in float32, exact for these integers."""
    side = cfg.bev_size_px + 2
    cell = pixels.clamp_(0, side - 1).floor_()
    row, col = cell.unbind(-1)
    if not isinstance(plane, int) or plane:
        row = row + plane * side  # plane p starts p * side rows further
    return torch.add(col, row, alpha=side).long()


def _box_points(
    centres_px: torch.Tensor, axes_px: torch.Tensor, active: torch.Tensor, grid: torch.Tensor
) -> torch.Tensor:
    """Pixel-space samples ``[N, B * G, 2]`` filling each box (inactive boxes sent far off the image).

    ``axes_px`` ``[N, B, 2, 2]``: each box's along and across unit axes in pixel coordinates;
    ``grid`` ``[G, 2]``: the samples' (along, across) offsets in the box."""
    centres = torch.where(active[..., None], centres_px, -1e6)
    points = torch.matmul(grid, axes_px).add_(centres[:, :, None, :])  # [N, B, G, 2]
    return points.view(points.shape[0], -1, 2)


def render_bev(inputs: RenderInputs, cfg: ToyWorldConfig) -> torch.Tensor:
    """The BEV raster ``[N, 4, H, W]`` uint8 for a batch of worlds.

    Surfaces (road, boxes) are sampled every half pixel and each sample marks its pixel (one
    scatter for the road, one for every box); the route line's samples spread anti-aliased weights to their 4
    nearest pixels and each pixel keeps the largest (an ``amax`` scatter on integers), so the
    result is the same in any order and on any device. Geometry is mapped to pixel
    coordinates first (small arrays) and the many surface samples are made there.
    """
    n = inputs.ego_s.shape[0]
    size, side = cfg.bev_size_px, cfg.bev_size_px + 2
    layout = _layout(cfg, inputs.ego_s.device, inputs.vehicle_boxes.shape[1], inputs.obstacle_boxes.shape[1])
    affine = _world_to_pixels(inputs, cfg)
    linear = affine[:, :, :2]  # world directions to pixel directions

    s = inputs.ego_s[:, None] + layout.route_offsets
    route_xy, heading = interpolate_route(inputs.route_xy, inputs.route_heading, s, cfg)
    route_px = _apply(affine, route_xy)  # [N, S, 2]
    stride = layout.road_stride
    normal = torch.stack([-torch.sin(heading[:, ::stride]), torch.cos(heading[:, ::stride])], dim=-1)
    normal_px = torch.bmm(normal, linear.transpose(1, 2))  # [N, S', 2]
    road = torch.addcmul(
        route_px[:, ::stride, None, :], layout.road_lateral[:, None], normal_px[:, :, None, :]
    )

    boxes = torch.cat([inputs.vehicle_boxes, inputs.obstacle_boxes], dim=1).to(affine.dtype)  # [N, B, 3]
    centres_px = _apply(affine, boxes[..., :2])
    cos, sin = torch.cos(boxes[..., 2]), torch.sin(boxes[..., 2])
    axes = torch.stack([cos, sin, -sin, cos], dim=-1).view(n, -1, 2, 2)  # along, across (world)
    axes_px = torch.einsum("nbaj,nij->nbai", axes, linear)
    active = torch.cat([inputs.vehicle_active, inputs.obstacle_active], dim=1)
    box_px = _box_points(centres_px, axes_px, active, layout.box_grid)

    planes = torch.zeros(n, 4 * side * side, dtype=torch.uint8, device=inputs.ego_s.device)
    # every write is the same value, so duplicates cannot race: a plain scatter of one value,
    # several times faster than an ``amax`` scatter, gives the same image on any device
    planes.scatter_(1, _padded_index(road.view(n, -1, 2), _DRIVABLE, cfg), 255)
    planes.scatter_(1, _padded_index(box_px, layout.box_channel, cfg), 255)

    # Route centre line, anti-aliased: each sample spreads bilinear weights to its 4 nearest pixel
    # centres, and a pixel keeps the largest weight, so the line's sub-pixel position is visible.
    centred = route_px - 0.5  # relative to pixel centres
    base = centred.floor()
    frac = centred - base  # [N, S, 2]
    near = torch.stack([1 - frac, frac], dim=-1)  # [N, S, 2 (row, col), 2 (offset 0 or 1)]
    weight = near[:, :, 0, :, None] * near[:, :, 1, None, :]  # [N, S, 2, 2]: corners in _CORNER_* order
    index = _padded_index((base[:, :, None, :] + layout.corners).view(n, -1, 2), _ROUTE, cfg)
    planes.scatter_reduce_(1, index, (weight * 255).round_().to(torch.uint8).view(n, -1), "amax")

    image = planes.view(n, 4, side, side)[:, :, 1 : size + 1, 1 : size + 1]
    return image.contiguous()
