"""``benchmarks.expert_success``: the toy expert's clean rate, and for MetaDrive, each collision
replayed and described (who was moving into whom)."""

from __future__ import annotations

import importlib.util
import json

import pytest

from benchmarks.expert_success import main


def test_the_toy_expert_finishes_cleanly(capsys: pytest.CaptureFixture[str]) -> None:
    main(["--episodes", "20"])
    report = json.loads(capsys.readouterr().out)
    assert report["env"] == "toy" and report["episodes"] == 20
    assert report["finished_clean_rate"] == 1.0 and report["collision_rate"] == 0.0
    assert "unfinished" not in report and "collisions_closed_by" not in report


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("metadrive") is None, reason="the metadrive extra is not installed"
)
def test_a_metadrive_collision_is_replayed_and_described(capsys: pytest.CaptureFixture[str]) -> None:
    # development seed 1e9 + 700085: a car beside the expert turns into it (docs/metadrive.md)
    main(["--env", "metadrive", "--episodes", "1", "--seed", "1000700085", "--workers", "1"])
    report = json.loads(capsys.readouterr().out)
    assert report["collision_rate"] == 1.0
    (entry,) = report["unfinished"]
    assert entry["scenario_seed"] == 1_000_700_085 and entry["outcome"] == "collision"
    assert entry["collision"]["closed_by"] == "other" and entry["collision"]["other"] == "SVehicle"
    assert report["collisions_closed_by"] == {"ego": 0, "ego standing": 0, "other": 1, "not found": 0}
