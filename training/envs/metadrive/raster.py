"""The BEV raster of a MetaDrive world, in the toy world's layout (see ``training/envs/toy/render.py``).

``[4, 64, 64]`` uint8, 0.5 m per pixel, the ego's rear axle at row ``bev_ego_row`` between the two
middle columns, facing up; channels drivable area, route centre line (anti-aliased), vehicles,
obstacles. The drivable area (every lane of the map, both directions) is rasterised once per
episode into a world-frame grid and sampled per step; vehicles and obstacles are boxes tested
against ``subpixels x subpixels`` samples per pixel (a pixel is set when any sample is inside, as
the toy world sets a pixel when any surface sample falls into it).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from training.envs.toy.config import ToyWorldConfig

DRIVABLE, ROUTE, VEHICLES, OBSTACLES = 0, 1, 2, 3
_CENTRE_STEP_M = 1.0  # lane centre lines are read from MetaDrive every metre, interpolated below
_LINE_STEP_M = 0.125  # route line sampling: a quarter pixel


@dataclass
class DrivableGrid:
    """Boolean raster of the map's lanes in the world frame: cell ``(i, j)`` covers
    ``x in [x0 + j * res, x0 + (j + 1) * res)``, ``y in [y0 + i * res, ...)``."""

    x0: float
    y0: float
    resolution_m: float
    mask: np.ndarray  # bool [rows, cols]

    def contains(self, points: np.ndarray) -> np.ndarray:
        """Whether each world point ``[..., 2]`` lies on a lane (False outside the grid)."""
        col = np.floor((points[..., 0] - self.x0) / self.resolution_m).astype(np.int64)
        row = np.floor((points[..., 1] - self.y0) / self.resolution_m).astype(np.int64)
        rows, cols = self.mask.shape
        inside = (row >= 0) & (row < rows) & (col >= 0) & (col < cols)
        return inside & self.mask[row.clip(0, rows - 1), col.clip(0, cols - 1)]


def _lane_surface(lane: Any, step_m: float) -> np.ndarray:
    """World points ``[M, 2]`` covering one lane every ``step_m`` metres along and across."""
    count = max(int(np.ceil(lane.length / _CENTRE_STEP_M)), 1) + 1
    longs = np.linspace(0.0, lane.length, count)
    centre = np.array([lane.position(float(s), 0.0) for s in longs], dtype=np.float64)
    heading = np.unwrap(np.array([lane.heading_theta_at(float(s)) for s in longs]))
    width = np.array([lane.width_at(float(s)) for s in longs])
    fine = np.arange(0.0, lane.length + 1e-9, step_m)
    cx, cy = np.interp(fine, longs, centre[:, 0]), np.interp(fine, longs, centre[:, 1])
    h, w = np.interp(fine, longs, heading), np.interp(fine, longs, width)
    across = np.arange(-0.5, 0.5 + 1e-9, step_m / max(float(w.max()), step_m))  # fractions of the width
    offsets = across[None, :] * w[:, None]
    x = cx[:, None] - np.sin(h)[:, None] * offsets
    y = cy[:, None] + np.cos(h)[:, None] * offsets
    return np.stack([x.reshape(-1), y.reshape(-1)], axis=-1)


def build_drivable_grid(lanes: list[Any], resolution_m: float, margin_m: float = 40.0) -> DrivableGrid:
    """Rasterise every lane: surface samples ``0.8 * resolution_m`` apart mark their cells."""
    points = np.concatenate([_lane_surface(lane, 0.8 * resolution_m) for lane in lanes])
    x0, y0 = points.min(axis=0) - margin_m
    x1, y1 = points.max(axis=0) + margin_m
    cols = int(np.ceil((x1 - x0) / resolution_m))
    rows = int(np.ceil((y1 - y0) / resolution_m))
    mask = np.zeros((rows, cols), dtype=bool)
    col = ((points[:, 0] - x0) / resolution_m).astype(np.int64)
    row = ((points[:, 1] - y0) / resolution_m).astype(np.int64)
    mask[row, col] = True
    return DrivableGrid(float(x0), float(y0), resolution_m, mask)


class BevRasteriser:
    """Draws the BEV of one world; the pixel sample grid is built once."""

    def __init__(self, cfg: ToyWorldConfig, subpixels: int) -> None:
        self.cfg = cfg
        size, res = cfg.bev_size_px, cfg.bev_resolution_m
        offsets = (np.arange(subpixels) + 0.5) / subpixels  # sample positions inside a pixel
        rows = (np.arange(size)[:, None] + offsets[None, :]).reshape(-1)  # [size * sp]
        cols = rows.copy()
        x = (cfg.bev_ego_row - rows) * res  # ego frame: x forward (up), y left
        y = (size / 2 - cols) * res
        grid_x, grid_y = np.meshgrid(x, y, indexing="ij")
        self.samples_ego = np.stack([grid_x, grid_y], axis=-1)  # [size * sp, size * sp, 2]
        self.subpixels = subpixels
        # the BEV's reach from the rear axle, to skip far objects
        self.reach_m = float(np.hypot(max(cfg.bev_ego_row, size - cfg.bev_ego_row), size / 2) * res) + 5.0

    def _pool(self, hits: np.ndarray) -> np.ndarray:
        size, sp = self.cfg.bev_size_px, self.subpixels
        return hits.reshape(size, sp, size, sp).any(axis=(1, 3))

    def render(
        self,
        pose: np.ndarray,
        grid: DrivableGrid,
        route_xy: np.ndarray,
        vehicle_boxes: np.ndarray,
        obstacle_boxes: np.ndarray,
    ) -> np.ndarray:
        """BEV ``uint8 [4, H, W]`` for rear-axle ``pose`` ``(x, y, yaw)``; boxes ``[B, 5]`` hold
        centre x, y, heading, length, width in the world frame; ``route_xy`` ``[P, 2]`` world."""
        size = self.cfg.bev_size_px
        bev = np.zeros((4, size, size), dtype=np.uint8)
        samples_world = ego_to_world_np(self.samples_ego, pose)
        bev[DRIVABLE] = self._pool(grid.contains(samples_world)) * np.uint8(255)
        bev[VEHICLES] = self._pool(self._inside_boxes(samples_world, vehicle_boxes, pose)) * np.uint8(255)
        bev[OBSTACLES] = self._pool(self._inside_boxes(samples_world, obstacle_boxes, pose)) * np.uint8(255)
        bev[ROUTE] = self._route_line(route_xy, pose)
        return bev

    def _inside_boxes(self, samples_world: np.ndarray, boxes: np.ndarray, pose: np.ndarray) -> np.ndarray:
        hits = np.zeros(samples_world.shape[:2], dtype=bool)
        near = (
            boxes[np.hypot(boxes[:, 0] - pose[0], boxes[:, 1] - pose[1]) < self.reach_m]
            if len(boxes)
            else boxes
        )
        for cx, cy, heading, length, width in near:
            dx, dy = samples_world[..., 0] - cx, samples_world[..., 1] - cy
            cos, sin = np.cos(heading), np.sin(heading)
            along, across = cos * dx + sin * dy, -sin * dx + cos * dy
            hits |= (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)
        return hits

    def _route_line(self, route_xy: np.ndarray, pose: np.ndarray) -> np.ndarray:
        """Anti-aliased centre line: each sample spreads bilinear weights to its 4 nearest pixel
        centres and a pixel keeps the largest weight (the toy world's route channel)."""
        cfg, size = self.cfg, self.cfg.bev_size_px
        seg = np.diff(route_xy, axis=0)
        lengths = np.hypot(seg[:, 0], seg[:, 1])
        cumulative = np.concatenate([[0.0], np.cumsum(lengths)])
        fine = np.arange(0.0, cumulative[-1], _LINE_STEP_M)
        points = np.stack(
            [np.interp(fine, cumulative, route_xy[:, 0]), np.interp(fine, cumulative, route_xy[:, 1])], -1
        )
        local = world_to_ego_np(points, pose)
        row = cfg.bev_ego_row - local[:, 0] / cfg.bev_resolution_m - 0.5
        col = size / 2 - local[:, 1] / cfg.bev_resolution_m - 0.5
        r0, c0 = np.floor(row), np.floor(col)
        fr, fc = row - r0, col - c0
        flat = np.zeros(size * size + 1, dtype=np.int32)
        for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
            weight = (fr if dr else 1 - fr) * (fc if dc else 1 - fc)
            r, c = (r0 + dr).astype(np.int64), (c0 + dc).astype(np.int64)
            inside = (r >= 0) & (r < size) & (c >= 0) & (c < size)
            index = np.where(inside, r * size + c, size * size)
            np.maximum.at(flat, index, np.round(weight * 255).astype(np.int32))
        return flat[:-1].reshape(size, size).astype(np.uint8)


def ego_to_world_np(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """Ego-frame points ``[..., 2]`` (x forward, y left) to the world frame of pose ``(x, y, yaw)``."""
    cos, sin = np.cos(pose[2]), np.sin(pose[2])
    x, y = points[..., 0], points[..., 1]
    return np.stack([pose[0] + cos * x - sin * y, pose[1] + sin * x + cos * y], axis=-1)


def world_to_ego_np(points: np.ndarray, pose: np.ndarray) -> np.ndarray:
    """World points ``[..., 2]`` to the ego frame of pose ``(x, y, yaw)``."""
    cos, sin = np.cos(pose[2]), np.sin(pose[2])
    dx, dy = points[..., 0] - pose[0], points[..., 1] - pose[1]
    return np.stack([cos * dx + sin * dy, -sin * dx + cos * dy], axis=-1)
