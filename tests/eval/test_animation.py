"""Animations: real MP4 and GIF files with one frame per step, the GIF fallback, recording an
episode through the protocol, the worst scenarios first, and skipping what cannot be drawn."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from eval import animation
from eval.animation import (
    animate_worst_scenarios,
    record_episode,
    render_frames,
    video_suffix,
    worst_first,
    write_video,
)
from tests.video_helpers import video_frames
from training.common.errors import UserError
from training.common.seeds import DEV_SEED_START
from training.envs.toy import ToyWaypointEnv, ToyWorldConfig

MAX_STEPS = 8  # short episodes keep the toy-world tests fast
INFRACTION_RGB = (255, 48, 48)  # animation.INFRACTION_COLOUR


def _frames(count: int, size: tuple[int, int] = (48, 64)) -> list[np.ndarray]:
    """``count`` distinct RGB frames ``[H, W, 3]``."""
    return [np.full((*size, 3), 20 * i, dtype=np.uint8) for i in range(count)]


def _plan(lateral_per_waypoint_m: float) -> animation.PlanFn:
    """A fixed plan: 3 m ahead per waypoint, drifting sideways (left > 0) by the given step."""

    def plan(obs):
        k = torch.arange(1, 9, dtype=torch.float32)
        return torch.stack((3.0 * k, lateral_per_waypoint_m * k), dim=-1).expand(obs.bev.shape[0], -1, -1)

    return plan


@pytest.fixture
def toy_env() -> ToyWaypointEnv:
    return ToyWaypointEnv(ToyWorldConfig(num_envs=1, max_episode_steps=MAX_STEPS))


# ------------------------------------------------------------------------------------------ files
@pytest.mark.parametrize("suffix", [".mp4", ".gif"])
def test_video_files_hold_every_frame(suffix: str, tmp_path: Path) -> None:
    if suffix == ".mp4" and animation.mp4_encoder() is None:
        pytest.skip("no MP4 encoder installed")
    path = write_video(tmp_path / "sub" / f"clip{suffix}", _frames(7), fps=4.0)
    assert video_frames(path) == (7, (64, 48))
    assert not list(path.parent.glob("*.tmp"))  # written atomically


def test_auto_falls_back_to_gif_without_an_encoder(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    if animation.mp4_encoder() is not None:
        assert video_suffix("auto") == ".mp4"
    monkeypatch.setattr(animation, "mp4_encoder", lambda: None)
    assert video_suffix("auto") == ".gif"
    assert video_suffix("gif") == ".gif"
    with pytest.raises(UserError, match="imageio-ffmpeg"):
        video_suffix("mp4")
    with pytest.raises(UserError, match="imageio-ffmpeg"):
        write_video(tmp_path / "clip.mp4", _frames(2), fps=4.0)
    assert not (tmp_path / "clip.mp4").exists()
    with pytest.raises(UserError, match="avi"):
        video_suffix("avi")


def test_write_video_refuses_other_files(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"\.mp4 or \.gif"):
        write_video(tmp_path / "clip.avi", _frames(2), fps=4.0)
    with pytest.raises(ValueError, match="no frames"):
        write_video(tmp_path / "clip.gif", [], fps=4.0)


# ------------------------------------------------------------------------------------------ choice
def test_worst_first_orders_failures_then_route_then_ade() -> None:
    episodes = [
        {"scenario_seed": 10, "failure": 0, "route_completion": 1.0, "ade": 0.9},
        {"scenario_seed": 11, "failure": 1, "route_completion": 0.5, "ade": 0.1},
        {"scenario_seed": 12, "failure": 1, "route_completion": 0.2, "ade": 0.1},
        {"scenario_seed": 13, "failure": 0, "route_completion": 1.0, "ade": float("nan")},
        {"scenario_seed": 14, "failure": 0, "route_completion": 0.7, "ade": 0.2},
    ]
    assert worst_first(episodes, 10) == [12, 11, 14, 13, 10]
    assert worst_first(episodes, 2) == [12, 11]
    assert worst_first(episodes, 0) == []


# ------------------------------------------------------------------------------------------ drawing
def test_recorded_episode_becomes_one_frame_per_step_and_marks_the_infraction(toy_env) -> None:
    steady = record_episode(toy_env, _plan(0.0), DEV_SEED_START, label="SFT")
    swerve = record_episode(toy_env, _plan(1.5), DEV_SEED_START, reference_fn=_plan(0.0), label="RL")
    assert swerve.outcome in ("off-road", "collision") and swerve.length < MAX_STEPS
    for recording in (steady, swerve):
        assert recording.bev.shape == (recording.length + 1, 4, 64, 64)  # + the final observation
        assert recording.expert_plans.shape == recording.driven_plans.shape == (recording.length, 8, 2)
    assert steady.reference_plans is None
    np.testing.assert_allclose(swerve.reference_plans[0], _plan(0.0)(toy_env.reset(DEV_SEED_START))[0])

    frames = render_frames([steady, swerve], toy_env.config, toy_env.spec.policy_dt)
    assert len(frames) == max(steady.length, swerve.length) + 1
    height, width, channels = frames[0].shape
    assert channels == 3 and height % 16 == 0 and width % 16 == 0
    assert all(frame.shape == frames[0].shape for frame in frames)
    red = np.all(frames[-1] == INFRACTION_RGB, axis=-1)
    before = np.all(frames[swerve.length - 1] == INFRACTION_RGB, axis=-1)
    assert red[:, width // 2 :].sum() > 500 and before.sum() == 0  # the border, once it happened


def test_worst_scenarios_become_side_by_side_videos(toy_env, tmp_path: Path) -> None:
    seeds = [DEV_SEED_START + i for i in range(3)]
    episodes = [
        {"scenario_seed": seeds[0], "failure": 0, "route_completion": 1.0, "ade": 0.1},
        {"scenario_seed": seeds[1], "failure": 1, "route_completion": 0.3, "ade": 0.4},
        {"scenario_seed": seeds[2], "failure": 0, "route_completion": 0.8, "ade": 0.2},
    ]
    videos = animate_worst_scenarios(
        toy_env, _plan(1.5), _plan(0.0), episodes, tmp_path / "animations", count=2, video_format="gif"
    )
    paths = list(videos.values())
    assert [p.name for p in paths] == [f"seed_{seeds[1]}.gif", f"seed_{seeds[2]}.gif"]
    for caption, path in videos.items():
        lengths = [int(n) for n in re.findall(r"after (\d+) steps", caption)]
        assert len(lengths) == 2, caption
        frames, (width, height) = video_frames(path)
        assert frames == max(lengths) + 1
        assert width > 2 * 64 * animation.PANEL_SCALE and height > 64 * animation.PANEL_SCALE


def test_environments_without_the_toy_bev_are_skipped_in_one_line(fake, tmp_path: Path, capsys) -> None:
    episodes = [{"scenario_seed": 0, "failure": 1, "route_completion": 0.5, "ade": 1.0}]
    videos = animate_worst_scenarios(
        fake.Env(1), fake.offset_policy, fake.offset_policy, episodes, tmp_path / "animations", count=1
    )
    assert videos == {}
    assert not (tmp_path / "animations").exists()
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("animations skipped:")
