"""Bird's-eye-view raster rendered on the device, for a whole batch at once.

Image convention: ``[C, H, W]`` uint8, the ego's rear axle at row ``bev_ego_row`` and between
the two middle columns, facing up (ego x forward = up, ego y left = left). A point at ego
coordinates ``(x, y)`` falls in row ``floor(ego_row - x / res)`` and column
``floor(W / 2 - y / res)``. Channels (``BEV_CHANNELS``): drivable area, route centre line
(anti-aliased, so its sub-pixel position is visible), oncoming vehicles, parked obstacles.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch

from training.envs.toy.config import ToyWorldConfig

# the image's channels (BEV_CHANNELS)
_DRIVABLE, _ROUTE, _VEHICLES, _OBSTACLES = 0, 1, 2, 3
_LINE_STEP_M = 0.125  # route line sampling: a quarter pixel
_OUTLINE_STEP_PX = 1.0  # outline edges are at most one pixel long, so each crosses at most one row centre
# A surface lights the pixels whose centre lies inside it grown by a margin, so that a pixel it
# covers in good part is lit, as the first renderer's samples every half pixel did (a pixel holding
# a sample was lit); each margin lights as many pixels as that renderer did, within 0.4% (measured
# over driven worlds at difficulties 0, 0.5 and 1; see test_toy_render.py).
_ROAD_MARGIN_M = 0.14
_BOX_MARGIN_M = 0.25


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
class RenderLayout:
    """What every render of one config draws at the same relative places, made once."""

    quarter_turns: torch.Tensor  # [4] 0, -pi/2, pi/2, 0
    ego_pixel: torch.Tensor  # [2, 1] the ego's rear axle, continuous (row, col) of the padded image
    behind_m: float  # the route is drawn from this far behind the ego's arc length
    window: torch.Tensor  # [W] the route points drawn, from the first one behind: 0 .. W - 1
    last_first_point: int  # the largest index of the first route point drawn
    # [S] the route's samples, in route points from the one at ``ego_s - behind``
    sample_offsets: torch.Tensor
    road_vertices: torch.Tensor  # [2V] the sample of each road-outline edge's start, then of its end
    road_lateral: torch.Tensor  # [2V] their lateral offsets (m, left of the route)
    # [2, 2G] a car-sized box's outline edges in the box frame: (along, across) of their starts, then ends
    box_edges: torch.Tensor
    edge_planes: torch.Tensor  # [V + B * G] the plane of every outline edge: the road's, then each box's
    corner_offsets: torch.Tensor  # [4, 1] the 4 pixels around a line sample: offsets of their cell indices


def _subdivide(points: list[tuple[float, float]], step: float) -> list[tuple[float, float]]:
    """The closed polygon through ``points`` with vertices added so that no edge is longer than ``step``."""
    out = []
    for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True):
        pieces = max(1, math.ceil(math.hypot(x1 - x0, y1 - y0) / step))
        out += [(x0 + (x1 - x0) * k / pieces, y0 + (y1 - y0) * k / pieces) for k in range(pieces)]
    return out


def _edges(outline: list[tuple[float, float]]) -> torch.Tensor:
    """``[2, 2V]``: the closed outline's edges, coordinates of their starts then of their ends."""
    return torch.tensor(outline + outline[1:] + outline[:1], dtype=torch.float32).T


def _road_outline(samples: int, cfg: ToyWorldConfig, step_m: float) -> list[tuple[float, float]]:
    """(sample, lateral offset) of the road outline's vertices: its left side forward, across its far
    end, its right side back and across its near end. Every second sample (a quarter metre) keeps
    the outer edge of the sharpest curve under a pixel per edge."""
    left, right = cfg.drivable_left_m + _ROAD_MARGIN_M, cfg.drivable_right_m - _ROAD_MARGIN_M
    across = torch.linspace(left, right, math.ceil((left - right) / step_m) + 1)[1:-1].tolist()
    along = list(range(0, samples, 2))
    return (
        [(k, left) for k in along]
        + [(along[-1], d) for d in across]
        + [(k, right) for k in reversed(along)]
        + [(0, d) for d in reversed(across)]
    )


