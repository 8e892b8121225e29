"""The SFT waypoint model: shapes, dtypes, checkpoints and their failure modes."""

from __future__ import annotations

import pytest
import torch

from training.common.errors import UserError
from training.common.io import save_checkpoint
from training.sft import SFTModelConfig, WaypointModel, load_sft_model, save_sft_checkpoint
from training.sft.model import encoder_macs_per_sample

ENV_SPEC = {"bev_shape": [4, 64, 64], "state_dim": 5, "num_waypoints": 8}
STATE_DIM = SFTModelConfig().state_dim


def _obs(n: int = 5, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    bev = torch.randint(0, 2, (n, 4, 64, 64), generator=gen, dtype=torch.uint8) * 255
    state = torch.randn(n, STATE_DIM, generator=gen) * 3 + 5
    return bev, state


def test_shapes_and_dtypes() -> None:
    torch.manual_seed(0)
    model = WaypointModel(SFTModelConfig())
    bev, state = _obs()
    z = model.encode(bev, state)
    assert z.shape == (5, model.feature_dim) and z.dtype == torch.float32
    waypoints = model.head(z)
    assert waypoints.shape == (5, model.num_waypoints, 2) and waypoints.dtype == torch.float32
    assert torch.allclose(model(bev, state), waypoints)
    # A float BEV with the same 0..255 values gives the same answer as the uint8 one.
    assert torch.allclose(model(bev.float(), state), waypoints)
    assert torch.isfinite(waypoints).all()


def test_rejects_wrong_shapes() -> None:
    model = WaypointModel(SFTModelConfig())
    bev, state = _obs()
    with pytest.raises(ValueError, match="bev must be"):
        model(bev[:, :3], state)
    with pytest.raises(ValueError, match="state must be"):
        model(bev, state[:, :2])


def test_fit_normalization_sets_buffers_and_mean_plan() -> None:
    model = WaypointModel(SFTModelConfig())
    _, state = _obs(n=64)
    plan = torch.randn(64, 8, 2) + torch.tensor([20.0, 1.0])
    model.fit_normalization(state, plan)
    assert torch.allclose(model.state_mean, state.mean(0))
    assert torch.allclose(model.state_std, state.std(0, unbiased=False))
    last = model.waypoint_head[-1]
    assert torch.allclose(last.bias * model.config.waypoint_scale, plan.mean(0).flatten(), atol=1e-5)
    assert {"state_mean", "state_std"} <= set(model.state_dict())


def test_encoder_cost_is_small() -> None:
    macs = encoder_macs_per_sample(SFTModelConfig())
    mflops = 2 * macs["encode"] / 1e6
    assert 3.0 < mflops < 7.0, mflops


def test_save_load_round_trip(tmp_path) -> None:
    torch.manual_seed(1)
    model = WaypointModel(SFTModelConfig(feature_dim=64))
    bev, state = _obs()
    model.fit_normalization(state, torch.randn(5, 8, 2))
    path = tmp_path / "model.pt"
    written = save_sft_checkpoint(path, model, ENV_SPEC, {"lr": 1e-3}, {"val_ade_m": 1.0})
    raw = torch.load(path, map_location="cpu", weights_only=True)
    assert raw["kind"] == written["kind"] == "sft_waypoint_model"
    assert raw["model_config"]["feature_dim"] == 64
    assert raw["env_spec"] == ENV_SPEC and raw["metrics"] == {"val_ade_m": 1.0}
    loaded = load_sft_model(path)
    assert not loaded.training
    assert loaded.feature_dim == 64 and loaded.config == model.config
    model.eval()
    with torch.no_grad():
        assert torch.equal(loaded(bev, state), model(bev, state))
    assert not list(tmp_path.glob("*.tmp"))


def test_load_rejects_wrong_kind_and_corrupt_files(tmp_path) -> None:
    wrong = tmp_path / "wrong.pt"
    save_checkpoint(wrong, {"kind": "ppo_delta_waypoint", "format_version": 1})
    with pytest.raises(UserError, match="expected sft_waypoint_model"):
        load_sft_model(wrong)
    corrupt = tmp_path / "corrupt.pt"
    corrupt.write_bytes(b"not a checkpoint at all")
    with pytest.raises(UserError, match="corrupt"):
        load_sft_model(corrupt)
    with pytest.raises(UserError, match="not found"):
        load_sft_model(tmp_path / "missing.pt")


def test_load_rejects_malformed_content(tmp_path) -> None:
    model = WaypointModel(SFTModelConfig(feature_dim=32))
    good = save_sft_checkpoint(tmp_path / "good.pt", model, ENV_SPEC, {}, {})

    missing = dict(good)
    del missing["state_dict"]
    save_checkpoint(tmp_path / "missing.pt", missing)
    with pytest.raises(UserError, match="missing state_dict"):
        load_sft_model(tmp_path / "missing.pt")

    mismatch = dict(good, model_config=dict(good["model_config"], feature_dim=48))
    save_checkpoint(tmp_path / "mismatch.pt", mismatch)
    with pytest.raises(UserError, match="weights do not match") as err:
        load_sft_model(tmp_path / "mismatch.pt")
    assert "\n" not in str(err.value)

    bad_config = dict(good, model_config=dict(good["model_config"], colour="red"))
    save_checkpoint(tmp_path / "bad_config.pt", bad_config)
    with pytest.raises(UserError, match="bad model_config"):
        load_sft_model(tmp_path / "bad_config.pt")

    future = dict(good, format_version=99)
    save_checkpoint(tmp_path / "future.pt", future)
    with pytest.raises(UserError, match="format_version"):
        load_sft_model(tmp_path / "future.pt")
