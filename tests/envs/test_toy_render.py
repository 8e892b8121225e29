"""BEV pixels against geometry, with the renderer's convention (see ``render.py``).

A point at ego coordinates ``(x, y)`` (x forward, y left) has continuous pixel coordinates
``row = ego_row - x / res``, ``col = W / 2 - y / res``; pixel ``(i, j)`` spans
``[i, i+1) x [j, j+1)``.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from tests.envs.reference_render import inputs_of_driven_worlds, reference_render_bev
from training.envs.toy import STATE_NAMES, ToyWaypointEnv, ToyWorldConfig, render
from training.envs.toy.render import RenderInputs, pixel_centre, render_bev

CFG = ToyWorldConfig()
DRIVABLE, ROUTE, VEHICLES, OBSTACLES = 0, 1, 2, 3
RES = CFG.bev_resolution_m
SIZE = CFG.bev_size_px


def _straight_road_inputs(
    ego_xy_yaw: tuple[float, float, float],
    obstacle: tuple[float, float, float] | None = None,
    vehicle: tuple[float, float, float] | None = None,
) -> RenderInputs:
    """One world: a straight road along world +x through the origin (route at y = 0)."""
    points = CFG.route_points
    s = -CFG.lead_in_m + torch.arange(points, dtype=torch.float32) * CFG.route_spacing_m
    route_xy = torch.stack([s, torch.zeros_like(s)], dim=-1)[None]
    x, y, yaw = ego_xy_yaw
    none = torch.zeros(1, 1, 3)
    return RenderInputs(
        route_xy=route_xy,
        route_heading=torch.zeros(1, points),
        ego_pose=torch.tensor([[x, y, yaw]]),
        ego_s=torch.tensor([x]),
        vehicle_boxes=torch.tensor([[vehicle]]) if vehicle else none,
        vehicle_active=torch.tensor([[vehicle is not None]]),
        obstacle_boxes=torch.tensor([[obstacle]]) if obstacle else none,
        obstacle_active=torch.tensor([[obstacle is not None]]),
    )


def _pixel_centres() -> tuple[np.ndarray, np.ndarray]:
    """Ego-frame ``x`` and ``y`` ``[H, W]`` of every pixel centre."""
    rows, cols = np.meshgrid(np.arange(SIZE), np.arange(SIZE), indexing="ij")
    x, y = pixel_centre(rows, cols, CFG)  # works elementwise on arrays
    return np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)


def test_pixel_centre_follows_the_documented_convention() -> None:
    # The rear axle sits between the two middle columns at the top edge of row ego_row.
    x, y = pixel_centre(CFG.bev_ego_row, SIZE // 2, CFG)
    assert (x, y) == (-0.5 * RES, -0.5 * RES)
    x, y = pixel_centre(0, 0, CFG)
    assert (x, y) == ((CFG.bev_ego_row - 0.5) * RES, (SIZE / 2 - 0.5) * RES)


def test_world_bev_has_shape_dtype_and_binary_channels() -> None:
    env = ToyWaypointEnv(ToyWorldConfig(num_envs=3, difficulty=1.0))
    obs = env.reset(seed=7)
    for _ in range(2):
        obs = env.step(env.expert_waypoints()).obs
    assert obs.bev.shape == (3, 4, SIZE, SIZE)
    assert obs.bev.dtype == torch.uint8
    for channel in (DRIVABLE, VEHICLES, OBSTACLES):
        values = set(torch.unique(obs.bev[:, channel]).tolist())
        assert values <= {0, 255}, f"channel {channel} is not binary: {sorted(values)[:8]}"
    assert int(obs.bev[:, ROUTE].max()) > 200  # anti-aliased: near 255 where the line crosses a centre
    assert obs.state.shape == (3, len(STATE_NAMES)) and obs.state.dtype == torch.float32


def test_ego_footprint_is_drivable_on_a_straight_road() -> None:
    bev = render_bev(_straight_road_inputs((10.0, 0.4, 0.0)), CFG)[0].numpy()
    x, y = _pixel_centres()
    front = CFG.length_m - CFG.rear_overhang_m
    inside_ego = (x > -CFG.rear_overhang_m) & (x < front) & (np.abs(y) < CFG.width_m / 2)
    assert inside_ego.sum() > 20
    assert (bev[DRIVABLE][inside_ego] == 255).all()
    # The drivable band spans [drivable_right_m, drivable_left_m] around the route (ego y = -0.4).
    road_y = y + 0.4  # lateral offset from the route centre line
    inside_road = (road_y > CFG.drivable_right_m + RES) & (road_y < CFG.drivable_left_m - RES)
    outside_road = (road_y < CFG.drivable_right_m - RES) | (road_y > CFG.drivable_left_m + RES)
    assert (bev[DRIVABLE][inside_road] == 255).all()
    assert (bev[DRIVABLE][outside_road] == 0).all()


@pytest.mark.parametrize("route_y_ego", [0.25, 0.3, -0.61, 1.07])
def test_route_line_column_is_where_the_geometry_says(route_y_ego: float) -> None:
    # The route runs along world y = 0; an ego at y = -route_y_ego sees it at ego y = route_y_ego.
    bev = render_bev(_straight_road_inputs((10.0, -route_y_ego, 0.0)), CFG)[0].numpy()
    route = bev[ROUTE].astype(np.float64)
    expected_col = SIZE / 2 - route_y_ego / RES  # continuous column of the line
    cols = np.arange(SIZE) + 0.5  # pixel centre columns
    checked = 0
    for row in range(SIZE):
        weights = route[row]
        if weights.sum() == 0:
            continue
        checked += 1
        centroid = float((weights * cols).sum() / weights.sum())
        assert centroid == pytest.approx(expected_col, abs=0.02), f"row {row}"
        assert int(np.argmax(weights)) == int(np.floor(expected_col))  # the pixel holding the line
    assert checked == SIZE  # a straight road through the ego crosses every row


def _box_mask_checks(bev_channel: np.ndarray, centre: tuple[float, float], heading: float) -> None:
    """Pixels fully inside the box are set; pixels more than one pixel outside are not."""
    x, y = _pixel_centres()
    cos, sin = np.cos(heading), np.sin(heading)
    along = (x - centre[0]) * cos + (y - centre[1]) * sin
    across = -(x - centre[0]) * sin + (y - centre[1]) * cos
    half_l, half_w = CFG.length_m / 2, CFG.width_m / 2
    pixel_half_diag = RES * np.sqrt(2) / 2
    fully_inside = (np.abs(along) + pixel_half_diag <= half_l) & (np.abs(across) + pixel_half_diag <= half_w)
    far_outside = (np.abs(along) > half_l + RES) | (np.abs(across) > half_w + RES)
    assert fully_inside.sum() > 5
    assert (bev_channel[fully_inside] == 255).all()
    assert (bev_channel[far_outside] == 0).all()
    row = int(np.floor(CFG.bev_ego_row - centre[0] / RES))
    col = int(np.floor(SIZE / 2 - centre[1] / RES))
    assert bev_channel[row, col] == 255, "the pixel holding the box centre is not set"


@pytest.mark.parametrize(
    ("centre_ego", "heading"), [((8.0, -3.0), 0.0), ((12.3, 2.7), 0.0), ((6.1, -1.9), 0.5)]
)
def test_obstacle_box_lights_the_pixels_inside_it(centre_ego: tuple[float, float], heading: float) -> None:
    ego = (10.0, 0.0, 0.0)  # ego frame = world frame shifted by 10 m along x
    box = (ego[0] + centre_ego[0], centre_ego[1], heading)
    bev = render_bev(_straight_road_inputs(ego, obstacle=box), CFG)[0].numpy()
    _box_mask_checks(bev[OBSTACLES], centre_ego, heading)
    assert (bev[VEHICLES] == 0).all()


def test_vehicle_box_in_a_rotated_ego_frame() -> None:
    # Ego rotated by yaw: a vehicle straight ahead at 9 m in the ego frame appears right above the ego.
    yaw = 0.35
    ego = (10.0, 1.0, yaw)
    ahead = 9.0
    box = (ego[0] + ahead * np.cos(yaw), ego[1] + ahead * np.sin(yaw), yaw + np.pi)
    bev = render_bev(_straight_road_inputs(ego, vehicle=box), CFG)[0].numpy()
    _box_mask_checks(bev[VEHICLES], (ahead, 0.0), np.pi)
    assert (bev[OBSTACLES] == 0).all()


def test_inactive_boxes_are_not_drawn() -> None:
    inputs = _straight_road_inputs((10.0, 0.0, 0.0), obstacle=(18.0, -3.0, 0.0), vehicle=(20.0, 3.0, 0.0))
    inputs.obstacle_active[:] = False
    inputs.vehicle_active[:] = False
    bev = render_bev(inputs, CFG)[0]
    assert int(bev[VEHICLES].max()) == 0 and int(bev[OBSTACLES].max()) == 0


# The renderer's tolerance against the reference (``reference_render.py``, the renderer as first
# written, which marks every pixel holding one of the surfaces' samples taken every half pixel):
# the fast one fills the surfaces' outlines, lighting the pixels whose centre lies inside, so
# the two may disagree on pixels along an edge and nowhere else. Binary channels: a differing pixel
# lies on an edge (its 3 x 3 neighbourhood holds both values in one of the two images), at most
# 2 pixels in 1,000 of a channel differ, and a channel lights as many pixels as the reference
# within 3% (no surface grows or shrinks: a box grown by a tenth of a pixel lights ~7% more).
# Route line: every pixel within 1 level of 255.
BINARY_DIFFERING_MAX = 2e-3
BINARY_LIT_RELATIVE_MAX = 0.03
ROUTE_LEVELS_MAX = 1


def _on_an_edge(image: torch.Tensor) -> torch.Tensor:
    """``[N, H, W]`` binary image -> pixels whose 3 x 3 neighbourhood holds both values."""
    lit = (image > 0).float()[:, None]
    most = torch.nn.functional.max_pool2d(lit, 3, stride=1, padding=1)
    least = -torch.nn.functional.max_pool2d(-lit, 3, stride=1, padding=1)
    return (most != least)[:, 0]


def _inputs_of_driven_worlds(difficulty: float, seed: int) -> list[RenderInputs]:
    """The render inputs of 24 worlds over 12 noisy steps (autoresets included)."""
    config = ToyWorldConfig(num_envs=24, difficulty=difficulty, max_episode_steps=8)
    return inputs_of_driven_worlds(config, seed, steps=12, noise_m=0.8)


@pytest.mark.parametrize(("difficulty", "seed"), [(0.0, 3), (0.5, 4), (1.0, 5)])
def test_matches_the_reference_renderer_within_the_stated_tolerance(difficulty: float, seed: int) -> None:
    binary = {"drivable": DRIVABLE, "vehicles": VEHICLES, "obstacles": OBSTACLES}
    differing, lit, lit_reference = (
        dict.fromkeys(binary, 0),
        dict.fromkeys(binary, 0),
        dict.fromkeys(binary, 0),
    )
    pixels, worst_route = 0, 0
    cfg = dataclasses.replace(CFG, difficulty=difficulty)
    for inputs in _inputs_of_driven_worlds(difficulty, seed):
        got = render_bev(inputs, cfg).int()
        want = reference_render_bev(inputs, cfg).int()
        for name, channel in binary.items():
            differs = got[:, channel] != want[:, channel]
            off_edges = differs & ~_on_an_edge(got[:, channel]) & ~_on_an_edge(want[:, channel])
            assert not off_edges.any(), f"{name}: {int(off_edges.sum())} differing pixels off every edge"
            differing[name] += int(differs.sum())
            lit[name] += int((got[:, channel] > 0).sum())
            lit_reference[name] += int((want[:, channel] > 0).sum())
        pixels += got[:, DRIVABLE].numel()
        worst_route = max(worst_route, int((got[:, ROUTE] - want[:, ROUTE]).abs().max()))
    for name in binary:
        assert differing[name] <= BINARY_DIFFERING_MAX * pixels, (
            f"{name}: {differing[name]} of {pixels} differ"
        )
        assert abs(lit[name] - lit_reference[name]) <= BINARY_LIT_RELATIVE_MAX * lit_reference[name], name
    assert lit_reference["drivable"] > 0.2 * pixels and lit_reference["obstacles"] > 0  # something was drawn
    assert worst_route <= ROUTE_LEVELS_MAX


def test_the_cuda_scan_fills_the_same_pixels_as_the_cpu_scan(monkeypatch: pytest.MonkeyPatch) -> None:
    """CUDA scans the transposed planes (``outer_scan``); forced on the CPU, every BEV is the same."""
    inputs = _inputs_of_driven_worlds(0.5, 6)
    rows = [render_bev(step_inputs, CFG) for step_inputs in inputs]
    scan = render._running_sum_along_rows
    monkeypatch.setattr(
        render, "_running_sum_along_rows", lambda planes, outer_scan: scan(planes, outer_scan=True)
    )
    for step_inputs, expected in zip(inputs, rows, strict=True):
        assert torch.equal(render_bev(step_inputs, CFG), expected)


def test_both_scans_wrap_modulo_256_alike() -> None:
    steps = torch.randint(-3, 4, (6, 9, 11), generator=torch.Generator().manual_seed(0), dtype=torch.int8)
    planes = steps.view(torch.uint8)
    expected = steps.long().cumsum(-1).remainder(256).to(torch.uint8)
    assert torch.equal(render._running_sum_along_rows(planes, outer_scan=False), expected)
    assert torch.equal(render._running_sum_along_rows(planes, outer_scan=True), expected)