@functools.lru_cache(maxsize=8)
def render_layout(
    cfg: ToyWorldConfig, device: torch.device, num_vehicles: int, num_obstacles: int
) -> RenderLayout:
    """What every render of ``cfg`` with these numbers of boxes draws at the same places (cached)."""
    behind = (cfg.bev_size_px - cfg.bev_ego_row) * cfg.bev_resolution_m + 3.0
    ahead = cfg.bev_ego_row * cfg.bev_resolution_m + 6.0
    step_m = _OUTLINE_STEP_PX * cfg.bev_resolution_m
    side = cfg.bev_size_px + 2
    offsets = torch.arange(0.0, behind + ahead, _LINE_STEP_M, dtype=torch.float32) / cfg.route_spacing_m
    points = int(offsets[-1]) + 3  # from the route point at or behind the first sample to one beyond the last
    road = _edges(_road_outline(len(offsets), cfg, step_m))
    half_l, half_w = cfg.length_m / 2 + _BOX_MARGIN_M, cfg.width_m / 2 + _BOX_MARGIN_M
    box = _edges(
        _subdivide([(half_l, half_w), (-half_l, half_w), (-half_l, -half_w), (half_l, -half_w)], step_m)
    )
    box_planes = [_VEHICLES] * num_vehicles + [_OBSTACLES] * num_obstacles
    planes = [_DRIVABLE] * (road.shape[1] // 2) + [p for p in box_planes for _ in range(box.shape[1] // 2)]
    return RenderLayout(
        quarter_turns=torch.tensor([0.0, -math.pi / 2, math.pi / 2, 0.0], device=device),
        ego_pixel=torch.tensor([[1.0 + cfg.bev_ego_row], [1.0 + cfg.bev_size_px / 2]], device=device),
        behind_m=behind,
        window=torch.arange(points, device=device),
        last_first_point=cfg.route_points - points,
        sample_offsets=offsets.to(device),
        road_vertices=road[0].long().to(device),
        road_lateral=road[1].to(device),
        box_edges=box.to(device),
        edge_planes=torch.tensor(planes, dtype=torch.float32, device=device),
        corner_offsets=torch.tensor([[0], [1], [side], [side + 1]], device=device),
    )


class _PixelMap(NamedTuple):
    """Affine maps from world ``(x, y)`` to continuous ``(row, col)`` of the image padded by one
    pixel on every side: ``pixels = linear @ world + offset``."""

    linear: torch.Tensor  # [N, 2, 2]
    offset: torch.Tensor  # [N, 2, 1]

    def points(self, xy: torch.Tensor) -> torch.Tensor:
        """World points ``[N, 2, Q]`` (x, y) to pixels ``[N, 2, Q]`` (row, col)."""
        return torch.baddbmm(self.offset, self.linear, xy)


def _world_to_pixels(inputs: RenderInputs, layout: RenderLayout, cfg: ToyWorldConfig) -> _PixelMap:
    """row = ego_row - x_ego / res and col = W / 2 - y_ego / res, with x_ego = cos dx + sin dy and
    y_ego = -sin dx + cos dy (+ 1 on both: the padded image's border). So the linear part is
    ``-R(-yaw) / res``; its four entries are cosines of ``yaw + (0, -pi/2, pi/2, 0)``."""
    pose = inputs.ego_pose
    linear = torch.cos(pose[:, 2:] + layout.quarter_turns).mul_(-1 / cfg.bev_resolution_m).view(-1, 2, 2)
    return _PixelMap(linear, torch.baddbmm(layout.ego_pixel, linear, pose[:, :2, None], alpha=-1))


def _cell_index(cells: torch.Tensor, plane: int | torch.Tensor, side: int) -> torch.Tensor:
    """Indices into each world's ``[P * side * side]`` planes of the padded-image cells ``[..., 2,
    Q]`` (rows, then columns: integer-valued floats, overwritten) in ``plane`` (an int or ``[Q]``).

    Cells off the image go to its one-pixel border, cropped away afterwards, so no per-point
    bounds test is needed. Float32 is exact for these integers."""
    row, col = cells.clamp_(0, side - 1).unbind(-2)
    if not isinstance(plane, int) or plane:
        row = row.add_(plane, alpha=side)  # plane p starts p * side rows further
    return torch.add(col, row, alpha=side).long()


def _route_samples(
    inputs: RenderInputs, pixels: _PixelMap, layout: RenderLayout, cfg: ToyWorldConfig
) -> torch.Tensor:
    """The route around the ego, every ``_LINE_STEP_M`` of arc length from ``ego_s - behind``, in
    pixels ``[N, 4, S]``: rows and columns of its centre line, then of its left normal there.

    The route points drawn are gathered and mapped to pixels first (a few dozen per world); the
    samples are linear between them, normals included (their length errs by under 3e-4 on the
    sharpest curve: 2 mm at the road's edge). ``interpolate_route`` would gather and map each of the
    ~330 samples: 2.5x this function's time at 128 worlds. Beyond the route's ends the last segment
    extends."""
    spacing = cfg.route_spacing_m
    position = (inputs.ego_s + cfg.lead_in_m - layout.behind_m) / spacing  # in route points
    first = position.floor().clamp_(0, layout.last_first_point)
    index = first.long()[:, None] + layout.window  # [N, W]
    xy = inputs.route_xy.gather(1, index[..., None].expand(-1, -1, 2)).transpose(1, 2)  # [N, 2, W]
    heading = inputs.route_heading.gather(1, index)
    normal = torch.stack([-torch.sin(heading), torch.cos(heading)], dim=1)
    points = torch.cat([pixels.points(xy), torch.bmm(pixels.linear, normal)], dim=1)
    along = (position - first)[:, None] + layout.sample_offsets  # [N, S], in route points from the first
    segment = along.floor().clamp_(0, len(layout.window) - 2)
    start = segment.long()[:, None].expand(-1, 4, -1)
    return torch.lerp(points.gather(2, start), points.gather(2, start + 1), (along - segment)[:, None])


def _road_edges(route: torch.Tensor, layout: RenderLayout) -> torch.Tensor:
    """The road outline's edges ``[N, 2 (row, col), 2 (start, end), V]`` in pixels, from the route
    ``[N, 4, S]`` (see ``_route_samples``)."""
    n = route.shape[0]
    # on a 2-D view: index_select along the last of 3 dimensions is several times slower on the CPU
    at_vertices = route.view(n * 4, -1).index_select(1, layout.road_vertices).view(n, 4, -1)
    edges = torch.addcmul(at_vertices[:, :2], at_vertices[:, 2:], layout.road_lateral)
    return edges.view(n, 2, 2, -1)


def _box_edges(
    pixels: _PixelMap, boxes: torch.Tensor, active: torch.Tensor, layout: RenderLayout
) -> torch.Tensor:
    """The outline edges ``[N, 2 (row, col), 2 (start, end), B * G]`` in pixels of the boxes ``[N,
    B, 3]`` (centre x, y, heading; inactive boxes sent far off the image)."""
    n, count = boxes.shape[:2]
    centres = pixels.points(boxes[..., :2].transpose(1, 2))  # [N, 2, B]
    centres = torch.where(active[:, None], centres, -1e6)
    cos, sin = torch.cos(boxes[..., 2]), torch.sin(boxes[..., 2])
    rotation = torch.stack([cos, -sin, sin, cos], dim=-1).view(n, count, 2, 2)  # box frame to world
    axes = torch.matmul(pixels.linear[:, None], rotation)  # box frame to pixels [N, B, 2, 2]
    edges = torch.matmul(axes, layout.box_edges).add_(centres.transpose(1, 2)[..., None])  # [N, B, 2, 2G]
    return edges.view(n, count, 2, 2, -1).permute(0, 2, 3, 1, 4).reshape(n, 2, 2, -1)


def _row_crossings(edges: torch.Tensor, layout: RenderLayout, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where the outlines' edges ``[N, 2 (row, col), 2 (start, end), E]`` (padded-image pixels, a
    pixel long or less) cross pixel-row centres: indices ``[N, E]`` into the planes of the first
    pixel whose centre lies right of the crossing, and the edge's direction (+1 down, -1 up, 0 no
    crossing).

    Summed along each row, the directions give the winding number of every pixel centre: non-zero
    inside a polygon (the nonzero rule, so overlapping boxes stay filled). An edge covers the row
    centres in ``[min(r0, r1), max(r0, r1))``: at most one, as no edge is longer than a pixel."""
    r0, r1, c0, c1 = edges.view(edges.shape[0], 4, -1).unbind(1)
    row = torch.minimum(r0, r1).sub_(0.5).ceil_()  # the first row whose centre is at or below
    centre = row + 0.5
    crosses = centre < torch.maximum(r0, r1)
    rise = torch.where(crosses, r1 - r0, 1.0)
    col = torch.addcmul(c0, (centre - r0).div_(rise), c1 - c0).sub_(0.5).ceil_()
    direction = torch.where(crosses, rise.sign(), 0.0)
    index = _cell_index(torch.stack([row, col], dim=1), layout.edge_planes, side)
    return index, direction


def _route_line_splat(
    route_px: torch.Tensor, layout: RenderLayout, side: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``[N, 4 * S]`` of the 4 pixels around each route-line sample ``[N, 2, S]`` and their
    bilinear weights as uint8 levels.

    Positions are clamped into ``[0, side - 1]`` first: a sample outside reaches no pixel of the
    image, and clamped it puts all its weight on a border pixel (a corner one further, weighing 0,
    may wrap into the next row's or plane's border), so nothing reaches the image either."""
    centred = route_px.sub(0.5).clamp_(0, side - 1)  # relative to pixel centres
    base = centred.floor()
    frac = centred - base  # [N, 2 (row, col), S]
    near = torch.stack([1 - frac, frac], dim=1)  # [N, 2 (offset 0 or 1), 2 (row, col), S]
    weight = near[:, :, None, 0] * near[:, None, :, 1]  # [N, 2, 2, S]: corners (0, 0), (0, 1), (1, 0), (1, 1)
    n = route_px.shape[0]
    index = _cell_index(base, _ROUTE, side)[:, None] + layout.corner_offsets
    return index.view(n, -1), weight.mul_(255).round_().to(torch.uint8).view(n, -1)


