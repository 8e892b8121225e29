import json

import numpy as np
import pytest

from eval.closed_loop import run_closed_loop
from eval.metrics import compare_paired, summarise
from eval.plots import plot_ade_distribution, plot_episodes, plot_metric_bars, plot_training_curves
from eval.report import format_table, write_report

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(fake):
    def better(obs):
        plan = fake.offset_policy(obs)
        plan[..., 1] -= 0.5
        return plan

    sft = run_closed_loop(fake.Env(6), fake.offset_policy, 0, 12, record_trajectories=3)
    rl = run_closed_loop(fake.Env(6), better, 0, 12, record_trajectories=3)
    return sft, rl


def assert_png(path):
    data = path.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 5000


def test_plots_are_png_files(tmp_path, runs):
    sft, rl = runs
    rows = compare_paired(sft.episodes, rl.episodes, num_resamples=200)
    assert_png(plot_metric_bars(rows, tmp_path / "bars.png"))
    assert_png(
        plot_ade_distribution(
            [e["ade"] for e in sft.episodes], [e["ade"] for e in rl.episodes], tmp_path / "ade.png"
        )
    )
    train = [
        {"env_steps": 64 * i, "episode_return": float(i), "losses/policy_loss": -0.01 * i, "approx_kl": 0.01}
        for i in range(5)
    ]
    evals = [{"iteration": i, "ade": 1.0 / (i + 1), "route_completion": 0.5} for i in range(3)]
    assert_png(plot_training_curves(train, evals, tmp_path / "curves.png"))
    assert_png(plot_training_curves([], [], tmp_path / "empty_curves.png"))
    route = np.stack([np.linspace(0, 8, 20), np.zeros(20)], -1)
    assert_png(plot_episodes(sft.trajectories, rl.trajectories, tmp_path / "episodes.png", route_xy=route))
    assert not list(tmp_path.glob(".*.tmp"))


def test_report_files(tmp_path, runs):
    sft, rl = runs
    rows = compare_paired(sft.episodes, rl.episodes, num_resamples=200)
    plot = plot_metric_bars(rows, tmp_path / "plots" / "bars.png")
    table = format_table(rows)
    assert "ade [m]" in table and "95% CI" in table
    json_path, md_path = write_report(
        tmp_path,
        rows,
        summarise(sft.episodes),
        summarise(rl.episodes),
        sft.episodes,
        rl.episodes,
        {"seed": 0, "num_episodes": 12},
        [plot],
    )
    data = json.loads(json_path.read_text())
    for side in ("sft", "rl"):
        for key in ("ade", "fde", "episode_return", "route_completion", "collision_rate", "off_road_rate"):
            assert key in data[side]
    assert data["rl"]["ade"] == pytest.approx(data["sft"]["ade"] - 0.5)
    assert len(data["rows"]) == len(rows)
    assert len(data["episodes"]["sft"]) == len(data["episodes"]["rl"]) == 12
    assert data["metadata"]["seed"] == 0
    md = md_path.read_text()
    assert "](plots/bars.png)" in md
    assert "significantly improved ADE" in md
