"""Each command with ``--env carla`` and no server: exit 2, one stderr line naming host:port, fast,
and nothing written. The three commands run as real processes, side by side."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TIMEOUT_S = 1.0
WALL_LIMIT_S = 30.0  # interpreter and torch start-up on a loaded 2-core machine, plus the 1 s probe


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def snapshot(root: Path) -> dict[str, str]:
    """Every file under ``root`` with its sha256, and every folder."""
    files = {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in root.rglob("*")
        if p.is_file()
    }
    folders = {str(p.relative_to(root)): "dir" for p in root.rglob("*") if p.is_dir()}
    return files | folders


def carla_flags(port: int) -> list[str]:
    return [
        "--env",
        "carla",
        "--carla-host",
        "127.0.0.1",
        "--carla-port",
        str(port),
        "--carla-timeout",
        str(TIMEOUT_S),
    ]


def run_commands(commands: dict[str, list[str]]) -> dict[str, tuple[int, str, float]]:
    """Start every command at once; ``name -> (exit code, stderr, seconds)``."""
    started = time.monotonic()
    running = {
        name: subprocess.Popen(
            [sys.executable, "-m", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for name, argv in commands.items()
    }
    results = {}
    for name, process in running.items():
        _, err = process.communicate(timeout=WALL_LIMIT_S * 2)
        results[name] = (process.returncode, err, time.monotonic() - started)
    return results


def check_one_line(code: int, err: str, seconds: float, port: int) -> None:
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("error: no CARLA server"), err
    assert f"127.0.0.1:{port}" in lines[0] and "./CarlaUE4.sh -RenderOffScreen -carla-rpc-port=" in lines[0]
    assert seconds < WALL_LIMIT_S


@pytest.fixture(scope="module")
def outcomes(tiny_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    root = tmp_path_factory.mktemp("carla_cli")
    sft_dir, rl_dir = root / "sft", root / "rl"
    sft_dir.mkdir()
    (sft_dir / "model.pt").write_bytes(tiny_run["sft"].read_bytes())
    rl_checkpoint = tiny_run["rl_dir"] / "final.pt"
    port = closed_port()
    before = {"sft": snapshot(sft_dir), "tiny": snapshot(tiny_run["rl_dir"])}
    commands = {
        "sft": [
            "training.sft.train_waypoint_bc_torch_v0",
            "--out-dir",
            str(sft_dir),
            "--overwrite",
            "--episodes-per-batch",
            "2",
            *carla_flags(port),
        ],
        "rl": [
            "training.rl.train_ppo_delta_waypoint",
            "--sft-checkpoint",
            str(sft_dir / "model.pt"),
            "--out-dir",
            str(rl_dir),
            "--num-envs",
            "2",
            "--eval-episodes",
            "2",
            *carla_flags(port),
        ],
        "compare": [
            "eval.compare_sft_vs_rl",
            "--sft-checkpoint",
            str(tiny_run["sft"]),
            "--rl-checkpoint",
            str(rl_checkpoint),
            "--episodes",
            "2",
            "--out-dir",
            str(root / "compare"),
            *carla_flags(port),
        ],
    }
    results = run_commands(commands)
    after = {"sft": snapshot(sft_dir), "tiny": snapshot(tiny_run["rl_dir"])}
    return {"port": port, "results": results, "before": before, "after": after, "root": root}


def test_rl_trainer_fails_in_one_line_and_writes_nothing(outcomes: dict) -> None:
    code, err, seconds = outcomes["results"]["rl"]
    check_one_line(code, err, seconds, outcomes["port"])
    assert not (outcomes["root"] / "rl").exists()


def test_compare_fails_in_one_line_and_writes_nothing(outcomes: dict) -> None:
    code, err, seconds = outcomes["results"]["compare"]
    check_one_line(code, err, seconds, outcomes["port"])
    assert outcomes["before"]["tiny"] == outcomes["after"]["tiny"]
    assert not (outcomes["root"] / "compare").exists()


def test_sft_trainer_fails_in_one_line_and_writes_nothing(outcomes: dict) -> None:
    code, err, seconds = outcomes["results"]["sft"]
    check_one_line(code, err, seconds, outcomes["port"])
    assert outcomes["before"]["sft"] == outcomes["after"]["sft"]
