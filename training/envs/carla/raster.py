"""Bird's-eye-view raster from plain geometry (numpy arrays, right-handed world frame).

As Roach-style BEVs do, the picture is drawn from the map's lanes and the actors' boxes, not
from a camera. The conventions are the toy world's (``training/envs/toy/render.py``): ``[C, H, W]``
uint8, the ego's reference point at row ``ego_row`` between the two middle columns, facing up
(ego x forward = up, ego y left = left). A pixel is set when its *centre* lies inside a shape,
so the result does not depend on drawing order.

Channels (``BEV_CHANNELS``): 0 drivable area (every driving lane of the map), 1 route centre line
(anti-aliased: 255 * max(0, 1 - distance / resolution)), 2 vehicles (other road users' boxes),
3 obstacles (parked cars of the map and static props).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from training.envs.carla.config import CarlaConfig

DRIVABLE, ROUTE, VEHICLES, OBSTACLES = 0, 1, 2, 3
NUM_CHANNELS = 4
_SEGMENT_CHUNK = 256  # segments tested against all pixels at once (bounds memory)

FloatArray = np.ndarray


@dataclass(frozen=True)
class BevGrid:
    """Size and placement of the raster."""

    size_px: int = 64
    resolution_m: float = 0.5
    ego_row: int = 58

    @staticmethod
    def from_config(cfg: CarlaConfig) -> BevGrid:
        return BevGrid(cfg.bev_size_px, cfg.bev_resolution_m, cfg.bev_ego_row)

    @property
    def reach_m(self) -> float:
        """Distance from the ego beyond which nothing can touch the image."""
        res, size = self.resolution_m, self.size_px
        return float(np.hypot(max(self.ego_row, size - self.ego_row), size / 2) * res) + res


@dataclass(frozen=True)
class SceneGeometry:
    """What one world's raster shows, all in the right-handed world frame (metres, radians).

    ``lane_start``/``lane_end`` ``[M, 2]`` are lane centre-line segments with half widths
    ``lane_half_width`` ``[M]``; ``route_xy`` ``[P, 2]`` is the route centre line;
    boxes ``[B, 5]`` are ``centre x, centre y, yaw, half length, half width``.
    """

    lane_start: FloatArray
    lane_end: FloatArray
    lane_half_width: FloatArray
    route_xy: FloatArray
    vehicle_boxes: FloatArray
    obstacle_boxes: FloatArray


def empty_boxes() -> FloatArray:
    return np.zeros((0, 5))


def world_to_ego(points: FloatArray, pose: FloatArray) -> FloatArray:
    """Points ``[..., 2]`` in the world frame to the ego frame of ``pose = (x, y, yaw)``."""
    x, y, yaw = pose
    cos, sin = np.cos(yaw), np.sin(yaw)
    dx, dy = points[..., 0] - x, points[..., 1] - y
    return np.stack([cos * dx + sin * dy, -sin * dx + cos * dy], axis=-1)


def ego_to_world(points: FloatArray, pose: FloatArray) -> FloatArray:
    """Points ``[..., 2]`` in the ego frame of ``pose`` to the world frame."""
    x, y, yaw = pose
    cos, sin = np.cos(yaw), np.sin(yaw)
    px, py = points[..., 0], points[..., 1]
    return np.stack([x + cos * px - sin * py, y + sin * px + cos * py], axis=-1)


def pixel_centres_ego(grid: BevGrid) -> FloatArray:
    """Ego-frame coordinates ``[H, W, 2]`` (x forward, y left) of every pixel centre."""
    index = np.arange(grid.size_px) + 0.5
    x = (grid.ego_row - index) * grid.resolution_m  # by row
    y = (grid.size_px / 2 - index) * grid.resolution_m  # by column
    return np.stack(np.meshgrid(x, y, indexing="ij"), axis=-1)


def _segment_distance2(points: FloatArray, start: FloatArray, end: FloatArray) -> FloatArray:
    """Squared distance ``[Q, M]`` from each point ``[Q, 2]`` to each segment ``[M, 2] -> [M, 2]``.

    Written on separate x and y arrays: numpy reduces a trailing axis of size 2 slowly.
    """
    px, py = points[:, 0:1], points[:, 1:2]
    ax, ay = start[:, 0], start[:, 1]
    dx, dy = end[:, 0] - ax, end[:, 1] - ay
    inv_length2 = 1.0 / np.maximum(dx * dx + dy * dy, 1e-12)
    rx, ry = px - ax, py - ay
    t = np.clip((rx * dx + ry * dy) * inv_length2, 0.0, 1.0)
    cx, cy = rx - t * dx, ry - t * dy
    return cx * cx + cy * cy


def _near(start: FloatArray, end: FloatArray, centre: FloatArray, radius: float) -> np.ndarray:
    """Mask ``[M]`` of segments that can come within ``radius`` of ``centre``."""
    length = np.linalg.norm(end - start, axis=-1)
    return np.linalg.norm(start - centre, axis=-1) <= radius + length


def lanes_mask(
    start: FloatArray, end: FloatArray, half_width: FloatArray, pose: FloatArray, grid: BevGrid
) -> np.ndarray:
    """Bool ``[H, W]``: pixel centres within a lane's half width of its centre-line segment."""
    keep = _near(start, end, pose[:2], grid.reach_m + float(half_width.max(initial=0.0)))
    start, end, half_width = start[keep], end[keep], half_width[keep]
    centres = ego_to_world(pixel_centres_ego(grid).reshape(-1, 2), pose)
    inside = np.zeros(centres.shape[0], dtype=bool)
    for first in range(0, start.shape[0], _SEGMENT_CHUNK):
        chunk = slice(first, first + _SEGMENT_CHUNK)
        distance2 = _segment_distance2(centres, start[chunk], end[chunk])
        inside |= (distance2 <= half_width[chunk][None, :] ** 2).any(axis=1)
    return inside.reshape(grid.size_px, grid.size_px)


