"""SFT architectures unlike this project's ``WaypointModel``, for the "use your own model" tests.

Importable as ``--sft-model tests.own_models:FACTORY`` (each factory takes no arguments and returns
the module). They use nothing of this project: what a user would write.

* :class:`DownsampledMLP`: an MLP over a 4x average-pooled BEV and the ego state, ``z`` of 48,
  one ``forward`` returning ``(z, waypoints)``.
* :class:`PooledConvNet`: two strided convolutions and global average pooling, ``z`` of 24, with
  ``encode`` and ``head`` (and a ``forward`` returning both, so it can be exported).

Both add their output to a straight-ahead plan, so that even untrained they drive forward.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

TOY_BEV_SHAPE = (4, 64, 64)  # the toy world's observation and action layout
TOY_STATE_DIM = 5
TOY_NUM_WAYPOINTS = 8
STATE_SCALE = 0.1  # a crude input normalisation: the ego state holds metres and m/s


def straight_plan(num_waypoints: int, spacing_m: float = 2.0) -> Tensor:
    """``[K, 2]`` waypoints straight ahead, ``spacing_m`` apart (ego frame, x forward)."""
    x = spacing_m * torch.arange(1, num_waypoints + 1, dtype=torch.float32)
    return torch.stack([x, torch.zeros_like(x)], dim=-1)


class DownsampledMLP(nn.Module):
    """``forward(bev uint8 [B, C, H, W], state [B, S]) -> (z [B, z_dim], waypoints [B, K, 2])``."""

    def __init__(
        self,
        bev_shape: tuple[int, int, int] = TOY_BEV_SHAPE,
        state_dim: int = TOY_STATE_DIM,
        num_waypoints: int = TOY_NUM_WAYPOINTS,
        z_dim: int = 48,
        pool: int = 4,
        out_scale_m: float = 5.0,
    ) -> None:
        super().__init__()
        channels, height, width = bev_shape
        self.num_waypoints = num_waypoints
        self.state_scale = STATE_SCALE
        self.out_scale_m = out_scale_m  # metres per unit of the last layer's output
        self.pool = nn.AvgPool2d(pool)
        in_dim = channels * (height // pool) * (width // pool) + state_dim
        self.body = nn.Sequential(nn.Linear(in_dim, 64), nn.ReLU(), nn.Linear(64, z_dim), nn.Tanh())
        self.out = nn.Linear(z_dim, num_waypoints * 2)
        self.register_buffer("prior", straight_plan(num_waypoints))

    def forward(self, bev: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        image = self.pool(bev.float() / 255.0).flatten(1)
        z = self.body(torch.cat([image, state * self.state_scale], dim=1))
        return z, self.prior + self.out_scale_m * self.out(z).view(-1, self.num_waypoints, 2)


class PooledConvNet(nn.Module):
    """``encode(bev, state) -> z [B, 24]``, ``head(z) -> waypoints [B, K, 2]``; ``forward`` both."""

    def __init__(self, num_waypoints: int = TOY_NUM_WAYPOINTS, z_dim: int = 24) -> None:
        super().__init__()
        self.num_waypoints = num_waypoints
        self.state_scale = STATE_SCALE
        self.convs = nn.Sequential(
            nn.Conv2d(TOY_BEV_SHAPE[0], 8, kernel_size=5, stride=4, padding=2),
            nn.ReLU(),
            nn.Conv2d(8, 16, kernel_size=3, stride=2, padding=1),
            nn.ReLU(),
        )
        self.fuse = nn.Linear(16 + TOY_STATE_DIM, z_dim)
        self.waypoint_layer = nn.Linear(z_dim, num_waypoints * 2)
        self.register_buffer("prior", straight_plan(num_waypoints, spacing_m=1.5))

    def encode(self, bev: Tensor, state: Tensor) -> Tensor:
        pooled = self.convs(bev.float() / 255.0).mean(dim=(2, 3))
        return torch.relu(self.fuse(torch.cat([pooled, state * self.state_scale], dim=1)))

    def head(self, z: Tensor) -> Tensor:
        return self.prior + self.waypoint_layer(z).view(-1, self.num_waypoints, 2)

    def forward(self, bev: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encode(bev, state)
        return z, self.head(z)


class FlatZ(DownsampledMLP):
    """Returns ``z`` as ``[B, 4, 12]``: not the 2-D feature the RL heads read."""

    def forward(self, bev: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        z, waypoints = super().forward(bev, state)
        return z.view(-1, 4, 12), waypoints


# --- factories: what --sft-model names ------------------------------------------------------------


def mlp() -> DownsampledMLP:
    return DownsampledMLP()


def convnet() -> PooledConvNet:
    return PooledConvNet()


def mlp_six_waypoints() -> DownsampledMLP:
    return DownsampledMLP(num_waypoints=6)


def mlp_three_channels() -> DownsampledMLP:
    return DownsampledMLP(bev_shape=(3, 64, 64))


def mlp_state_of_four() -> DownsampledMLP:
    return DownsampledMLP(state_dim=4)


def z_not_2d() -> FlatZ:
    return FlatZ()


def small_world_mlp() -> DownsampledMLP:
    """For the SFT tests' fake world (``tests/sft/sft_fake_env.py``): BEV 4x16x16, state 4, K 4."""
    return DownsampledMLP(bev_shape=(4, 16, 16), state_dim=4, num_waypoints=4, z_dim=32, pool=2)


def not_a_module() -> dict[str, int]:
    return {"layers": 3}


def broken_factory() -> nn.Module:
    raise RuntimeError("out of coffee")


NOT_CALLABLE = 3
