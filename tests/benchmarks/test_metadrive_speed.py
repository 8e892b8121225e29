"""``benchmarks.metadrive_speed`` end to end at a tiny size: every measurement runs and ``--json``
prints the keys the docs read (``slow``: nine MetaDrive processes start)."""

from __future__ import annotations

import json

import pytest

pytest.importorskip(
    "metadrive", reason="the metadrive extra is not installed (pip install -e '.[metadrive]')"
)

from benchmarks import metadrive_speed


@pytest.mark.slow
def test_one_round_prints_every_rate_and_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    metadrive_speed.main(["--episodes", "2", "--repeats", "1", "--json"])
    result = json.loads(capsys.readouterr().out)
    keys = ("raw_policy_steps_per_s", "adapter_policy_steps_per_s", "adapter_2workers_policy_steps_per_s")
    assert all(result[key] > 0 for key in keys)
    for name in metadrive_speed.MEASUREMENTS:
        assert result[f"{name}_policy_steps"] > 0, name
    # the batched env counts the steps of the same two whole scenarios, one world or two, apart or not
    batched = ("adapter", "adapter_2workers", "adapter_2workers_lockstep", "adapter_in_place")
    assert len({result[f"{name}_policy_steps"] for name in batched}) == 1
    assert result["two_workers_vs_one"] == pytest.approx(
        result["adapter_2workers_policy_steps_per_s"] / result["adapter_policy_steps_per_s"]
    )