def _running_sum_along_rows(planes: torch.Tensor, *, outer_scan: bool) -> torch.Tensor:
    """Running sums (uint8, modulo 256) along the rows of ``planes`` ``[P, H, W]``.

    ``outer_scan`` scans columns of the transposed planes instead, the same integers: CUDA's scan
    along the innermost dimension is slow on rows this short (on an H200 it took 70% of a world
    step at 16,384 worlds, 22 ms of 64), while its scan along an outer dimension reads and writes
    coalesced. On the CPU the two transposing copies cost more than they save, so it scans rows.
    """
    if not outer_scan:
        return planes.cumsum(-1, dtype=torch.uint8)
    columns = planes.transpose(1, 2).contiguous().cumsum(1, dtype=torch.uint8)
    return columns.transpose(1, 2).contiguous()


def render_bev(inputs: RenderInputs, cfg: ToyWorldConfig, layout: RenderLayout | None = None) -> torch.Tensor:
    """The BEV raster ``[N, 4, H, W]`` uint8 for a batch of worlds (``layout``: ``render_layout``'s
    for these inputs, looked up when not given; a compiled caller passes it, as the lookup reads
    tensors back to the host).

    Surfaces (road, boxes) are polygons filled by scanline: their outlines' crossings of pixel-row
    centres are added into the planes (one scatter for all of them) and a running sum along each
    row lights the pixels whose centre lies inside. The route line's samples spread anti-aliased
    weights to their 4 nearest pixels and each pixel keeps the largest (an ``amax`` scatter on
    integers). Every write is exact, so the result is the same in any order and on any device.
    Geometry is mapped to pixel coordinates first, rows and columns in planes ``[N, 2, Q]`` (an
    operation on a trailing dimension of 2 costs several times one on contiguous planes on the CPU).
    """
    n = inputs.ego_s.shape[0]
    size, side = cfg.bev_size_px, cfg.bev_size_px + 2
    if layout is None:
        boxes = inputs.vehicle_boxes.shape[1], inputs.obstacle_boxes.shape[1]
        layout = render_layout(cfg, inputs.ego_s.device, *boxes)
    pixels = _world_to_pixels(inputs, layout, cfg)

    route = _route_samples(inputs, pixels, layout, cfg)
    road = _road_edges(route, layout)

    boxes = torch.cat([inputs.vehicle_boxes, inputs.obstacle_boxes], dim=1).float()  # [N, B, 3]
    active = torch.cat([inputs.vehicle_active, inputs.obstacle_active], dim=1)
    edges = torch.cat([road, _box_edges(pixels, boxes, active, layout)], dim=-1)

    index, direction = _row_crossings(edges, layout, side)
    # windings counted in uint8 (modulo 256: -1 is 255), exact for fewer than 256 overlapping boxes
    planes = torch.zeros(n, 4 * side * side, dtype=torch.uint8, device=inputs.ego_s.device)
    planes.scatter_add_(1, index, direction.to(torch.int8).view(torch.uint8))
    planes = _running_sum_along_rows(planes.view(n * 4, side, side), outer_scan=planes.is_cuda)
    planes = planes.clamp_(max=1).mul_(255).view(n, -1)  # 255 inside, 0 outside

    # Route centre line, anti-aliased: each sample spreads bilinear weights to its 4 nearest pixel
    # centres, and a pixel keeps the largest weight, so the line's sub-pixel position is visible.
    # Its plane has no crossings, so it is still all zeros here.
    planes.scatter_reduce_(1, *_route_line_splat(route[:, :2], layout, side), "amax")
    return planes.view(n, 4, side, side)[:, :, 1 : size + 1, 1 : size + 1].contiguous()
