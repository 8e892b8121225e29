"""The BEV raster of a MetaDrive world, in the toy world's layout (see ``training/envs/toy/render.py``).

``[4, 64, 64]`` uint8, 0.5 m per pixel, the ego's rear axle at row ``bev_ego_row`` between the two
middle columns, facing up; channels drivable area, route centre line (anti-aliased), vehicles,
obstacles. The drivable area (every lane of the map, both directions) is rasterised once per
episode into a world-frame grid and sampled per step; vehicles and obstacles are boxes tested
against ``subpixels x subpixels`` samples per pixel (a pixel is set when any sample is inside, as
the toy world sets a pixel when any surface sample falls into it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from training.envs.metadrive.single import world_to_ego
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

    def contains_xy(self, x: np.ndarray, y: np.ndarray) -> np.ndarray:
        """``contains`` for world coordinates given as two arrays of one shape."""
        col = np.floor((x - self.x0) / self.resolution_m).astype(np.int64)
        row = np.floor((y - self.y0) / self.resolution_m).astype(np.int64)
        rows, cols = self.mask.shape
        inside = (row >= 0) & (row < rows) & (col >= 0) & (col < cols)
        flat = np.where(inside, row * cols + col, 0)
        return inside & np.take(self.mask.reshape(-1), flat)


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
    """Draws the BEV of one world; the pixel sample grid is built once.

    The samples form a regular grid in the ego frame, so their world coordinates are an outer sum
    of one row term and one column term, and a box only needs the samples of its bounding window.
    """

    def __init__(self, cfg: ToyWorldConfig, subpixels: int) -> None:
        self.cfg = cfg
        size, res = cfg.bev_size_px, cfg.bev_resolution_m
        offsets = (np.arange(subpixels) + 0.5) / subpixels  # sample positions inside a pixel
        rows = (np.arange(size)[:, None] + offsets[None, :]).reshape(-1)  # [size * sp]
        self.sample_x = (cfg.bev_ego_row - rows) * res  # ego frame: x forward (up) per sample row
        self.sample_y = (size / 2 - rows) * res  # y left per sample column
        self.subpixels = subpixels
        # the BEV's reach from the rear axle, to skip far objects
        self.reach_m = float(np.hypot(max(cfg.bev_ego_row, size - cfg.bev_ego_row), size / 2) * res) + 5.0

    def _pool(self, hits: np.ndarray) -> np.ndarray:
        """A pixel is set when any of its ``subpixels x subpixels`` samples is."""
        sp = self.subpixels
        pooled = np.zeros(hits[::sp, ::sp].shape, dtype=bool)
        for row in range(sp):
            for col in range(sp):
                pooled |= hits[row::sp, col::sp]
        return pooled

    def samples_world(self, pose: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """World ``x``, ``y`` ``[size * sp, size * sp]`` of the pixel samples for rear-axle ``pose``."""
        cos, sin = math.cos(pose[2]), math.sin(pose[2])
        x = (pose[0] + cos * self.sample_x)[:, None] - (sin * self.sample_y)[None, :]
        y = (pose[1] + sin * self.sample_x)[:, None] + (cos * self.sample_y)[None, :]
        return x, y

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
        x, y = self.samples_world(pose)
        bev[DRIVABLE] = self._pool(grid.contains_xy(x, y)) * np.uint8(255)
        bev[VEHICLES] = self._pool(self._inside_boxes(x, y, vehicle_boxes, pose)) * np.uint8(255)
        bev[OBSTACLES] = self._pool(self._inside_boxes(x, y, obstacle_boxes, pose)) * np.uint8(255)
        bev[ROUTE] = self._route_line(route_xy, pose)
        return bev

    def _inside_boxes(self, x: np.ndarray, y: np.ndarray, boxes: np.ndarray, pose: np.ndarray) -> np.ndarray:
        """Which samples lie inside any box; each box is tested on its bounding window only."""
        hits = np.zeros(x.shape, dtype=bool)
        if len(boxes) == 0:
            return hits
        near = boxes[np.hypot(boxes[:, 0] - pose[0], boxes[:, 1] - pose[1]) < self.reach_m]
        for cx, cy, heading, length, width in near:
            rows, cols = self._window(cx, cy, heading, length, width, pose)
            dx, dy = x[rows, cols] - cx, y[rows, cols] - cy
            cos, sin = np.cos(heading), np.sin(heading)
            along, across = cos * dx + sin * dy, -sin * dx + cos * dy
            hits[rows, cols] |= (np.abs(along) <= length / 2) & (np.abs(across) <= width / 2)
        return hits

    def _window(
        self, cx: float, cy: float, heading: float, length: float, width: float, pose: np.ndarray
    ) -> tuple[slice, slice]:
        """Sample rows and columns covering a box (one sample of margin on each side)."""
        half = np.array([[1, 1], [1, -1], [-1, 1], [-1, -1]]) * (length / 2, width / 2)
        cos, sin = math.cos(heading), math.sin(heading)
        corners = np.array([cx, cy]) + half @ np.array([[cos, sin], [-sin, cos]])
        local = world_to_ego(corners, pose)
        cfg, sp, count = self.cfg, self.subpixels, len(self.sample_x)
        rows = (cfg.bev_ego_row - local[:, 0] / cfg.bev_resolution_m) * sp - 0.5
        cols = (cfg.bev_size_px / 2 - local[:, 1] / cfg.bev_resolution_m) * sp - 0.5
        row0, row1 = max(int(math.floor(rows.min())) - 1, 0), min(int(math.ceil(rows.max())) + 2, count)
        col0, col1 = max(int(math.floor(cols.min())) - 1, 0), min(int(math.ceil(cols.max())) + 2, count)
        return slice(row0, max(row0, row1)), slice(col0, max(col0, col1))

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
        local = world_to_ego(points, pose)
        row = cfg.bev_ego_row - local[:, 0] / cfg.bev_resolution_m - 0.5
        col = size / 2 - local[:, 1] / cfg.bev_resolution_m - 0.5
        on_image = (row > -1) & (row < size) & (col > -1) & (col < size)  # the others weigh nothing here
        row, col = row[on_image], col[on_image]
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
