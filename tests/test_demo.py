"""``python -m training.demo``: each stage runs its documented command in the chosen environment,
and the comparison reads only the test range."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.cli_helpers import assert_one_line_error, run_cli
from training import demo
from training.common.seeds import DEV_SEED_START, TEST_SEED_START


@pytest.fixture
def stages(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> dict[str, list[str]]:
    """Record each stage's argv instead of running it."""
    calls: dict[str, list[str]] = {}

    def recorder(name: str) -> Any:
        def stage(argv: list[str]) -> dict[str, Any]:
            calls[name] = list(argv)
            return {"compare_md": str(tmp_path / "compare.md"), "compare_json": "", "rows": []}

        return stage

    for name in ("sft_main", "ppo_main", "compare_main"):
        monkeypatch.setattr(demo, name, recorder(name))
    return calls


def value(argv: list[str], flag: str) -> str:
    return argv[argv.index(flag) + 1]


def contains_in_order(argv: list[str], part: tuple[str, ...]) -> bool:
    return any(tuple(argv[i : i + len(part)]) == part for i in range(len(argv)))


def test_toy_demo_runs_the_documented_commands(stages: dict[str, list[str]], tmp_path: Path) -> None:
    demo.main(["--out-root", str(tmp_path)])
    sft = stages["sft_main"]
    # the data-limited, converged SFT model README's headline is measured on
    assert (
        value(sft, "--env") == "toy"
        and value(sft, "--num-episodes") == "20"
        and value(sft, "--epochs") == "64"
    )
    ppo = stages["ppo_main"]
    assert contains_in_order(ppo, ("--num-iterations", "100", "--batch-size", "64", "--lr", "3e-4"))
    assert value(ppo, "--env") == "toy" and "--num-envs" not in ppo
    compare = stages["compare_main"]
    assert value(compare, "--seed") == str(TEST_SEED_START) and value(compare, "--episodes") == "100"


def test_metadrive_demo_sizes_each_stage_and_compares_from_the_given_seed(
    stages: dict[str, list[str]], tmp_path: Path
) -> None:
    seed = TEST_SEED_START + 1_000
    demo.main(["--env", "metadrive", "--out-root", str(tmp_path), "--compare-seed", str(seed)])
    for stage in ("sft_main", "ppo_main", "compare_main"):
        assert value(stages[stage], "--env") == "metadrive"
    assert value(stages["sft_main"], "--episodes-per-batch") == "2"
    ppo = stages["ppo_main"]
    assert contains_in_order(ppo, ("--num-iterations", "100", "--batch-size", "64", "--lr", "3e-4"))
    assert value(ppo, "--num-envs") == "2" and value(ppo, "--reward") == "comfort"
    assert value(ppo, "--gamma") == "0.95"  # MetaDrive's discount per second at our 0.5 s step
    assert value(ppo, "--kl-target") == "0.2"  # what every documented MetaDrive run used
    # the selection decides on 40 development episodes (10 chose a policy worse on the test range)
    assert value(ppo, "--eval-episodes") == "40" and value(ppo, "--eval-every") == "25"
    assert value(ppo, "--sft-checkpoint") == str(tmp_path / "sft_waypoint_bc_torch_v0" / "model.pt")
    compare = stages["compare_main"]
    assert value(compare, "--seed") == str(seed) and value(compare, "--episodes") == "100"
    assert value(compare, "--rl-checkpoint") == str(tmp_path / "rl_delta_ppo_v0" / "final.pt")


@pytest.mark.parametrize("seed", [DEV_SEED_START, TEST_SEED_START - 1, 2_000_000_000 - 50])
def test_compare_seed_outside_the_test_range_exits_2_before_anything_runs(
    seed: int, stages: dict[str, list[str]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(demo.main, ["--out-root", str(tmp_path), "--compare-seed", str(seed)], capsys)
    assert_one_line_error(code, err, "--compare-seed", "test range")
    assert stages == {}
