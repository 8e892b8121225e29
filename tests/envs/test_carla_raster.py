"""CARLA BEV raster from hand-made geometry: lanes, boxes, the route line, the ego's yaw."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.envs.carla.raster import (
    DRIVABLE,
    OBSTACLES,
    ROUTE,
    VEHICLES,
    BevGrid,
    SceneGeometry,
    boxes_mask,
    ego_to_world,
    empty_boxes,
    lanes_mask,
    pixel_centres_ego,
    polyline_intensity,
    render_bev,
    world_to_ego,
)
from training.envs.toy import ToyWorldConfig
from training.envs.toy.render import pixel_centre

GRID = BevGrid()  # 64 x 64 at 0.5 m, ego at row 58


def straight_lane(y_centre: float, width: float, heading: float = 0.0) -> tuple[np.ndarray, ...]:
    """A 200 m lane through the origin's neighbourhood, as 2 m segments along ``heading``."""
    along = np.arange(-100.0, 100.0, 2.0)
    direction = np.array([math.cos(heading), math.sin(heading)])
    normal = np.array([-math.sin(heading), math.cos(heading)])
    points = along[:, None] * direction + y_centre * normal
    return points[:-1], points[1:], np.full(len(points) - 1, width / 2)


def test_pixel_centres_match_the_toy_world_convention() -> None:
    centres = pixel_centres_ego(GRID)
    toy = ToyWorldConfig()
    for row, col in [(0, 0), (58, 31), (57, 32), (63, 63), (10, 40)]:
        assert centres[row, col] == pytest.approx(pixel_centre(row, col, toy))


def test_frames_round_trip() -> None:
    pose = np.array([12.0, -3.0, 0.7])
    points = np.random.default_rng(0).normal(size=(20, 2)) * 30
    assert ego_to_world(world_to_ego(points, pose), pose) == pytest.approx(points)
    ahead = ego_to_world(np.array([[2.0, 0.0]]), pose)[0]
    assert ahead == pytest.approx(pose[:2] + 2.0 * np.array([math.cos(0.7), math.sin(0.7)]))


def test_straight_lane_gives_a_band_of_its_width_around_the_ego() -> None:
    start, end, half_width = straight_lane(y_centre=0.0, width=3.0)
    mask = lanes_mask(start, end, half_width, np.zeros(3), GRID)
    # pixel centres at y = (32 - (col + 0.5)) * 0.5; |y| <= 1.5 for columns 29..34: 6 pixels, 3 m
    expected_cols = [c for c in range(64) if abs((32 - (c + 0.5)) * 0.5) <= 1.5]
    assert expected_cols == [29, 30, 31, 32, 33, 34]
    assert mask[:, expected_cols].all()
    assert not mask[:, [c for c in range(64) if c not in expected_cols]].any()


def test_lane_to_the_left_lands_left_of_the_ego() -> None:
    start, end, half_width = straight_lane(y_centre=5.0, width=3.0)  # y in [3.5, 6.5]
    mask = lanes_mask(start, end, half_width, np.zeros(3), GRID)
    columns = np.flatnonzero(mask.any(axis=0))
    assert columns.min() == 19 and columns.max() == 24  # y = (32 - (col + 0.5)) * 0.5 in [3.5, 6.5]


def test_ego_yaw_rotates_the_picture() -> None:
    """A lane along world +y seen by an ego facing +y is the same vertical band as a lane along +x
    seen by an ego facing +x."""
    facing_y = np.array([0.0, 0.0, math.pi / 2])
    along_x = lanes_mask(*straight_lane(0.0, 3.0), np.zeros(3), GRID)
    along_y = lanes_mask(*straight_lane(0.0, 3.0, heading=math.pi / 2), facing_y, GRID)
    assert (along_x == along_y).all()
    across = lanes_mask(*straight_lane(0.0, 3.0, heading=math.pi / 2), np.zeros(3), GRID)
    rows = np.flatnonzero(across.any(axis=1))
    assert rows.tolist() == [55, 56, 57, 58, 59, 60]  # x = (58 - (row + 0.5)) * 0.5 in [-1.5, 1.5]
    assert across[rows].all()


def test_box_ahead_of_the_ego_lands_on_the_right_rows() -> None:
    box = np.array([[10.0, 0.0, 0.0, 2.0, 1.0]])  # centre 10 m ahead, 4 m x 2 m
    mask = boxes_mask(box, np.zeros(3), GRID)
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    # x in [8, 12] -> rows with (58 - (row + 0.5)) * 0.5 in [8, 12]: 34..41; y in [-1, 1] -> cols 30..33
    assert rows.tolist() == list(range(34, 42))
    assert cols.tolist() == [30, 31, 32, 33]
    assert mask.sum() == 8 * 4


def test_box_seen_from_a_rotated_ego() -> None:
    """The same box, rotated with the world around the ego, gives the same picture."""
    yaw = 1.1
    pose = np.array([5.0, 7.0, yaw])
    centre = ego_to_world(np.array([[10.0, 3.0]]), pose)[0]
    box = np.array([[centre[0], centre[1], yaw + 0.3, 2.2, 0.9]])
    reference = boxes_mask(np.array([[10.0, 3.0, 0.3, 2.2, 0.9]]), np.zeros(3), GRID)
    assert (boxes_mask(box, pose, GRID) == reference).all()
    assert reference.any()


def test_far_and_behind_boxes_are_not_drawn() -> None:
    boxes = np.array([[500.0, 0.0, 0.0, 2.0, 1.0], [-40.0, 0.0, 0.0, 2.0, 1.0]])
    assert not boxes_mask(boxes, np.zeros(3), GRID).any()
    assert not boxes_mask(empty_boxes(), np.zeros(3), GRID).any()


def test_route_line_is_anti_aliased_at_its_sub_pixel_position() -> None:
    route = np.stack(
        [np.linspace(-20, 40, 61), np.full(61, 0.125)], axis=-1
    )  # 1/4 pixel left of col 31/32 edge
    image = polyline_intensity(route, np.zeros(3), GRID)
    row = image[30]
    # weight 1 - distance / 0.5 m: column 31 (centre y = 0.25) is 0.125 m away, column 32 (y = -0.25)
    # 0.375 m, column 30 (y = 0.75) 0.625 m
    assert row[31] == round(0.75 * 255) and row[32] == round(0.25 * 255)
    assert row[:31].max() == 0 and row[33:].max() == 0


def test_render_bev_channels_and_dtype() -> None:
    start, end, half_width = straight_lane(0.0, 3.5)
    route = np.stack([np.arange(-20.0, 60.0), np.zeros(80)], axis=-1)
    scene = SceneGeometry(
        start,
        end,
        half_width,
        route,
        vehicle_boxes=np.array([[10.0, 0.0, 0.0, 2.0, 1.0]]),
        obstacle_boxes=np.array([[5.0, -3.0, 0.0, 2.0, 1.0]]),
    )
    bev = render_bev(scene, np.zeros(3), GRID)
    assert bev.shape == (4, 64, 64) and bev.dtype == np.uint8
    assert set(np.unique(bev[DRIVABLE])) == {0, 255}
    assert bev[ROUTE, :, 31].min() > 0  # the route line runs straight up between columns 31 and 32
    assert bev[VEHICLES, 37, 31] == 255 and bev[VEHICLES, 58, 31] == 0
    assert bev[OBSTACLES].any() and not bev[OBSTACLES, :, :32].any()  # on the right: y < 0
