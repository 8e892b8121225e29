"""The throughput benchmark runs in a tiny configuration and reports sane numbers (never a speed)."""

from __future__ import annotations

import json
import math
import tempfile
from pathlib import Path

import pytest
import torch

from benchmarks.throughput import BenchSettings, format_table, main, optimizer_steps_per_env_step, parse_sizes
from tests.cli_helpers import assert_one_line_error, run_cli

RATES = ("world_steps_per_s", "rollout_steps_per_s", "update_steps_per_s", "train_steps_per_s")
REQUIRED = ("device", "num_envs", *RATES)
TINY = ["--seconds", "0", "--rollout-steps", "4", "--minibatches", "2", "--update-epochs", "1"]


def test_tiny_run_reports_every_figure(
    tiny_sft: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # where SB3's default logger makes a folder
    monkeypatch.delenv("SB3_LOGDIR", raising=False)
    argv = [*TINY, "--num-envs", "3,2", "--sb3-max-envs", "2", "--sft-checkpoint", str(tiny_sft), "--json"]
    code, out, err = run_cli(main, argv, capsys)
    assert code == 0, err
    assert list(tmp_path.iterdir()) == []  # the SB3 side-by-side leaves nothing behind
    result = json.loads(out)
    for key in (*REQUIRED, "peak_memory_bytes", "sft_train_samples_per_s", "encoder_flops_per_step"):
        assert key in result, key
    assert result["device"] == "cpu" and result["num_envs"] == 3
    assert [row["num_envs"] for row in result["rows"]] == [2, 3]
    for row in result["rows"]:
        for key in RATES:
            assert math.isfinite(row[key]) and row[key] > 0, (key, row)
        assert row["peak_memory_bytes"] > 0
        assert row["train_vs_encoder"] == row["train_steps_per_s"] / row["encoder_steps_per_s"]
        assert row["world_vs_encoder"] == row["world_steps_per_s"] / row["encoder_steps_per_s"]
        # the bound adds the heads' and Adam's time to the encoder's and the world's (its parts: below);
        # that training stays under it is a measurement, left to the benchmark (timings of 4-step calls
        # on shared cores are too noisy to assert)
        assert row["train_bound_steps_per_s"] < min(row["encoder_steps_per_s"], row["world_steps_per_s"])
        assert row["train_vs_bound"] == row["train_steps_per_s"] / row["train_bound_steps_per_s"]
    assert result["heads_matmul_flops_per_s"] > 1e8 and result["square_matmul_flops_per_s"] > 1e8
    assert 0 < result["optimizer_step_s"] < 1
    heads_s = (result["train_flops_per_step"] - result["encoder_flops_per_step"]) / result[
        "heads_matmul_flops_per_s"
    ]
    for row in result["rows"]:  # 4 steps x N worlds in 2 minibatches of one epoch: 2 Adam steps
        adam_s = result["optimizer_step_s"] * 2 / (4 * row["num_envs"])
        parts = 1 / row["encoder_steps_per_s"] + 1 / row["world_steps_per_s"] + heads_s + adam_s
        assert row["train_bound_steps_per_s"] == pytest.approx(1 / parts, rel=1e-12)
    small, large = result["rows"]
    assert small["sb3_train_steps_per_s"] > 0 and small["train_vs_sb3"] > 0
    assert "sb3_train_steps_per_s" not in large  # above --sb3-max-envs
    assert result["encoder_flops_per_step"] > 1e6  # the default encoder: about 5 MFLOP per step
    assert result["train_flops_per_step"] > result["encoder_flops_per_step"]
    assert 0 <= result["fp16_waypoint_error_m"] < 0.05 and 0 <= result["bf16_waypoint_error_m"] < 0.5


def test_the_heads_width_reaches_the_trainer(tiny_sft: Path, capsys: pytest.CaptureFixture[str]) -> None:
    flops = {}
    for width in (256, 32):
        argv = [*TINY, "--num-envs", "2", "--sb3-max-envs", "0", "--sft-checkpoint", str(tiny_sft)]
        code, out, err = run_cli(main, [*argv, "--hidden-size", str(width), "--json"], capsys)
        assert code == 0, err
        result = json.loads(out)
        assert result["hidden_size"] == width and f"heads 2 x {width};" in format_table(result)
        flops[width] = result["train_flops_per_step"] - result["encoder_flops_per_step"]
    assert flops[32] < flops[256] / 2  # narrower heads, fewer FLOPs per step


@pytest.mark.parametrize(
    ("num_envs", "rollout_steps", "minibatches", "epochs", "steps"),
    [(32, 32, 16, 4, 64), (3, 4, 2, 1, 2), (1, 3, 3, 2, 4)],  # 3 rows by 1: minibatches of 1 and 2
)
def test_optimizer_steps_are_the_updates_minibatch_steps(
    num_envs: int, rollout_steps: int, minibatches: int, epochs: int, steps: int
) -> None:
    settings = BenchSettings(
        device=torch.device("cpu"),
        num_envs=[num_envs],
        seconds=0,
        rollout_steps=rollout_steps,
        minibatches=minibatches,
        update_epochs=epochs,
        sft_checkpoint=None,
        sb3_max_envs=0,
        compile_encoder=False,
    )
    assert optimizer_steps_per_env_step(settings, num_envs) == steps / (num_envs * rollout_steps)


def test_table_output(tiny_sft: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*TINY, "--num-envs", "2", "--sb3-max-envs", "0", "--sft-checkpoint", str(tiny_sft)]
    code, out, err = run_cli(main, argv, capsys)
    assert code == 0, err
    assert "num_envs" in out and "update" in out and "SFT training" in out and "MFLOP/step" in out
    assert "train/enc" in out and "%" in out.splitlines()[2]


@pytest.mark.parametrize(
    ("argv", "fragment"),
    [
        (["--num-envs", "4,x"], "comma-separated list of integers"),
        (["--num-envs", "0"], "sizes >= 1"),
        (["--seconds", "-1"], "--seconds"),
        (["--minibatches", "0"], "--minibatches"),
        (["--hidden-size", "0"], "--hidden-size"),
        (["--device", "tpu"], "tpu"),
        (["--sft-checkpoint", "/nonexistent/model.pt"], "/nonexistent/model.pt"),
    ],
)
def test_bad_flags_are_one_line_errors(
    argv: list[str], fragment: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = run_cli(main, [*TINY, "--sb3-max-envs", "0", *argv], capsys)
    assert_one_line_error(code, err, fragment)


def test_parse_sizes() -> None:
    assert parse_sizes("16, 64,256") == [16, 64, 256]


def test_a_compiled_update_is_measured_and_named(
    tiny_sft: Path, capsys: pytest.CaptureFixture[str], compiled_step_calls: list[str]
) -> None:
    argv = [*TINY, "--num-envs", "2", "--sb3-max-envs", "0", "--sft-checkpoint", str(tiny_sft)]
    code, out, err = run_cli(main, [*argv, "--compile-update", "--json"], capsys)
    assert code == 0, err
    assert set(compiled_step_calls) == {"step"}  # the benchmark's trainer stepped compiled
    result = json.loads(out)
    assert result["compile_update"] is True and result["compile_world"] is False
    assert math.isfinite(result["update_steps_per_s"]) and result["update_steps_per_s"] > 0
    assert ", compiled update;" in format_table(result).splitlines()[0]
    assert "compiled" not in format_table({**result, "compile_update": False}).splitlines()[0]


def test_compile_update_without_a_cpp_compiler_is_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    from torch._inductor import config as inductor_config

    with inductor_config.patch({"cpp.cxx": (None, "no-such-compiler-here")}):
        code, _, err = run_cli(main, [*TINY, "--sb3-max-envs", "0", "--compile-update"], capsys)
    assert_one_line_error(code, err, "--compile-update: torch.compile needs a C++ compiler")
