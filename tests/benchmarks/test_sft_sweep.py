"""The SFT-quality sweep: its recipes, and the summary it tabulates from cells."""

from __future__ import annotations

from pathlib import Path

import pytest

from benchmarks.sft_sweep import (
    DEMO_DEFAULT,
    METRICS,
    TRAINER_DEFAULT,
    Variant,
    epochs_for,
    markdown,
    plot,
    plot_groups,
    summarise,
)
from training.demo import TOY_DEMO_SFT
from training.sft.train_waypoint_bc_torch_v0 import SFTTrainConfig


def test_epochs_scale_inversely_with_the_demonstrations_within_bounds() -> None:
    assert [epochs_for(n) for n in (50, 100, 200, 400, 800, 1600, 10_000)] == [64, 64, 32, 16, 8, 4, 4]


def test_variants_name_their_recipe_and_pass_it_to_the_sft_trainer() -> None:
    assert Variant(800).sft_flags() == ["--num-episodes", "800", "--epochs", "8"]
    noisy = Variant(200, expert_noise_m=0.3)
    assert noisy.name == "sft200_noise0.3" and noisy.sft_flags()[-2:] == ["--expert-noise", "0.3"]


def test_the_sweeps_named_variants_are_what_the_demo_and_the_sft_trainer_train() -> None:
    assert DEMO_DEFAULT.sft_flags() == list(TOY_DEMO_SFT)  # the sweep's marker is the headline's model
    defaults = SFTTrainConfig()
    assert (TRAINER_DEFAULT.num_episodes, TRAINER_DEFAULT.num_epochs) == (
        defaults.num_episodes,
        defaults.epochs,
    )


def _cell(variant: Variant, seed: int, rl_ade: float, worsened: bool) -> dict:
    metrics = {
        key: {"sft": 0.5, "rl": 0.5, "difference": 0.0, "ci_low": -0.1, "ci_high": 0.1}
        | {"improved": False, "worsened": False}
        for key in METRICS
    }
    metrics["ade"] = {
        "sft": 0.4,
        "rl": rl_ade,
        "difference": rl_ade - 0.4,
        "ci_low": rl_ade - 0.45,
        "ci_high": rl_ade - 0.35,
        "improved": not worsened,
        "worsened": worsened,
    }
    return {"variant": variant.name, "seed": seed, "selected_iteration": 10 * seed, "metrics": metrics}


def test_summary_averages_seeds_and_counts_significant_changes(tmp_path: Path) -> None:
    variant = Variant(100)
    cells = [_cell(variant, 0, 0.2, False), _cell(variant, 1, 0.3, False), _cell(variant, 2, 0.5, True)]
    (entry,) = summarise(cells, [variant, Variant(800)])  # a variant without cells is left out
    ade = entry["ade"]
    assert ade["rl"] == pytest.approx(1 / 3) and ade["rl_range"] == [0.2, 0.5]
    assert ade["difference"] == pytest.approx(1 / 3 - 0.4)
    assert ade["ci_low_min"] == pytest.approx(-0.25) and ade["ci_high_max"] == pytest.approx(0.15)
    assert (ade["seeds_improved"], ade["seeds_worsened"]) == (2, 1)
    assert entry["selected_iterations"] == [0, 10, 20]
    table = markdown([entry])
    assert "| sft100 | 3 |" in table and "2 better, 1 worse" in table
    png = plot([entry], tmp_path / "sweep.png")
    assert png.read_bytes().startswith(b"\x89PNG")


def test_a_cell_runs_the_three_documented_commands_with_its_recipe(tmp_path: Path, monkeypatch) -> None:
    """The SFT recipe reaches the SFT trainer, the reward the PPO command, and compare uses its defaults."""
    import benchmarks.sft_sweep as sweep

    calls: dict[str, list[str]] = {}

    def fake(name: str):
        def main(argv: list[str]) -> None:
            calls[name] = argv

        return main

    monkeypatch.setattr("training.sft.train_waypoint_bc_torch_v0.main", fake("sft"))
    monkeypatch.setattr("training.rl.train_ppo_delta_waypoint.main", fake("ppo"))
    monkeypatch.setattr("eval.compare_sft_vs_rl.main", fake("compare"))
    monkeypatch.setattr(sweep, "collect_cell", lambda variant, seed, cell: {"cell": cell})
    result = sweep.run_cell(Variant(100, expert_noise_m=0.3), 2, tmp_path, "cpu", reward="progress")
    assert result["cell"] == tmp_path / "sft100_noise0.3" / "seed2"
    assert calls["sft"][calls["sft"].index("--epochs") + 1] == "64"
    assert calls["sft"][calls["sft"].index("--expert-noise") + 1] == "0.3"
    ppo = calls["ppo"]
    assert ppo[ppo.index("--reward") + 1] == "progress" and ppo[ppo.index("--seed") + 1] == "2"
    assert " ".join(sweep.PPO_COMMAND) in " ".join(ppo)
    assert "--seed" not in calls["compare"]  # the comparison's default: the test range


def test_the_plot_draws_converged_clean_models_in_size_order_and_marks_the_rest() -> None:
    """The demo's model comes first in the sweep's variants; its line must still run by size."""
    variants = [DEMO_DEFAULT, TRAINER_DEFAULT, Variant(10), Variant(50), Variant(200, expert_noise_m=0.3)]
    cells = [_cell(v, 0, 0.3, worsened=False) for v in variants]
    summary = summarise(cells, variants)
    line, marked = plot_groups(summary)
    assert [e["num_episodes"] for e in line] == [10, 20, 50]
    marks = {entry["variant"]: marker for entry, marker in marked}
    assert marks == {"sft20": "s", "sft200_epochs4": "D", "sft200_noise0.3": "*"}
