"""The renderer as first written (world-frame samples, one scatter per layer): the executable
specification the fast renderer in ``training/envs/toy/render.py`` is tested against.

Slow on purpose and kept out of the package; see ``test_toy_render.py`` for the tolerance.
"""

from __future__ import annotations

import torch

from training.envs.toy import world as world_module
from training.envs.toy.config import ToyWorldConfig
from training.envs.toy.dynamics import world_to_ego
from training.envs.toy.render import RenderInputs, RenderLayout
from training.envs.toy.scenario import interpolate_route
from training.envs.toy.world import ToyWaypointEnv

_DRIVABLE, _ROUTE, _VEHICLES, _OBSTACLES = 0, 1, 2, 3
_SAMPLE_STEP_M = 0.25  # road surface sampling: half a pixel
_LINE_STEP_M = 0.125  # route line sampling: a quarter pixel


def _to_pixels(points_ego: torch.Tensor, cfg: ToyWorldConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Continuous (row, col) of ego-frame points; pixel ``(i, j)`` spans ``[i, i+1) x [j, j+1)``."""
    res = cfg.bev_resolution_m
    row = cfg.bev_ego_row - points_ego[..., 0] / res
    col = cfg.bev_size_px / 2 - points_ego[..., 1] / res
    return row, col


def _flat_index(row: torch.Tensor, col: torch.Tensor, channel: int, cfg: ToyWorldConfig) -> torch.Tensor:
    """Index into a flat ``[N * C * H * W + 1]`` buffer; off-image points go to the last slot."""
    size = cfg.bev_size_px
    n = row.shape[0]
    inside = (row >= 0) & (row < size) & (col >= 0) & (col < size)
    pixel = row.clamp(0, size - 1) * size + col.clamp(0, size - 1)
    batch = torch.arange(n, device=row.device)[:, None] * (4 * size * size)
    index = batch + channel * size * size + pixel
    return torch.where(inside, index, torch.full_like(index, n * 4 * size * size))


def _route_frames(
    inputs: RenderInputs, cfg: ToyWorldConfig, step: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route points ``[N, S, 2]`` and left normals ``[N, S, 2]`` every ``step`` metres around the ego."""
    behind = (cfg.bev_size_px - cfg.bev_ego_row) * cfg.bev_resolution_m + 3.0
    ahead = cfg.bev_ego_row * cfg.bev_resolution_m + 6.0
    device = inputs.ego_s.device
    offsets = torch.arange(-behind, ahead, step, device=device, dtype=torch.float32)
    s = inputs.ego_s[:, None] + offsets[None, :]
    xy, heading = interpolate_route(inputs.route_xy, inputs.route_heading, s, cfg)
    normal = torch.stack([-torch.sin(heading), torch.cos(heading)], dim=-1)
    return xy, normal


def _splat_binary(
    flat: torch.Tensor, points_world: torch.Tensor, channel: int, inputs: RenderInputs, cfg: ToyWorldConfig
) -> None:
    """Set to 255 every pixel of ``channel`` that contains one of the points ``[N, Q, 2]``."""
    x, y, yaw = inputs.ego_pose.unbind(-1)
    row, col = _to_pixels(world_to_ego(points_world, x, y, yaw), cfg)
    index = _flat_index(row.floor().long(), col.floor().long(), channel, cfg).reshape(-1)
    # every write is the same value, so duplicates cannot race: a plain fill, several times faster
    # than an ``amax`` scatter, gives the same image on any device
    flat.index_fill_(0, index, 255)


def _box_samples(boxes: torch.Tensor, active: torch.Tensor, cfg: ToyWorldConfig) -> torch.Tensor:
    """World points ``[N, B * G, 2]`` filling each active box (inactive boxes sent far away)."""
    device = boxes.device
    along = torch.arange(-cfg.length_m / 2, cfg.length_m / 2 + 1e-6, _SAMPLE_STEP_M, device=device)
    across = torch.arange(-cfg.width_m / 2, cfg.width_m / 2 + 1e-6, _SAMPLE_STEP_M, device=device)
    grid_a, grid_c = torch.meshgrid(along, across, indexing="ij")
    local = torch.stack([grid_a.reshape(-1), grid_c.reshape(-1)], dim=-1)  # [G, 2]
    cos, sin = torch.cos(boxes[..., 2])[..., None], torch.sin(boxes[..., 2])[..., None]
    px = boxes[..., 0:1] + cos * local[:, 0] - sin * local[:, 1]
    py = boxes[..., 1:2] + sin * local[:, 0] + cos * local[:, 1]
    far = torch.full_like(px, 1e6)
    px = torch.where(active[..., None], px, far)
    points = torch.stack([px, py], dim=-1)  # [N, B, G, 2]
    return points.reshape(points.shape[0], -1, 2)


def reference_render_bev(inputs: RenderInputs, cfg: ToyWorldConfig) -> torch.Tensor:
    """The BEV raster ``[N, 4, H, W]`` uint8 for a batch of worlds.

    Surfaces (road, boxes) are sampled every half pixel and each sample marks its pixel;
    ``amax`` scatters on integers keep the result identical in any order and on any device.
    """
    n = inputs.ego_s.shape[0]
    size = cfg.bev_size_px
    device = inputs.ego_s.device
    flat = torch.zeros(n * 4 * size * size + 1, dtype=torch.int32, device=device)

    route_xy, normal = _route_frames(inputs, cfg, _LINE_STEP_M)
    d_road = torch.arange(
        cfg.drivable_right_m + _SAMPLE_STEP_M / 2, cfg.drivable_left_m, _SAMPLE_STEP_M, device=device
    )
    stride = int(round(_SAMPLE_STEP_M / _LINE_STEP_M))
    road = route_xy[:, ::stride, None, :] + d_road[None, None, :, None] * normal[:, ::stride, None, :]
    _splat_binary(flat, road.reshape(n, -1, 2), _DRIVABLE, inputs, cfg)
    _splat_binary(
        flat, _box_samples(inputs.vehicle_boxes, inputs.vehicle_active, cfg), _VEHICLES, inputs, cfg
    )
    _splat_binary(
        flat, _box_samples(inputs.obstacle_boxes, inputs.obstacle_active, cfg), _OBSTACLES, inputs, cfg
    )

    # Route centre line, anti-aliased: each sample spreads bilinear weights to its 4 nearest pixel
    # centres, and a pixel keeps the largest weight, so the line's sub-pixel position is visible.
    x, y, yaw = inputs.ego_pose.unbind(-1)
    row, col = _to_pixels(world_to_ego(route_xy, x, y, yaw), cfg)
    row, col = row - 0.5, col - 0.5  # continuous coordinates relative to pixel centres
    r0, c0 = row.floor(), col.floor()
    fr, fc = row - r0, col - c0
    for dr, dc in ((0, 0), (0, 1), (1, 0), (1, 1)):
        weight = (fr if dr else 1 - fr) * (fc if dc else 1 - fc)
        index = _flat_index((r0 + dr).long(), (c0 + dc).long(), _ROUTE, cfg)
        value = (weight * 255).round().to(torch.int32)
        flat.scatter_reduce_(0, index.reshape(-1), value.reshape(-1), "amax")

    return flat[:-1].view(n, 4, size, size).to(torch.uint8)


def inputs_of_driven_worlds(
    config: ToyWorldConfig, seed: int, steps: int, noise_m: float
) -> list[RenderInputs]:
    """The renderer's inputs, every call, while ``config.num_envs`` worlds from scenario ``seed`` drive
    ``steps`` steps of the expert's plan plus Gaussian noise of ``noise_m`` (autoresets included)."""
    captured: list[RenderInputs] = []
    env = ToyWaypointEnv(config)
    original = world_module.render_bev

    def spy(inputs: RenderInputs, cfg: ToyWorldConfig, layout: RenderLayout | None = None) -> torch.Tensor:
        captured.append(inputs)
        return original(inputs, cfg, layout)

    world_module.render_bev = spy
    try:
        env.reset(seed=seed)
        generator = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            noise = torch.randn(config.num_envs, config.num_waypoints, 2, generator=generator)
            env.step(env.expert_waypoints() + noise_m * noise)
    finally:
        world_module.render_bev = original
    return captured
