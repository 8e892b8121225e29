"""Non-finite rewards or observations: the update is skipped and logged; a streak stops the run."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import training.rl.run as run_module
from training.envs.protocol import StepResult
from training.envs.toy import ToyWaypointEnv
from training.rl.config import PPOConfig
from training.rl.test_ppo_delta_smoke import smoke_config
from training.rl.trainer import TrainingDiverged, train_ppo


class PoisonedRewards:
    """Wraps the training world: rewards become NaN during the given rollouts (1-based)."""

    def __init__(self, env: ToyWaypointEnv, bad_rollouts: set[int], steps_per_rollout: int) -> None:
        self.env, self.bad, self.per_rollout, self.steps = env, bad_rollouts, steps_per_rollout, 0
        self.num_envs, self.device, self.spec = env.num_envs, env.device, env.spec

    def __getattr__(self, name: str):
        return getattr(self.env, name)

    def step(self, waypoints: torch.Tensor) -> StepResult:
        result = self.env.step(waypoints)
        rollout = self.steps // self.per_rollout + 1
        self.steps += 1
        if rollout in self.bad:
            result = result._replace(reward=torch.full_like(result.reward, float("nan")))
        return result


def _config(sft: Path, out_dir: Path, iterations: int) -> PPOConfig:
    return dataclasses.replace(
        smoke_config(sft, out_dir),
        num_iterations=iterations,
        update_epochs=1,
        eval_every=0,
        eval_episodes=2,
        save_every=1,
        critic_warmup_iterations=0,
        max_bad_iterations=2,
    )


def _poison(monkeypatch: pytest.MonkeyPatch, bad: set[int]) -> None:
    """Poison the training world's rewards at the given policy steps (the evaluation worlds stay clean)."""
    real_make_env_mix = run_module.make_env_mix
    monkeypatch.setattr(
        run_module,
        "make_env_mix",
        lambda *args, **kwargs: PoisonedRewards(real_make_env_mix(*args, **kwargs), bad, 8),
    )


def test_a_poisoned_rollout_skips_its_update_and_the_run_goes_on(tiny_run, tmp_path, monkeypatch) -> None:
    _poison(monkeypatch, {2})
    train_ppo(_config(tiny_run["sft"], tmp_path, iterations=3))
    records = json.loads((tmp_path / "train_metrics.json").read_text())
    assert [r["update_skipped"] for r in records] == [False, True, False]
    assert records[1]["nonfinite_inputs"] == 4 * 8
    # The skipped iteration left the heads as they were after iteration 1.
    after_1 = torch.load(tmp_path / "checkpoint_iter_1.pt", weights_only=True)["heads"]
    after_2 = torch.load(tmp_path / "checkpoint_iter_2.pt", weights_only=True)["heads"]
    assert all(torch.equal(after_1[k], after_2[k]) for k in after_1)
    assert all(torch.isfinite(v).all() for v in after_2.values())


def test_a_streak_of_poisoned_rollouts_stops_the_run_keeping_the_good_checkpoint(
    tiny_run, tmp_path, monkeypatch
) -> None:
    _poison(monkeypatch, {2, 3, 4})
    with pytest.raises(TrainingDiverged, match="2 updates in a row"):
        train_ppo(_config(tiny_run["sft"], tmp_path, iterations=5))
    assert (tmp_path / "checkpoint_iter_1.pt").is_file()
    assert not (tmp_path / "final.pt").exists()
    records = json.loads((tmp_path / "train_metrics.json").read_text())
    assert [r["iteration"] for r in records] == [1, 2, 3]


def test_a_run_that_diverges_before_its_first_checkpoint_says_none_was_kept(
    tiny_run, tmp_path, monkeypatch
) -> None:
    _poison(monkeypatch, {1, 2})
    config = dataclasses.replace(_config(tiny_run["sft"], tmp_path, iterations=5), save_every=0)
    with pytest.raises(TrainingDiverged, match="no checkpoint was written yet"):
        train_ppo(config)
    assert not list(tmp_path.glob("*.pt"))
