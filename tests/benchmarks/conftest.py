"""A tiny SFT checkpoint shared by the benchmark tests (about 3 s on one CPU core)."""

from __future__ import annotations

from pathlib import Path

import pytest


@pytest.fixture(scope="module")
def tiny_sft(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from training.rl.test_ppo_delta_smoke import make_tiny_sft

    return make_tiny_sft(tmp_path_factory.mktemp("bench_sft") / "sft")
