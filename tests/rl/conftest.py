"""A tiny stand-in for the SFT waypoint model, and helpers shared by the RL tests."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest
import torch
from torch import Tensor, nn

from training.rl.policy import PolicySettings, PPOPolicy

BEV_SHAPE = (2, 6, 6)  # C, H, W
STATE_DIM = 3
FEATURE_DIM = 8
NUM_WAYPOINTS = 4


class FakeSFT(nn.Module):
    """``encode``: flatten bev (scaled to [0, 1]) and state through a fixed random linear layer;
    ``head``: a linear layer to ``K * 2`` waypoints. Its dropout makes train mode observable."""

    def __init__(self, seed: int = 0) -> None:
        super().__init__()
        torch.manual_seed(seed)
        c, h, w = BEV_SHAPE
        self.feature_dim = FEATURE_DIM
        self.num_waypoints = NUM_WAYPOINTS
        self.encoder = nn.Linear(c * h * w + STATE_DIM, FEATURE_DIM)
        self.dropout = nn.Dropout(p=0.5)
        self.waypoint_layer = nn.Linear(FEATURE_DIM, NUM_WAYPOINTS * 2)

    def encode(self, bev: Tensor, state: Tensor) -> Tensor:
        x = torch.cat([bev.flatten(1).float() / 255.0, state], dim=-1)
        return self.dropout(torch.tanh(self.encoder(x)))

    def head(self, z: Tensor) -> Tensor:
        return (5.0 * self.waypoint_layer(z)).view(-1, NUM_WAYPOINTS, 2)

    @torch.no_grad()
    def frozen_features(self, bev: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encode(bev, state)
        return z, self.head(z)


def make_observation(num: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """A random ``(bev uint8 [N, C, H, W], state [N, S])`` batch."""
    generator = torch.Generator().manual_seed(seed)
    bev = (torch.rand((num, *BEV_SHAPE), generator=generator) > 0.5).to(torch.uint8) * 255
    state = torch.randn((num, STATE_DIM), generator=generator)
    return bev, state


def policy_settings(**overrides: Any) -> PolicySettings:
    """The policy the RL unit tests were written against: a plain residual (gain 1), the same
    starting std (0.2 m) on every waypoint, log std clamped to [-5, 1], heads 32 wide."""
    plain = PolicySettings(
        max_delta=1.0,
        init_log_std=-1.6,
        std_horizon_exponent=0.0,
        min_log_std=-5.0,
        max_log_std=1.0,
        action_scale=1.0,
        hidden_size=32,
    )
    return dataclasses.replace(plain, **overrides)


@pytest.fixture
def sft_model() -> FakeSFT:
    return FakeSFT()


@pytest.fixture
def policy(sft_model: FakeSFT) -> PPOPolicy:
    torch.manual_seed(1)
    return PPOPolicy(sft_model, policy_settings())
