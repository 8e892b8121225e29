"""The console scripts installed next to the `python -m` commands behave like them."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

SCRIPTS = {
    "dwrl-sft": "--num-episodes",
    "dwrl-ppo": "--sft-checkpoint",
    "dwrl-compare": "--rl-checkpoint",
    "dwrl-demo": "--out-root",
}


def _script(name: str) -> Path:
    path = Path(sys.executable).parent / name
    assert path.is_file(), f"{name} is not installed next to {sys.executable} (pip install -e .)"
    return path


@pytest.mark.parametrize(("name", "flag"), SCRIPTS.items())
def test_help_lists_the_commands_flags_and_exits_0(name: str, flag: str) -> None:
    result = subprocess.run([_script(name), "--help"], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert flag in result.stdout


def test_bad_input_is_one_line_and_exit_2_not_a_returned_value(tmp_path: Path) -> None:
    missing = tmp_path / "missing.pt"
    result = subprocess.run(
        [_script("dwrl-ppo"), "--sft-checkpoint", str(missing), "--out-dir", str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "error:" in result.stderr
    assert not (tmp_path / "run").exists()
