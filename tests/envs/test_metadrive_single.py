"""The MetaDrive worker's one-world numpy controller, route geometry and expert plan equal the toy
world's batched torch functions (within float32 tolerance), and the expert's stop rules."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from training.envs.metadrive import single
from training.envs.metadrive.collisions import box_corners
from training.envs.metadrive.config import MetaDriveWorldConfig
from training.envs.metadrive.expert import Traffic, expert_stops
from training.envs.toy.dynamics import VehicleState, plan_speeds, pure_pursuit_steer, speed_command
from training.envs.toy.expert import expert_plan
from training.envs.toy.scenario import frenet_to_world, interpolate_profile, project_points_to_route

CONFIG = MetaDriveWorldConfig()
GEOMETRY = CONFIG.geometry
ATOL = 2e-4  # metres / radians / m/s: torch runs float32, numpy float64


def _route(rng: np.random.Generator, points: int = 101) -> tuple[np.ndarray, np.ndarray]:
    """A smooth curved polyline in the toy layout (1 m spacing), float32."""
    curvature = rng.uniform(-0.03, 0.03) + 0.02 * np.sin(np.linspace(0, rng.uniform(1, 4), points))
    heading = rng.uniform(-math.pi, math.pi) + np.cumsum(curvature) * GEOMETRY.route_spacing_m
    step = GEOMETRY.route_spacing_m * np.stack([np.cos(heading), np.sin(heading)], -1)
    xy = rng.uniform(-200, 200, 2) + np.cumsum(step, axis=0)
    return xy.astype(np.float32), heading.astype(np.float32)


def _t(array: np.ndarray) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float32))[None]


@pytest.mark.parametrize("seed", range(6))
def test_controller_matches_the_toy_controller(seed: int) -> None:
    rng = np.random.default_rng(seed)
    pose = (float(rng.uniform(-50, 50)), float(rng.uniform(-50, 50)), float(rng.uniform(-3, 3)))
    speed, steer, accel = float(rng.uniform(0, 10)), float(rng.uniform(-0.3, 0.3)), 0.0
    plan_ego = np.cumsum(rng.uniform([0.0, -1.0], [5.0, 1.0], (8, 2)), axis=0)
    plan_world = single.ego_to_world(np.concatenate([np.zeros((1, 2)), plan_ego]), pose)
    state = VehicleState(*(torch.tensor([v], dtype=torch.float32) for v in (*pose, speed, steer, accel)))
    speeds_np = single.plan_speeds(plan_world, GEOMETRY)
    speeds_torch = plan_speeds(_t(plan_world), GEOMETRY)
    np.testing.assert_allclose(speeds_np, speeds_torch[0].numpy(), atol=ATOL)
    expected = float(pure_pursuit_steer(state, _t(plan_world), GEOMETRY)[0])
    assert single.pure_pursuit_steer(pose, speed, plan_world, GEOMETRY) == pytest.approx(expected, abs=ATOL)
    for time_in_plan in (0.0, 0.1, 0.3, 0.4):
        expected = float(speed_command(state, speeds_torch, time_in_plan, GEOMETRY)[0])
        got = single.speed_command(speed, speeds_np, time_in_plan, GEOMETRY)
        assert got == pytest.approx(expected, abs=ATOL)


@pytest.mark.parametrize("seed", range(6))
def test_route_geometry_matches_the_toy_functions(seed: int) -> None:
    rng = np.random.default_rng(seed)
    route_xy, route_heading = _route(rng)
    ego = round(GEOMETRY.lead_in_m / GEOMETRY.route_spacing_m)
    s = rng.uniform(-30, 100, 12)  # also beyond both ends
    d = rng.uniform(-3, 3, 12)
    expected_xy, _ = frenet_to_world(_t(route_xy), _t(route_heading), _t(s), _t(d), GEOMETRY)
    world = single.frenet_to_world(route_xy, route_heading, s, d, GEOMETRY)
    np.testing.assert_allclose(world, expected_xy[0].numpy(), atol=1e-3)
    profile = rng.uniform(0, 9, len(route_xy)).astype(np.float32)
    expected_profile = interpolate_profile(_t(profile), _t(s), GEOMETRY)[0].numpy()
    np.testing.assert_allclose(single.interpolate_profile(profile, s, GEOMETRY), expected_profile, atol=ATOL)

    inside = single.frenet_to_world(route_xy, route_heading, rng.uniform(-15, 75, 12), d, GEOMETRY)
    window = (-ego, len(route_xy) - ego)
    hint = torch.full((1, len(inside)), ego, dtype=torch.int64)
    s_t, d_t, h_t, _ = project_points_to_route(
        _t(route_xy), _t(route_heading), _t(inside), hint, GEOMETRY, window
    )
    s_np, d_np, h_np = single.project_to_route(route_xy, route_heading, inside, GEOMETRY)
    np.testing.assert_allclose(s_np, s_t[0].numpy(), atol=1e-3)
    np.testing.assert_allclose(d_np, d_t[0].numpy(), atol=1e-3)
    np.testing.assert_allclose(h_np, h_t[0].numpy(), atol=ATOL)


@pytest.mark.parametrize("seed", range(6))
def test_expert_plan_matches_the_toy_expert(seed: int) -> None:
    rng = np.random.default_rng(seed)
    route_xy, route_heading = _route(rng)
    target = rng.uniform(2, 9, len(route_xy)).astype(np.float32)
    s0, d0 = float(rng.uniform(-2, 2)), float(rng.uniform(-1, 1))
    ((x, y),) = single.frenet_to_world(route_xy, route_heading, np.array([s0]), np.array([d0]), GEOMETRY)
    road_heading = float(single.interpolate_profile(route_heading, np.array([s0]), GEOMETRY)[0])
    pose = (float(x), float(y), road_heading + float(rng.uniform(-0.2, 0.2)))
    speed = float(rng.uniform(0, 9))
    frenet = (s0, d0, road_heading)
    got = single.expert_plan(route_xy, route_heading, target, pose, speed, frenet, GEOMETRY)
    scalar = lambda v: torch.tensor([v], dtype=torch.float32)  # noqa: E731
    expected = expert_plan(
        _t(route_xy),
        _t(route_heading),
        _t(target),
        tuple(scalar(v) for v in pose),
        scalar(speed),
        tuple(scalar(v) for v in frenet),
        GEOMETRY,
    )[0].numpy()
    np.testing.assert_allclose(got, expected, atol=2e-3)


# ---------------------------------------------------------------------------------- expert stops
def _straight_route() -> tuple[np.ndarray, np.ndarray]:
    """Along +x from x = -20 (the ego's rear axle at x = 0, s = 0)."""
    x = np.arange(-GEOMETRY.lead_in_m, 80.0 + 1e-9, GEOMETRY.route_spacing_m)
    return np.stack([x, np.zeros_like(x)], -1).astype(np.float32), np.zeros(len(x), np.float32)


def _stops(
    boxes: list[list[float]],
    speeds: list[float],
    paths: list,
    ego_speed: float = 8.0,
    vehicle: list[bool] | None = None,
) -> list:
    """The expert's stops on a straight route; every box is a car unless ``vehicle`` says otherwise."""
    route_xy, route_heading = _straight_route()
    boxes_array = np.asarray(boxes, dtype=np.float64).reshape(-1, 5)
    is_vehicle = np.ones(len(boxes), dtype=bool) if vehicle is None else np.asarray(vehicle, dtype=bool)
    waiting = np.zeros(len(boxes), dtype=bool)
    traffic = Traffic(boxes_array, np.asarray(speeds, float), paths, waiting, is_vehicle)
    return expert_stops(route_xy, route_heading, 0.0, ego_speed, traffic, GEOMETRY, CONFIG.yield_settings())


def _line(start: tuple[float, float], heading: float, length: float = 80.0) -> np.ndarray:
    along = np.arange(0.0, length, 1.0)[:, None]
    return np.asarray(start) + along * np.array([math.cos(heading), math.sin(heading)])


def test_a_clear_road_asks_for_no_stop() -> None:
    assert _stops([], [], []) == []
    # oncoming car in the other lane, a barrier on the shoulder, a car in the next lane as fast as the ego
    oncoming = [30.0, 3.5, math.pi, 4.5, 1.9]
    barrier = [20.0, -3.6, 0.0, 4.5, 1.9]
    beside = [15.0, -3.5, 0.0, 4.5, 1.9]
    paths = [_line((30.0, 3.5), math.pi), None, _line((15.0, -3.5), 0.0)]
    assert _stops([oncoming, barrier, beside], [8.0, 0.0, 8.0], paths, vehicle=[True, False, True]) == []


@pytest.mark.parametrize("car_speed", [0.0, 1.5])
def test_a_slower_car_in_the_next_lane_is_approached_at_most_the_margin_faster(car_speed: float) -> None:
    """It may cut in (MetaDrive's traffic changes lanes without looking at the ego): the ego comes
    up to it no faster than its speed plus ``pass_speed_delta_mps``, then passes without lingering."""
    path = _line((25.0, -3.5), 0.0)
    ahead = _stops([[25.0, -3.5, 0.0, 4.5, 1.9]], [car_speed], [path])
    assert len(ahead) == 1
    assert ahead[0].speed_mps == pytest.approx(car_speed + CONFIG.pass_speed_delta_mps)
    assert ahead[0].s < 25.0 - 4.5 / 2 - CONFIG.lead_gap_m
    # beside it (the ego's front past its rear), passed, two lanes away, or an object: no limit
    assert _stops([[5.0, 3.5, 0.0, 4.5, 1.9]], [car_speed], [_line((5.0, 3.5), 0.0)]) == []
    assert _stops([[-3.0, -3.5, 0.0, 4.5, 1.9]], [car_speed], [path]) == []
    assert _stops([[25.0, -7.5, 0.0, 4.5, 1.9]], [car_speed], [_line((25.0, -7.5), 0.0)]) == []
    assert _stops([[25.0, -3.5, 0.0, 4.5, 1.9]], [car_speed], [None], vehicle=[False]) == []


def test_a_car_in_the_next_lane_turned_towards_the_ego_lane_is_followed() -> None:
    """Turned towards the corridor by more than ``merge_heading_deg`` it is changing lanes: a lead,
    even beside the ego, and even where its predicted path (its lane) stays beside the corridor;
    turned away, or by less, it is only passed with care."""
    turn = math.radians(CONFIG.merge_heading_deg + 4.0)
    for d, towards in ((3.5, -turn), (-3.5, turn)):
        merging = _stops([[5.0, d, towards, 4.5, 1.9]], [1.5], [_line((5.0, d), 0.0)])
        assert len(merging) == 1 and merging[0].speed_mps == pytest.approx(1.5 * math.cos(turn))
        assert merging[0].s < 5.0 - 4.5 / 2
    assert _stops([[5.0, 3.5, turn, 4.5, 1.9]], [1.5], [_line((5.0, 3.5), 0.0)]) == []  # away
    slight = math.radians(CONFIG.merge_heading_deg / 2)
    assert _stops([[5.0, 3.5, -slight, 4.5, 1.9]], [1.5], [_line((5.0, 3.5), 0.0)]) == []


def test_the_expert_follows_a_lead_and_stops_for_a_crossing_car() -> None:
    lead = _stops([[25.0, 0.5, 0.0, 4.5, 1.9]], [5.0], [_line((25.0, 0.5), 0.0)])
    assert len(lead) == 1 and lead[0].speed_mps == pytest.approx(5.0)
    assert lead[0].s < 25.0 - CONFIG.lead_gap_m
    # a car 16 m to the right of the route, driving towards it at 8 m/s: both reach x = 22 in ~2 s
    # (far enough for a comfortable stop from 8 m/s before its side, 1 m nearer than its centre line)
    crossing = _stops([[22.0, -16.0, math.pi / 2, 4.5, 1.9]], [8.0], [_line((22.0, -16.0), math.pi / 2)])
    assert len(crossing) == 1 and crossing[0].speed_mps == 0.0
    assert crossing[0].s < 22.0 - 2.0
    # the same car, far enough down its road that it passes long after the ego: no stop
    late = _stops([[22.0, -60.0, math.pi / 2, 4.5, 1.9]], [8.0], [_line((22.0, -60.0), math.pi / 2)])
    assert late == []


def test_a_crossing_found_too_late_to_stop_before_is_driven_through() -> None:
    """Stopping needs ``v^2 / (2 comfort_decel)``: where that no longer ends before the crossing car's
    path the ego drives on (standing in the path is worse); slower, it stops as before."""
    car, path = [12.0, -12.0, math.pi / 2, 4.5, 1.9], [_line((12.0, -12.0), math.pi / 2)]
    slow = _stops([car], [6.0], path, ego_speed=2.0)
    assert len(slow) == 1 and slow[0].speed_mps == 0.0
    assert _stops([car], [6.0], path, ego_speed=8.0) == []


@pytest.mark.parametrize("heading_deg", [90.0, 60.0, 135.0, 150.0])
def test_a_yield_stop_keeps_the_gap_to_every_part_of_the_crossing_car(heading_deg: float) -> None:
    """The ego's front stops ``yield_gap_m`` before the nearest place the crossing car's box reaches
    in the corridor, not before where its centre first enters it: a car crossing at an angle reaches
    closer by its extent along the route, and one turning towards the ego (an oncoming car turning
    across the ego's lane) goes on towards it inside the corridor after it enters (on held-out seeds
    such cars hit an ego standing at a stop 8 m before their centre's entry)."""
    heading = math.radians(heading_deg)
    crossing_x = 24.0  # where the centre line crosses the route, reached in ~2 s at 8 m/s
    start = np.array([crossing_x, 0.0]) - 16.0 * np.array([math.cos(heading), math.sin(heading)])
    car = [*start, heading, 4.5, 1.9]
    stops = _stops([car], [8.0], [_line(tuple(start), heading)], ego_speed=3.0)
    assert len(stops) == 1 and stops[0].speed_mps == 0.0
    # the car's box at every metre of its path where it overlaps the ego's corridor
    settings = CONFIG.yield_settings()
    reach = GEOMETRY.width_m / 2 + settings.yield_margin_m
    nearest = math.inf
    for along in np.arange(0.0, 40.0, 0.25):
        centre = start + along * np.array([math.cos(heading), math.sin(heading)])
        corners = box_corners(np.array([*centre, heading, 4.5, 1.9]))
        if corners[:, 1].min() < reach and corners[:, 1].max() > -reach:
            nearest = min(nearest, corners[:, 0].min())
    front = GEOMETRY.length_m - GEOMETRY.rear_overhang_m
    assert stops[0].s + front + settings.yield_gap_m <= nearest + 0.5


def test_a_slow_ego_at_the_edge_of_a_car_turning_towards_it_stays() -> None:
    """A car whose path runs back towards the ego inside its corridor (an oncoming car turning
    across the ego's lane) reaches the ego wherever it drives: driving on, too late to stop before
    the path, only meets it sooner unless the ego clears the path before the car gets there (on
    held-out seeds a slow ego at an intersection's mouth drove on into such cars). A car crossing
    straight still lets a fast ego through (``test_a_crossing_found_too_late...``)."""
    heading = math.radians(150.0)
    car, path = [12.0, -6.0, heading, 4.5, 1.9], [_line((12.0, -6.0), heading)]
    slow = _stops([car], [8.0], path, ego_speed=2.0)
    assert len(slow) == 1 and slow[0].speed_mps == 0.0
    assert slow[0].s <= 0.0  # stop where it is
