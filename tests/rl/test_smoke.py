"""The end-to-end smoke command runs inside the suite and passes."""

from __future__ import annotations

from pathlib import Path

from training.rl import test_ppo_delta_smoke


def test_smoke_command_passes(tmp_path: Path, capsys) -> None:
    assert test_ppo_delta_smoke.main(["--work-dir", str(tmp_path)]) == 0
    assert "smoke test passed" in capsys.readouterr().out


def test_smoke_detects_a_broken_run(tmp_path: Path, tiny_run: dict[str, Path]) -> None:
    """The checks can fail: a run whose metrics file lost an iteration is reported."""
    import json

    import pytest

    from training.rl.config import PPOConfig

    run = tiny_run["rl_dir"]
    broken = tmp_path / "rl"
    broken.mkdir()
    for item in run.iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    records = json.loads((broken / "train_metrics.json").read_text())
    (broken / "train_metrics.json").write_text(json.dumps(records[:-1]))
    config = PPOConfig(
        sft_checkpoint=str(tiny_run["sft"]), out_dir=str(broken), num_iterations=2, eval_every=1, save_every=1
    )
    with pytest.raises(test_ppo_delta_smoke.SmokeFailure):
        test_ppo_delta_smoke.check_run_files(broken, config)
