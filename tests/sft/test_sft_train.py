"""The behaviour-cloning trainer: command line, outputs, determinism and that it learns."""

from __future__ import annotations

import json

import pytest
import torch
from sft_fake_env import FakeWaypointEnv

import training.sft.train_waypoint_bc_torch_v0 as trainer
from training.sft import load_sft_model
from training.sft.data import WaypointDemoDataset
from training.sft.train_waypoint_bc_torch_v0 import SFTTrainConfig, main, train_sft


def _fake_make_env(name: str, num_envs: int, device: torch.device, **_options: object) -> FakeWaypointEnv:
    return FakeWaypointEnv(num_envs, device)


def _small_config(out_dir, **overrides) -> SFTTrainConfig:
    values = dict(
        out_dir=str(out_dir),
        num_episodes=48,
        val_episodes=16,
        episodes_per_batch=16,
        record_every=1,
        epochs=12,
        batch_size=16,
        lr=3e-3,
        feature_dim=32,
        device="cpu",
    )
    values.update(overrides)
    return SFTTrainConfig(**values)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (["--lr", "0"], "--lr must be > 0"),
        (["--epochs", "0"], "--epochs must be >= 1"),
        (["--batch-size", "0"], "--batch-size must be >= 1"),
        (["--num-episodes", "0"], "--num-episodes must be >= 1"),
        (["--env", "carla2"], "unknown --env"),
        (["--seed", "500"], "--seed must be in"),
        (["--device", "tpu"], "--device"),
        (["--difficulty", "2"], "--difficulty must be in [0, 1]"),
        (["--batch-size", "many"], "invalid int value"),
    ],
)
def test_bad_flags_exit_2_with_one_line(argv, expected, tmp_path, capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main([*argv, "--out-dir", str(tmp_path / "run")])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and expected in err, err
    assert not (tmp_path / "run").exists()


def test_existing_model_needs_overwrite(tmp_path, capsys) -> None:
    (tmp_path / "model.pt").write_bytes(b"keep me")
    with pytest.raises(SystemExit) as exit_info:
        main(["--out-dir", str(tmp_path)])
    assert exit_info.value.code == 2
    assert "--overwrite" in capsys.readouterr().err
    assert (tmp_path / "model.pt").read_bytes() == b"keep me"


def test_training_writes_outputs_and_is_deterministic(tmp_path, monkeypatch) -> None:
    monkeypatch.setattr(trainer, "make_env", _fake_make_env)
    first = train_sft(_small_config(tmp_path / "a"), show_progress=False)
    second = train_sft(_small_config(tmp_path / "b"), show_progress=False)

    run = tmp_path / "a"
    for name in (
        "config.json",
        "model.pt",
        "metrics.json",
        "demos/train/manifest.json",
        "demos/val/manifest.json",
    ):
        assert (run / name).is_file(), name
    assert list(run.glob("events.out.tfevents.*"))
    config = json.loads((run / "config.json").read_text())
    assert config["lr"] == 3e-3 and config["out_dir"] == str(run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert [e["epoch"] for e in metrics["epochs"]] == list(range(1, 13))
    assert {"train_loss", "val_ade_m", "val_fde_m"} <= set(metrics["epochs"][0])
    checkpoint = torch.load(run / "model.pt", weights_only=True)
    assert checkpoint["train_config"] == config and checkpoint["env_spec"]["num_waypoints"] == 4

    # Same seed, same device: same data, same weights, same metrics.
    a, b = load_sft_model(run / "model.pt"), load_sft_model(tmp_path / "b" / "model.pt")
    for (name, pa), (_, pb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert torch.equal(pa, pb), name
    assert first["val_ade_m"] == second["val_ade_m"]
    # ... and the same command, into the same folder, the same file byte for byte (RL runs pair
    # with their SFT model by its sha256), while metrics.json keeps the wall time
    again = tmp_path / "again"
    train_sft(_small_config(again, overwrite=True), show_progress=False)
    model_bytes = (again / "model.pt").read_bytes()
    train_sft(_small_config(again, overwrite=True), show_progress=False)
    assert (again / "model.pt").read_bytes() == model_bytes
    assert json.loads((again / "metrics.json").read_text())["final"]["wall_time_s"] > 0

    # Training and held-out scenarios never overlap.
    train_seeds = set(WaypointDemoDataset(run / "demos" / "train").scenario_seed.tolist())
    val_seeds = set(WaypointDemoDataset(run / "demos" / "val").scenario_seed.tolist())
    assert train_seeds and val_seeds and not train_seeds & val_seeds

    # The fake expert's plan is a function of the image and state: the model must beat the mean.
    assert first["val_ade_m"] < 0.5 * first["mean_plan_val_ade_m"]

    # A finished run is kept unless --overwrite.
    with pytest.raises(trainer.UserError, match="--overwrite"):
        train_sft(_small_config(run), show_progress=False)
    train_sft(_small_config(run, overwrite=True, epochs=1), show_progress=False)
    assert len(json.loads((run / "metrics.json").read_text())["epochs"]) == 1


def test_short_toy_run_beats_no_skill_baselines(tmp_path) -> None:
    """A small behaviour-cloning run in the toy world must clearly beat constant plans."""
    config = SFTTrainConfig(
        out_dir=str(tmp_path),
        num_episodes=96,
        val_episodes=24,
        episodes_per_batch=48,
        record_every=2,
        epochs=5,
        batch_size=64,
        lr=2e-3,
        device="cpu",
    )
    result = train_sft(config, show_progress=False)
    train = WaypointDemoDataset(tmp_path / "demos" / "train")
    val = WaypointDemoDataset(tmp_path / "demos" / "val")
    # No-skill baselines, computed here: the training set's mean plan, and standing still.
    mean_error = (train.waypoints.mean(dim=0) - val.waypoints).norm(dim=-1)  # [M, K] metres
    mean_plan = {"ade_m": float(mean_error.mean()), "fde_m": float(mean_error[:, -1].mean())}
    zero_plan = {"ade_m": float(val.waypoints.norm(dim=-1).mean())}
    model = load_sft_model(tmp_path / "model.pt")
    assert model.config.bev_shape == (4, 64, 64)
    assert result["val_ade_m"] < 0.5 * mean_plan["ade_m"], (result, mean_plan)
    assert result["val_fde_m"] < 0.6 * mean_plan["fde_m"], (result, mean_plan)
    assert result["val_ade_m"] < 0.1 * zero_plan["ade_m"]


def test_progress_in_a_file_is_plain_lines_and_on_a_terminal_a_bar(tmp_path, capsys, monkeypatch) -> None:
    """Redirected to a file, the trainer writes one readable line per epoch, never a redrawn bar."""
    train_sft(_small_config(tmp_path / "file", num_episodes=8, val_episodes=4, epochs=2))
    err = capsys.readouterr().err
    assert "\r" not in err
    assert "epoch 1/2: train loss" in err and "epoch 2/2: train loss" in err
    assert "expert demos: 8 train episodes recorded" in err

    monkeypatch.setattr("training.common.progress.on_terminal", lambda: True)
    train_sft(_small_config(tmp_path / "terminal", num_episodes=8, val_episodes=4, epochs=2))
    err = capsys.readouterr().err
    assert "\r" in err and "behaviour cloning" in err  # a live bar
    assert "epoch 1/2: train loss" not in err
