"""Pictures of the toy world: colours, episode strips, animations, the command line."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch

from eval.animation import mp4_encoder
from tests.video_helpers import video_frames
from training.common.seeds import DEV_SEED_START
from training.envs.toy import ToyWaypointEnv, ToyWorldConfig
from training.envs.toy.viz import bev_to_rgb, ego_to_pixel, main, record_episode_strip, save_episode_strip

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _assert_png(path, min_bytes: int = 5_000) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    assert len(data) > min_bytes


def test_bev_to_rgb_colours_each_layer() -> None:
    bev = np.zeros((4, 8, 8), dtype=np.uint8)
    bev[0, :, 2:6] = 255  # road
    bev[1, :, 4] = 255  # route
    bev[2, 1, 1] = 255  # vehicle
    bev[3, 6, 6] = 255  # obstacle
    rgb = bev_to_rgb(torch.from_numpy(bev))
    assert rgb.shape == (8, 8, 3) and rgb.dtype == np.uint8
    road, route, vehicle, obstacle, ground = rgb[0, 2], rgb[0, 4], rgb[1, 1], rgb[6, 6], rgb[0, 0]
    assert road[0] == road[1] == road[2] and road[0] > ground[0]  # grey
    assert route[0] > 200 and route[1] > 150 and route[2] < 100  # yellow
    assert vehicle[0] > 200 and vehicle[2] < 100  # red
    assert obstacle[2] > 200 and obstacle[0] < 100  # blue
    with pytest.raises(ValueError):
        bev_to_rgb(np.zeros((3, 8, 8), dtype=np.uint8))


def test_ego_to_pixel_uses_the_render_convention() -> None:
    cfg = ToyWorldConfig()
    row, col = ego_to_pixel(np.array([[0.0, 0.0], [10.0, 2.0]]), cfg)
    np.testing.assert_allclose(row, [cfg.bev_ego_row, cfg.bev_ego_row - 10.0 / cfg.bev_resolution_m])
    np.testing.assert_allclose(col, [cfg.bev_size_px / 2, cfg.bev_size_px / 2 - 2.0 / cfg.bev_resolution_m])


def test_save_episode_strip_writes_a_png(tmp_path) -> None:
    cfg = ToyWorldConfig(num_envs=1)
    env = ToyWaypointEnv(cfg)
    obs = env.reset(seed=2)
    frames, experts, models = [], [], []
    for _ in range(4):
        expert = env.expert_waypoints()
        frames.append(obs.bev[0])
        experts.append(expert[0])
        models.append(expert[0] + torch.tensor([0.0, 1.0]))
        obs = env.step(expert).obs
    path = tmp_path / "sub" / "strip.png"
    save_episode_strip(path, frames, experts, models, cfg, every=2, max_frames=3)
    _assert_png(path)
    assert not list(path.parent.glob("*.tmp"))  # written atomically, nothing left behind
    with pytest.raises(ValueError):
        save_episode_strip(path, frames, experts[:2], None, cfg)
    with pytest.raises(ValueError):
        save_episode_strip(path, [], [], None, cfg)


def test_record_episode_strip_with_the_expert_and_with_a_policy(tmp_path) -> None:
    stats = record_episode_strip(tmp_path / "expert.png", seed=1, difficulty=0.3)
    _assert_png(tmp_path / "expert.png")
    assert stats["goal_reached"] and stats["route_completion"] == pytest.approx(1.0)

    cfg = ToyWorldConfig(num_envs=1, max_episode_steps=6)

    def straight_ahead(obs):
        assert obs.bev.shape == (1, 4, 64, 64)
        plan = torch.zeros(1, cfg.num_waypoints, 2)
        plan[0, :, 0] = torch.arange(1, cfg.num_waypoints + 1) * 3.0
        return plan

    stats = record_episode_strip(tmp_path / "policy.png", straight_ahead, seed=1, config=cfg)
    _assert_png(tmp_path / "policy.png")
    assert 1 <= stats["episode_length"] <= 6


def test_command_line(tmp_path, capsys) -> None:
    out = tmp_path / "cli.png"
    assert main(["--out", str(out), "--seed", "4", "--difficulty", "0.2", "--max-frames", "4"]) == 0
    _assert_png(out)
    assert "wrote" in capsys.readouterr().out
    for argv in (
        ["--out", str(out), "--difficulty", "3"],
        ["--out", str(out), "--sft-checkpoint", str(tmp_path / "missing.pt")],
        ["--seed", "1"],
    ):
        with pytest.raises(SystemExit) as exit_info:
            main(argv)
        assert exit_info.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and len(err.strip().splitlines()) == 1


def test_command_line_draws_an_sft_model(tmp_path) -> None:
    sft = pytest.importorskip("training.sft")
    cfg = ToyWorldConfig()
    model = sft.WaypointModel(sft.SFTModelConfig(feature_dim=16, conv_channels=(4, 8), head_hidden_dim=16))
    checkpoint = tmp_path / "model.pt"
    sft.save_sft_checkpoint(checkpoint, model, {"num_waypoints": cfg.num_waypoints}, {}, {})
    out = tmp_path / "sft.png"
    assert main(["--out", str(out), "--sft-checkpoint", str(checkpoint), "--max-frames", "3"]) == 0
    _assert_png(out)


def _episode_length(stdout: str) -> int:
    match = re.search(r"episode_length=(\d+)", stdout)
    assert match, stdout
    return int(match.group(1))


def test_command_line_writes_an_animation(tmp_path, capsys) -> None:
    """An --out ending in .gif (or .mp4): one frame per step plus the final observation."""
    out = tmp_path / "expert.gif"
    assert main(["--out", str(out), "--seed", "4", "--difficulty", "0.2"]) == 0
    frames, (width, height) = video_frames(out)
    assert frames == _episode_length(capsys.readouterr().out) + 1
    assert width > 64 and height > 64


def test_command_line_animates_an_rl_policy_over_its_sft_model(tiny_run, tmp_path, capsys) -> None:
    out = tmp_path / ("rl.mp4" if mp4_encoder() else "rl.gif")
    sft, rl = str(tiny_run["sft"]), str(tiny_run["rl_dir"] / "final.pt")
    argv = ["--out", str(out), "--sft-checkpoint", sft, "--rl-checkpoint", rl, "--seed", str(DEV_SEED_START)]
    assert main(argv) == 0
    assert video_frames(out)[0] == _episode_length(capsys.readouterr().out) + 1

    with pytest.raises(SystemExit) as exit_info:
        main(["--out", str(out), "--rl-checkpoint", rl])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--sft-checkpoint" in err and len(err.strip().splitlines()) == 1
