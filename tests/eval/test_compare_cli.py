"""The SFT-vs-RL comparison command: report files, determinism, zero differences for identical
policies, the SFT/RL pairing check and one-line errors for bad checkpoints."""

from __future__ import annotations

import dataclasses
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from eval import animation, compare_sft_vs_rl
from eval.animation import video_suffix, worst_first
from eval.closed_loop import run_closed_loop
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.video_helpers import video_frames
from training.common.seeds import DEV_SEED_START
from training.envs.registry import make_env
from training.rl.checkpoint import load_rl_policy
from training.sft.model import load_sft_model

SUMMARY_KEYS = ("ade", "fde", "episode_return", "route_completion", "collision_rate", "off_road_rate")
EPISODE_KEYS = ("scenario_seed", "ade", "fde", "episode_return", "route_completion", "collision", "off_road")
ZERO_METRICS = ("ade", "fde", "ade_shared", "fde_shared", "route_completion", "collision_rate")
EPISODES = 6
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
WALL_TIME_KEYS = ("sft_wall_time_s", "rl_wall_time_s")


def compare_argv(sft: Path, rl: Path, out_dir: Path, *extra: str) -> list[str]:
    return [
        "--sft-checkpoint",
        str(sft),
        "--rl-checkpoint",
        str(rl),
        "--episodes",
        str(EPISODES),
        "--device",
        "cpu",
        "--out-dir",
        str(out_dir),
        "--seed",  # tests read the development scenarios; the test range is for reported numbers
        str(DEV_SEED_START),
        *extra,
    ]


