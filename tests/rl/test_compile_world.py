"""``--compile-world``: the trainer's toy worlds step as one compiled graph; evaluation stays eager."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from benchmarks import expert_success
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.rl.test_trainer_cli import TINY
from training.common.errors import UserError
from training.envs.toy import ToyWaypointEnv, ToyWorldConfig
from training.rl import config as config_module
from training.rl import train_ppo_delta_waypoint
from training.rl.config import PPOConfig
from training.rl.run import build_run


def test_training_worlds_compile_and_evaluation_worlds_do_not(
    tiny_run: dict[str, Path], tmp_path: Path
) -> None:
    config = PPOConfig(
        sft_checkpoint=str(tiny_run["sft"]), out_dir=str(tmp_path / "run"), num_envs=4, compile_world=True
    )
    config.validate()
    run = build_run(config)
    try:
        assert isinstance(run.env, ToyWaypointEnv) and run.env.compile_step
        assert [env.compile_step for env in run.eval_envs.values()] == [False]
    finally:
        run.env.close()


def test_a_run_with_compiled_worlds_trains_and_saves(
    tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    argv = ["--sft-checkpoint", str(tiny_run["sft"]), "--out-dir", str(out), *TINY, "--compile-world"]
    code, _, err = run_cli(train_ppo_delta_waypoint.main, argv, capsys)
    assert code == 0, err
    assert json.loads((out / "config.json").read_text())["compile_world"] is True
    assert [row["iteration"] for row in json.loads((out / "train_metrics.json").read_text())] == [1, 2]
    assert (out / "final.pt").exists()


def test_compile_world_needs_a_toy_world(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(UserError, match="--compile-world"):
        PPOConfig(
            sft_checkpoint="model.pt", env="carla", num_envs=2, batch_size=64, compile_world=True
        ).validate()
    PPOConfig(
        sft_checkpoint="model.pt", env="toy,carla", num_envs=2, batch_size=64, compile_world=True
    ).validate()
    code, _, err = run_cli(expert_success.main, ["--env", "metadrive", "--compile-world"], capsys)
    assert_one_line_error(code, err, "--compile-world")


def test_compile_world_runs_on_the_cpu_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Not yet run on a GPU: a CUDA device is refused before anything is built."""
    monkeypatch.setattr(config_module, "resolve_device", lambda name: torch.device("cuda"))
    config = PPOConfig(sft_checkpoint="model.pt", num_envs=8, rollout_steps=16, batch_size=64, device="cuda")
    config.validate()
    with pytest.raises(UserError, match=r"--compile-world: .* CPU only"):
        dataclasses.replace(config, compile_world=True).validate()
    with pytest.raises(ValueError, match="CPU only"):
        ToyWaypointEnv(ToyWorldConfig(num_envs=2), device="meta", compile_step=True)
