"""The frozen encoder's inference path: unchanged on the CPU, within 1 cm of float32 on CUDA."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from training.common.errors import UserError
from training.envs.registry import make_env
from training.sft.model import DEFAULT_FROZEN_PRECISION, FROZEN_PRECISIONS, WaypointModel, load_sft_model


def observations(num_envs: int, device: str) -> tuple[torch.Tensor, torch.Tensor]:
    env = make_env("toy", num_envs, device)
    obs = env.reset(seed=1_000_000_000)
    obs = env.step(env.expert_waypoints()).obs
    return obs.bev, obs.state


def frozen(path: Path, device: str) -> WaypointModel:
    return load_sft_model(path, device).requires_grad_(False)


@pytest.mark.parametrize("precision", list(FROZEN_PRECISIONS))
def test_cpu_path_is_exactly_encode_then_head(tiny_sft: Path, precision: str) -> None:
    model = frozen(tiny_sft, "cpu")
    bev, state = observations(8, "cpu")
    z, waypoints = model.frozen_features(bev, state, precision=precision)
    with torch.no_grad():
        expected_z = model.encode(bev, state)
        expected_waypoints = model.head(expected_z)
    assert torch.equal(z, expected_z) and torch.equal(waypoints, expected_waypoints)
    assert z.dtype == waypoints.dtype == torch.float32


def test_results_can_feed_a_trained_head(tiny_sft: Path) -> None:
    """Cloned out of inference mode: storing them and backpropagating through a head works."""
    model = frozen(tiny_sft, "cpu")
    z, waypoints = model.frozen_features(*observations(4, "cpu"))
    assert not z.is_inference() and not waypoints.is_inference()
    head = torch.nn.Linear(z.shape[1], 1)
    head(z).sum().backward()
    assert head.weight.grad is not None


def test_unknown_precision_is_a_user_error(tiny_sft: Path) -> None:
    model = frozen(tiny_sft, "cpu")
    with pytest.raises(UserError, match="fp8"):
        model.frozen_features(*observations(2, "cpu"), precision="fp8")


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="autocast of the frozen encoder engages on CUDA only"
)
def test_cuda_half_precision_waypoints_within_1cm(tiny_sft: Path) -> None:
    model = frozen(tiny_sft, "cuda")
    bev, state = observations(256, "cuda")
    _, reference = model.frozen_features(bev, state, precision="fp32")
    _, waypoints = model.frozen_features(bev, state, precision=DEFAULT_FROZEN_PRECISION)
    assert (waypoints - reference).norm(dim=-1).max().item() < 0.01