def run_main(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return run_cli(compare_sft_vs_rl.main, argv, capsys)


def numbers(report: dict[str, Any]) -> dict[str, Any]:
    """``compare.json`` without what legitimately differs between runs (wall times, plot list)."""
    metadata = {k: v for k, v in report["metadata"].items() if k not in WALL_TIME_KEYS}
    return {
        "sft": report["sft"],
        "rl": report["rl"],
        "rows": report["rows"],
        "episodes": report["episodes"],
        "metadata": metadata,
    }


@pytest.fixture
def no_plots(monkeypatch: pytest.MonkeyPatch) -> None:
    """Skip drawing (seconds per run) in tests about numbers; ``test_report_files`` draws them."""
    monkeypatch.setattr(compare_sft_vs_rl, "make_plots", lambda *args, **kwargs: {})
    monkeypatch.setattr(compare_sft_vs_rl, "make_animations", lambda *args, **kwargs: {})


@pytest.fixture(scope="module")
def report(tiny_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One full comparison (with plots) of the tiny SFT model and its 2-iteration RL run."""
    out = tmp_path_factory.mktemp("compare") / "report"
    result = compare_sft_vs_rl.main(compare_argv(tiny_run["sft"], tiny_run["rl_dir"] / "final.pt", out))
    return {"out": out, "result": result, "json": json.loads((out / "compare.json").read_text())}


@pytest.fixture(scope="module")
def zero_residual_run(tiny_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An RL checkpoint whose actor never trained: one critic-only warm-up iteration."""
    from training.rl.test_ppo_delta_smoke import smoke_config
    from training.rl.trainer import train_ppo

    out = tmp_path_factory.mktemp("zero_residual") / "rl"
    config = dataclasses.replace(
        smoke_config(tiny_run["sft"], out),
        num_iterations=1,
        critic_warmup_iterations=1,
        update_epochs=1,
        eval_episodes=1,
        save_every=0,
    )
    train_ppo(config)
    return out / "final.pt"


# ------------------------------------------------------------------------------------------ report
def test_report_files(report: dict[str, Any]) -> None:
    out, data = report["out"], report["json"]
    for side in ("sft", "rl"):
        for key in SUMMARY_KEYS:
            assert isinstance(data[side][key], float), (side, key, data[side].get(key))
        episodes = data["episodes"][side]
        assert len(episodes) == EPISODES
        for episode in episodes:
            assert all(key in episode for key in EPISODE_KEYS), episode
        mean_ade = sum(e["ade"] for e in episodes) / EPISODES
        assert data[side]["ade"] == pytest.approx(mean_ade)
    # the same scenarios, paired
    assert [e["scenario_seed"] for e in data["episodes"]["sft"]] == [
        e["scenario_seed"] for e in data["episodes"]["rl"]
    ]
    assert len({e["scenario_seed"] for e in data["episodes"]["sft"]}) == EPISODES
    assert {row["metric"] for row in data["rows"]} >= set(SUMMARY_KEYS)

    markdown = (out / "compare.md").read_text()
    pngs = sorted((out / "plots").glob("*.png"))
    assert len(pngs) >= 3, pngs
    assert sorted(data["plots"]) == sorted(f"plots/{p.name}" for p in pngs)
    for png in pngs:
        content = png.read_bytes()
        assert content.startswith(PNG_SIGNATURE), png
        assert len(content) > 5_000, (png, len(content))
        assert f"(plots/{png.name})" in markdown, png.name
    for row in data["rows"]:
        assert row["metric"] in markdown


def test_report_links_animations_of_the_worst_sft_scenarios(report: dict[str, Any]) -> None:
    """Three videos (the default), worst SFT episodes first, linked from compare.md, each one frame
    per step of the longer of the two episodes, plus the final observations."""
    out, data = report["out"], report["json"]
    seeds = worst_first(data["episodes"]["sft"], 3)
    expected = [f"animations/seed_{seed}{video_suffix('auto')}" for seed in seeds]
    assert data["animations"] == expected
    markdown = (out / "compare.md").read_text()
    lengths = {
        side: {e["scenario_seed"]: e["length"] for e in data["episodes"][side]} for side in ("sft", "rl")
    }
    for seed, relative in zip(seeds, expected, strict=True):
        assert f"]({relative})" in markdown, relative
        frames, (width, height) = video_frames(out / relative)
        assert frames == max(lengths["sft"][seed], lengths["rl"][seed]) + 1, relative
        assert width > height > 64


def test_animations_fall_back_to_gif_without_an_encoder(
    tiny_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setattr(compare_sft_vs_rl, "make_plots", lambda *args, **kwargs: {})
    monkeypatch.setattr(animation, "mp4_encoder", lambda: None)
    out = tmp_path / "gif"
    argv = compare_argv(tiny_run["sft"], tiny_run["rl_dir"] / "final.pt", out, "--animations", "1")
    code, _, err = run_main(argv, capsys)
    assert code == 0, err
    data = json.loads((out / "compare.json").read_text())
    (relative,) = data["animations"]
    seed = worst_first(data["episodes"]["sft"], 1)[0]
    assert relative == f"animations/seed_{seed}.gif" and f"]({relative})" in (out / "compare.md").read_text()
    lengths = [
        e["length"] for side in ("sft", "rl") for e in data["episodes"][side] if e["scenario_seed"] == seed
    ]
    assert video_frames(out / relative)[0] == max(lengths) + 1

    code, _, err = run_main([*argv, "--animation-format", "mp4", "--out-dir", str(tmp_path / "mp4")], capsys)
    assert_one_line_error(code, err, "imageio-ffmpeg")
    assert not (tmp_path / "mp4").exists()


def test_report_is_written_before_the_animations(
    tiny_run: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An encoder that dies mid-video must not cost the numbers already measured."""
    monkeypatch.setattr(compare_sft_vs_rl, "make_plots", lambda *args, **kwargs: {})

    def encoder_crash(*args: Any, **kwargs: Any) -> None:
        raise OSError("encoder died")

    monkeypatch.setattr(compare_sft_vs_rl, "animate_worst_scenarios", encoder_crash)
    out = tmp_path / "out"
    with pytest.raises(OSError, match="encoder died"):
        compare_sft_vs_rl.main(compare_argv(tiny_run["sft"], tiny_run["rl_dir"] / "final.pt", out))
    data = json.loads((out / "compare.json").read_text())
    assert len(data["episodes"]["rl"]) == EPISODES and data["animations"] == []
    assert (out / "compare.md").is_file()


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [(("--animations", "-1"), "--animations"), (("--animation-format", "avi"), "--animation-format")],
)
def test_bad_animation_flags_exit_2_with_one_line(
    flags: tuple[str, ...], fragment: str, tiny_run: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    code, _, err = run_main(
        compare_argv(tiny_run["sft"], tiny_run["rl_dir"] / "final.pt", out, *flags), capsys
    )
    assert_one_line_error(code, err, fragment)
    assert not out.exists()


def test_report_holds_each_policy_driving_the_same_scenarios(
    report: dict[str, Any], tiny_run: dict[str, Path]
) -> None:
    """Each side is its own policy, replayed here independently on the same development scenarios,
    and every row's difference is the paired mean of RL - SFT inside its interval; the trained
    residual makes the ADE differ (control for the zero-difference test)."""
    data = report["json"]
    sft_model = load_sft_model(tiny_run["sft"])
    policy, _ = load_rl_policy(tiny_run["rl_dir"] / "final.pt", tiny_run["sft"])
    env = make_env("toy", EPISODES, "cpu", difficulty=data["metadata"]["difficulty"])
    replay = {
        "sft": run_closed_loop(env, lambda obs: sft_model(obs.bev, obs.state), DEV_SEED_START, EPISODES),
        "rl": run_closed_loop(
            env, lambda obs: policy.deterministic_waypoints(obs.bev, obs.state), DEV_SEED_START, EPISODES
        ),
    }
    for side, result in replay.items():
        for key in ("ade", "fde", "route_completion", "collision", "mean_abs_jerk"):
            reported = [e[key] for e in data["episodes"][side]]
            assert reported == pytest.approx([e[key] for e in result.episodes]), (side, key)
    rows = {row["metric"]: row for row in data["rows"]}
    for metric, key in (("ade", "ade"), ("mean_abs_jerk", "mean_abs_jerk"), ("failure_rate", "failure")):
        differences = [
            r[key] - s[key] for s, r in zip(*(data["episodes"][x] for x in ("sft", "rl")), strict=True)
        ]
        row = rows[metric]
        assert row["difference"] == pytest.approx(sum(differences) / EPISODES), metric
        assert row["ci_low"] <= row["difference"] <= row["ci_high"], metric
    assert rows["ade"]["difference"] != 0.0
    assert data["metadata"]["seed_split"] == "development"


def test_same_inputs_give_identical_numbers(
    report: dict[str, Any], tiny_run: dict[str, Path], tmp_path: Path, no_plots: None, capsys
) -> None:
    out = tmp_path / "again"
    code, stdout, err = run_main(compare_argv(tiny_run["sft"], tiny_run["rl_dir"] / "final.pt", out), capsys)
    assert code == 0, err
    assert "ade" in stdout
    assert f"{EPISODES} development scenarios from seed {DEV_SEED_START}" in stdout
    assert "the RL checkpoint holds iteration 2 of 2" in stdout  # the tiny run keeps its last iteration
    assert "collisions by who closed the gap" not in stdout  # the toy world does not describe them
    again = json.loads((out / "compare.json").read_text())
    assert numbers(again) == numbers(report["json"])


def test_fewer_worlds_play_the_same_episodes(
    report: dict[str, Any], tiny_run: dict[str, Path], tmp_path: Path, no_plots: None, capsys
) -> None:
    """``--worlds 4`` for 6 episodes: worlds go on to the next scenarios; the same numbers."""
    out = tmp_path / "fewer_worlds"
    argv = compare_argv(tiny_run["sft"], tiny_run["rl_dir"] / "final.pt", out, "--worlds", "4")
    code, _, err = run_main(argv, capsys)
    assert code == 0, err
    assert numbers(json.loads((out / "compare.json").read_text())) == numbers(report["json"])


def test_identical_policies_give_zero_differences(
    tiny_run: dict[str, Path], zero_residual_run: Path, tmp_path: Path, no_plots: None, capsys
) -> None:
    heads = torch.load(zero_residual_run, weights_only=True)["heads"]
    assert heads["log_std"].numel() > 0  # a real RL checkpoint
    out = tmp_path / "zero"
    code, _, err = run_main(compare_argv(tiny_run["sft"], zero_residual_run, out), capsys)
    assert code == 0, err
    data = json.loads((out / "compare.json").read_text())
    rows = {row["metric"]: row for row in data["rows"]}
    for metric in ZERO_METRICS:
        row = rows[metric]
        assert row["difference"] == 0.0, row
        assert (row["ci_low"], row["ci_high"]) == (0.0, 0.0), row
        assert row["sft"] == row["rl"], row
        assert not row["significant"], row
    assert data["episodes"]["sft"] == data["episodes"]["rl"]


# ------------------------------------------------------------------------------------------ pairing
def _other_sft(sft: Path, tmp_path: Path) -> Path:
    """An SFT checkpoint of the same architecture with slightly different weights."""
    checkpoint = torch.load(sft, weights_only=True)
    state = dict(checkpoint["state_dict"])
    name = next(k for k, v in state.items() if v.is_floating_point())
    state[name] = state[name] + 0.01
    path = tmp_path / "other_sft.pt"
    torch.save({**checkpoint, "state_dict": state}, path)
    return path


def test_mismatched_sft_is_refused_unless_allowed(
    tiny_run: dict[str, Path], tmp_path: Path, no_plots: None, capsys
) -> None:
    other = _other_sft(tiny_run["sft"], tmp_path)
    out = tmp_path / "mismatch"
    code, _, err = run_main(compare_argv(other, tiny_run["rl_dir"] / "final.pt", out), capsys)
    assert_one_line_error(code, err, "--allow-mismatch")
    assert not out.exists()

    code, _, err = run_main(
        compare_argv(other, tiny_run["rl_dir"] / "final.pt", out, "--allow-mismatch"), capsys
    )
    assert code == 0, err
    data = json.loads((out / "compare.json").read_text())
    assert data["metadata"]["sft_checkpoint"] == str(other)
    assert len(data["episodes"]["sft"]) == EPISODES


# ------------------------------------------------------------------------------------------ bad input
def _missing(tmp: Path, run: dict[str, Path]) -> Path:
    return tmp / "no_such_final.pt"


def _sft_as_rl(tmp: Path, run: dict[str, Path]) -> Path:
    return run["sft"]


def _random_bytes(tmp: Path, run: dict[str, Path]) -> Path:
    path = tmp / "random.pt"
    path.write_bytes(random.Random(1).randbytes(4096))
    return path


def _truncated_rl(tmp: Path, run: dict[str, Path]) -> Path:
    path = tmp / "truncated_final.pt"
    data = (run["rl_dir"] / "final.pt").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


@pytest.mark.parametrize(
    ("make_path", "fragments"),
    [
        (_missing, ("no_such_final.pt",)),
        (_sft_as_rl, ("sft_waypoint_model", "ppo_delta_waypoint")),
        (_random_bytes, ("random.pt",)),
        (_truncated_rl, ("truncated_final.pt",)),
    ],
    ids=["missing", "sft-as-rl", "random-bytes", "truncated"],
)
def test_bad_rl_checkpoint_exits_2_with_one_line(
    make_path, fragments: tuple[str, ...], tiny_run: dict[str, Path], tmp_path: Path, capsys
) -> None:
    rl = make_path(tmp_path, tiny_run)
    out = tmp_path / "out"
    code, _, err = run_main(compare_argv(tiny_run["sft"], rl, out), capsys)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()


def test_corrupt_sft_checkpoint_exits_2_with_one_line(
    tiny_run: dict[str, Path], tmp_path: Path, capsys
) -> None:
    corrupt = _random_bytes(tmp_path, tiny_run)
    out = tmp_path / "out"
    argv = compare_argv(corrupt, tiny_run["rl_dir"] / "final.pt", out, "--allow-mismatch")
    code, _, err = run_main(argv, capsys)
    assert_one_line_error(code, err, "random.pt")
    assert not out.exists()


def test_missing_sft_checkpoint_exits_2_with_one_line(
    tiny_run: dict[str, Path], tmp_path: Path, capsys
) -> None:
    out = tmp_path / "out"
    code, _, err = run_main(
        compare_argv(tmp_path / "no_such_model.pt", tiny_run["rl_dir"] / "final.pt", out), capsys
    )
    assert_one_line_error(code, err, "no_such_model.pt")