def boxes_mask(boxes: FloatArray, pose: FloatArray, grid: BevGrid) -> np.ndarray:
    """Bool ``[H, W]``: pixel centres inside any oriented box ``[B, 5]``."""
    if boxes.shape[0] == 0:
        return np.zeros((grid.size_px, grid.size_px), dtype=bool)
    reach = grid.reach_m + np.hypot(boxes[:, 3], boxes[:, 4])
    boxes = boxes[np.linalg.norm(boxes[:, :2] - pose[:2], axis=-1) <= reach]
    centres = ego_to_world(pixel_centres_ego(grid).reshape(-1, 2), pose)
    rel = centres[:, None, :] - boxes[None, :, :2]  # [Q, B, 2]
    cos, sin = np.cos(boxes[:, 2]), np.sin(boxes[:, 2])
    along = rel[..., 0] * cos + rel[..., 1] * sin
    across = -rel[..., 0] * sin + rel[..., 1] * cos
    inside = (np.abs(along) <= boxes[:, 3]) & (np.abs(across) <= boxes[:, 4])
    return inside.any(axis=1).reshape(grid.size_px, grid.size_px)


def polyline_intensity(points: FloatArray, pose: FloatArray, grid: BevGrid) -> np.ndarray:
    """Uint8 ``[H, W]``: an anti-aliased line along ``points`` ``[P, 2]``, 255 on the line."""
    image = np.zeros((grid.size_px, grid.size_px), dtype=np.uint8)
    if points.shape[0] < 2:
        return image
    start, end = points[:-1], points[1:]
    keep = _near(start, end, pose[:2], grid.reach_m + grid.resolution_m)
    if not keep.any():
        return image
    centres = ego_to_world(pixel_centres_ego(grid).reshape(-1, 2), pose)
    nearest2 = np.full(centres.shape[0], np.inf)
    start, end = start[keep], end[keep]
    for first in range(0, start.shape[0], _SEGMENT_CHUNK):
        chunk = slice(first, first + _SEGMENT_CHUNK)
        nearest2 = np.minimum(nearest2, _segment_distance2(centres, start[chunk], end[chunk]).min(axis=1))
    weight = np.clip(1.0 - np.sqrt(nearest2) / grid.resolution_m, 0.0, 1.0)
    return np.round(weight * 255).astype(np.uint8).reshape(grid.size_px, grid.size_px)


def render_bev(scene: SceneGeometry, pose: FloatArray, grid: BevGrid) -> np.ndarray:
    """The BEV ``[4, H, W]`` uint8 of one world seen from ``pose = (x, y, yaw)`` (world frame)."""
    pose = np.asarray(pose, dtype=np.float64)
    bev = np.zeros((NUM_CHANNELS, grid.size_px, grid.size_px), dtype=np.uint8)
    bev[DRIVABLE] = 255 * lanes_mask(scene.lane_start, scene.lane_end, scene.lane_half_width, pose, grid)
    bev[ROUTE] = polyline_intensity(scene.route_xy, pose, grid)
    bev[VEHICLES] = 255 * boxes_mask(scene.vehicle_boxes, pose, grid)
    bev[OBSTACLES] = 255 * boxes_mask(scene.obstacle_boxes, pose, grid)
    return bev
