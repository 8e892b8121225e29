"""KL to the SFT policy (fixed and adaptive), progressive exploration and the curriculum."""

from __future__ import annotations

import dataclasses
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from eval.closed_loop import run_closed_loop
from eval.metrics import summarise
from tests.rl.conftest import policy_settings
from training.common.errors import UserError
from training.envs.registry import make_env
from training.envs.toy import ToyWaypointEnv, ToyWorldConfig
from training.rl.checkpoint import load_rl_policy
from training.rl.config import PPOConfig
from training.rl.curriculum import Curriculum, curriculum_levels
from training.rl.policy import FULL_EXPLORATION, Exploration, PPOPolicy
from training.rl.test_ppo_delta_smoke import smoke_config
from training.rl.trainer import adapt_kl_coef, exploration_scale, train_ppo
from training.sft.model import load_sft_model


def _config(sft: Path, out_dir: Path, **overrides) -> PPOConfig:
    base = dataclasses.replace(
        smoke_config(sft, out_dir), num_iterations=4, eval_every=0, save_every=0, critic_warmup_iterations=0
    )
    return dataclasses.replace(base, **overrides)


def _records(out_dir: Path) -> list[dict]:
    return json.loads((out_dir / "train_metrics.json").read_text())


# ------------------------------------------------------------------------------------ KL to SFT
def test_kl_to_sft_is_the_gaussian_kl_and_zero_at_the_start_at_any_exploration_scale(tiny_run) -> None:
    sft = load_sft_model(tiny_run["sft"])
    policy = PPOPolicy(
        sft, policy_settings(max_delta=2.0, init_log_std=-2.0, std_horizon_exponent=1.0, hidden_size=256)
    )
    zero = torch.zeros(3, policy.num_waypoints, 2)
    mean = torch.randn(3, policy.num_waypoints, 2, generator=torch.Generator().manual_seed(0)) * 0.3
    with torch.no_grad():
        policy.log_std.add_(0.4)  # the policy's noise has grown since the start
    for scale in (1.0, 0.2):
        policy.exploration = Exploration(scale)
        expected = kl_divergence(Normal(mean, policy.std()), Normal(0.0, policy.reference_std()))
        torch.testing.assert_close(policy.kl_to_sft(mean), expected.sum(dim=(-2, -1)))
    with torch.no_grad():
        policy.log_std.sub_(0.4)
    for scale in (1.0, 0.2):  # at the starting std the reference is the policy, at any noise scale
        policy.exploration = Exploration(scale)
        torch.testing.assert_close(policy.kl_to_sft(zero), torch.zeros(3), atol=1e-6, rtol=0)


def test_with_an_exploration_warmup_the_measured_kl_stays_small(tiny_run, tmp_path: Path) -> None:
    """Review fix: the reference ignored the noise scale, so the KL read ~18 nats at scale 0.2 and
    the adaptive coefficient doubled every iteration."""
    config = _config(tiny_run["sft"], tmp_path, exploration_warmup_iterations=4, kl_coef=1.0, kl_target=0.2)
    train_ppo(config)
    records = _records(tmp_path)
    assert max(r["kl_to_sft"] for r in records) < 2.0
    assert [r["kl_coef"] for r in records] != [1.0, 2.0, 4.0, 8.0]


def test_the_kl_coefficient_is_not_adapted_during_the_critic_warmup(tiny_run, tmp_path: Path) -> None:
    """The KL is exactly 0 while only the critic learns; adapting then would halve the coefficient."""
    config = _config(tiny_run["sft"], tmp_path, critic_warmup_iterations=2, kl_coef=1.0, kl_target=0.2)
    train_ppo(config)
    records = _records(tmp_path)
    assert [r["kl_coef"] for r in records[:3]] == [1.0, 1.0, 1.0]
    assert records[0]["kl_to_sft"] == pytest.approx(0.0, abs=1e-6)


@pytest.mark.parametrize(
    ("measured", "expected"), [(0.16, 0.2), (0.15, 0.1), (0.1, 0.1), (0.067, 0.1), (0.06, 0.05)]
)
def test_adaptive_kl_coefficient_follows_the_ppo_penalty_rule(measured: float, expected: float) -> None:
    """Target 0.1: double above 0.15, halve below 0.0667, keep in between."""
    assert adapt_kl_coef(0.1, measured, kl_target=0.1) == pytest.approx(expected)


def test_every_record_has_kl_to_sft_and_delta_norm_and_a_kl_penalty_keeps_the_policy_closer(
    tiny_run, tmp_path: Path
) -> None:
    free = tmp_path / "free"
    train_ppo(_config(tiny_run["sft"], free, lr=3e-3, kl_coef=0.0, kl_target=None))
    held = tmp_path / "held"
    train_ppo(_config(tiny_run["sft"], held, lr=3e-3, kl_coef=5.0, kl_target=None))
    free_records, held_records = _records(free), _records(held)
    for record in free_records + held_records:
        assert record["kl_to_sft"] >= 0 and record["delta_norm"] >= 0
        assert "kl_coef" in record
    assert free_records[-1]["kl_to_sft"] > 0
    assert held_records[-1]["kl_to_sft"] < free_records[-1]["kl_to_sft"]
    assert held_records[-1]["delta_norm"] < free_records[-1]["delta_norm"]


def test_adaptive_mode_steers_the_coefficient_by_the_measured_kl(tiny_run, tmp_path: Path) -> None:
    target = 1e-4
    train_ppo(_config(tiny_run["sft"], tmp_path, lr=3e-3, kl_coef=0.5, kl_target=target))
    records = _records(tmp_path)
    assert records[0]["kl_coef"] == 0.5
    for before, after in itertools.pairwise(records):
        assert after["kl_coef"] == pytest.approx(
            adapt_kl_coef(before["kl_coef"], before["kl_to_sft"], target)
        )
    assert records[-1]["kl_coef"] > 0.5  # the KL overshot the tiny target, so the penalty grew


def test_kl_target_needs_a_starting_coefficient(tiny_run, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--kl-coef"):
        _config(tiny_run["sft"], tmp_path, kl_coef=0.0, kl_target=0.1).validate()


# -------------------------------------------------------------------------- progressive exploration
def test_exploration_grows_linearly_to_full_scale(tiny_run, tmp_path: Path) -> None:
    config = _config(tiny_run["sft"], tmp_path, exploration_warmup_iterations=4, exploration_start_scale=0.2)
    assert [exploration_scale(config, i) for i in (1, 3, 5, 9)] == pytest.approx([0.2, 0.6, 1.0, 1.0])
    assert exploration_scale(dataclasses.replace(config, exploration_warmup_iterations=0), 1) == 1.0


def test_the_exploration_scale_multiplies_the_noise_and_clips_the_applied_delta(tiny_run) -> None:
    policy = PPOPolicy(
        load_sft_model(tiny_run["sft"]), policy_settings(max_delta=2.0, init_log_std=-2.0, hidden_size=256)
    )
    with torch.no_grad():  # a trained head, so that the mean residual is not 0
        policy.delta_head.net[-1].bias.fill_(3.0)
    z = torch.randn(2, policy.delta_head.net[0].in_features - 2 * policy.num_waypoints)
    sft_plan = torch.zeros(2, policy.num_waypoints, 2)
    full_std, mean = policy.std().clone(), policy.delta_head(z, sft_plan)
    policy.exploration = Exploration(0.25, 0.5)
    torch.testing.assert_close(policy.std(), 0.25 * full_std)
    # review fix: the schedule clips what a rollout applies; it never rescales the mean
    torch.testing.assert_close(policy.delta_head(z, sft_plan), mean)
    applied = policy.final_waypoints(sft_plan, torch.full_like(sft_plan, 5.0))
    assert applied.max().item() == pytest.approx(1.0)  # half of max_delta
    with policy.deployed():  # evaluation drives as a loaded final.pt: full bound
        assert policy.final_waypoints(sft_plan, torch.full_like(sft_plan, 5.0)).max().item() == 2.0
    assert policy.action_bound == pytest.approx(1.0)  # the schedule is restored after
    policy.exploration = FULL_EXPLORATION
    assert policy.final_waypoints(sft_plan, torch.full_like(sft_plan, 5.0)).max().item() == pytest.approx(2.0)
    assert "exploration" not in " ".join(policy.heads_state_dict())  # not saved: a schedule sets it


def test_a_bound_warmup_as_long_as_the_run_evaluates_what_final_pt_reloads(tiny_run, tmp_path: Path) -> None:
    config = _config(
        tiny_run["sft"],
        tmp_path,
        num_iterations=2,
        exploration_warmup_iterations=2,
        warmup_bound=True,
        exploration_start_scale=0.05,
        select_policy=False,
    )
    train_ppo(config)
    last_eval = json.loads((tmp_path / "eval_metrics.json").read_text())[-1]
    policy, _ = load_rl_policy(tmp_path / "final.pt", tiny_run["sft"])
    env = make_env("toy", config.eval_episodes, "cpu", difficulty=config.difficulty)
    replay = run_closed_loop(
        env,
        lambda obs: policy.deterministic_waypoints(obs.bev, obs.state),
        config.eval_seed,
        config.eval_episodes,
    )
    assert last_eval["ade"] == pytest.approx(summarise(replay.episodes)["ade"])


def test_a_warmup_run_logs_its_growing_scale(tiny_run, tmp_path: Path) -> None:
    train_ppo(_config(tiny_run["sft"], tmp_path, exploration_warmup_iterations=3, warmup_bound=True))
    scales = [r["exploration_scale"] for r in _records(tmp_path)]
    assert scales == pytest.approx([0.2, 0.2 + 0.8 / 3, 0.2 + 1.6 / 3, 1.0])


# ----------------------------------------------------------------------------------- curriculum
def test_curriculum_levels_climb_to_the_target() -> None:
    assert curriculum_levels(0.0, 0.25, 1.0) == pytest.approx([0.0, 0.25, 0.5, 0.75, 1.0])
    assert curriculum_levels(0.3, 0.25, 0.5) == pytest.approx([0.3, 0.5])
    assert curriculum_levels(0.5, 0.25, 0.5) == pytest.approx([0.5])


def test_a_level_rises_only_after_enough_successful_episodes() -> None:
    curriculum = Curriculum([0.0, 0.5, 1.0], threshold=0.8, min_episodes=10)
    assert not curriculum.record(episodes=9, successes=9)  # too few episodes yet
    assert curriculum.record(episodes=1, successes=1)  # 10 episodes, 100% success
    assert (curriculum.level, curriculum.episodes, curriculum.successes) == (1, 0, 0)
    assert not curriculum.record(episodes=10, successes=7)  # 70% < 80%: the window is dropped
    assert curriculum.episodes == 0
    assert not curriculum.record(episodes=5, successes=5)  # a new window, not full yet
    assert curriculum.record(episodes=5, successes=3)  # 8 / 10 = 80%, judged without the 7 / 10
    assert curriculum.at_top and not curriculum.record(100, 100)
    restored = Curriculum([0.0, 0.5, 1.0], 0.8, 10)
    restored.load_state_dict(curriculum.state_dict())
    assert restored.difficulty == 1.0


def test_set_difficulty_gives_the_same_scenarios_as_a_world_built_at_that_level() -> None:
    raised = ToyWaypointEnv(ToyWorldConfig(num_envs=3, difficulty=0.0))
    raised.set_difficulty(0.9)
    built = ToyWaypointEnv(ToyWorldConfig(num_envs=3, difficulty=0.9))
    assert torch.equal(raised.reset(seed=7).bev, built.reset(seed=7).bev)
    easy = ToyWaypointEnv(ToyWorldConfig(num_envs=3, difficulty=0.0))
    assert not torch.equal(built.reset(seed=7).bev, easy.reset(seed=7).bev)


class _EveryEpisodeSucceeds:
    """A world whose finished episodes all count as goals, and that records its difficulty."""

    def __init__(self, env) -> None:
        self._env = env
        self.difficulties = [env.difficulty]

    def step(self, waypoints):
        result = self._env.step(waypoints)
        result.info.episode.goal_reached = result.info.episode.done.clone()
        return result

    def set_difficulty(self, difficulty: float) -> bool:
        self.difficulties.append(difficulty)
        return self._env.set_difficulty(difficulty)

    def __getattr__(self, name: str):
        return getattr(self._env, name)


def test_a_curriculum_run_raises_its_level_on_success_and_logs_it(
    tiny_run, tmp_path: Path, monkeypatch
) -> None:
    import training.rl.run as run_module

    worlds = []
    real_make_env_mix = run_module.make_env_mix

    def make_env_mix(*args, **kwargs):
        worlds.append(_EveryEpisodeSucceeds(real_make_env_mix(*args, **kwargs)))
        return worlds[-1]

    monkeypatch.setattr(run_module, "make_env_mix", make_env_mix)
    config = _config(
        tiny_run["sft"],
        tmp_path,
        curriculum=True,
        curriculum_start=0.0,
        curriculum_step=0.5,
        difficulty=1.0,
        curriculum_min_episodes=4,
        num_iterations=6,
        rollout_steps=20,
    )
    train_ppo(config)
    records = _records(tmp_path)
    levels = [r["curriculum_level"] for r in records]
    assert levels[0] == 0 and levels == sorted(levels) and levels[-1] == 2
    assert [r["difficulty"] for r in records] == pytest.approx([[0.0, 0.5, 1.0][level] for level in levels])
    # the world was built at --difficulty 1.0, set to the first level, then raised twice
    assert worlds[0].difficulties == pytest.approx([1.0, 0.0, 0.5, 1.0])


class _EveryOtherEpisodeSucceeds(_EveryEpisodeSucceeds):
    """Exactly every second finished episode counts as a goal: a success rate of about 0.5."""

    def __init__(self, env) -> None:
        super().__init__(env)
        self.finished = 0

    def step(self, waypoints):
        result = self._env.step(waypoints)
        done = result.info.episode.done
        index = self.finished + torch.cumsum(done.long(), dim=0)  # 1-based over finished episodes
        result.info.episode.goal_reached = done & (index % 2 == 0)
        self.finished += int(done.sum())
        return result


@pytest.mark.parametrize(("threshold", "rises"), [(0.8, False), (0.3, True)])
def test_a_level_rises_only_when_the_success_rate_passes_the_threshold(
    tiny_run, tmp_path: Path, monkeypatch, threshold: float, rises: bool
) -> None:
    import training.rl.run as run_module

    real_make_env_mix = run_module.make_env_mix
    worlds = []

    def make_env_mix(*args, **kwargs):
        worlds.append(_EveryOtherEpisodeSucceeds(real_make_env_mix(*args, **kwargs)))
        return worlds[-1]

    monkeypatch.setattr(run_module, "make_env_mix", make_env_mix)
    config = _config(
        tiny_run["sft"],
        tmp_path,
        curriculum=True,
        curriculum_step=0.5,
        difficulty=1.0,
        curriculum_min_episodes=4,
        curriculum_threshold=threshold,
        num_iterations=6,
        rollout_steps=20,
    )
    train_ppo(config)
    assert worlds[0].finished >= 8  # episodes did end, so the level was judged
    levels = {r["curriculum_level"] for r in _records(tmp_path)}
    assert (max(levels) > 0) == rises


def test_curriculum_start_above_the_target_is_rejected(tiny_run, tmp_path: Path) -> None:
    with pytest.raises(UserError, match="--curriculum-start"):
        _config(tiny_run["sft"], tmp_path, curriculum=True, curriculum_start=0.8, difficulty=0.5).validate()


def test_fewer_evaluation_worlds_play_every_held_out_episode(tiny_run, tmp_path: Path) -> None:
    """Simulators with a process or server per world evaluate on a few worlds, one episode after another."""
    one = tmp_path / "one_world"
    train_ppo(_config(tiny_run["sft"], one, num_iterations=1, eval_episodes=3, eval_worlds=1))
    many = tmp_path / "three_worlds"
    train_ppo(_config(tiny_run["sft"], many, num_iterations=1, eval_episodes=3))
    chunked, batched = (json.loads((d / "eval_metrics.json").read_text()) for d in (one, many))
    assert [r["episodes"] for r in chunked] == [3, 3]
    # the same scenarios: equal up to float differences between batch sizes in the networks
    for a, b in zip(chunked, batched, strict=True):
        assert {k: a[k] for k in ("ade", "route_completion", "episode_return")} == pytest.approx(
            {k: b[k] for k in ("ade", "route_completion", "episode_return")}, rel=0.01
        )


def test_a_resumed_curriculum_and_adaptive_kl_continue_exactly(tiny_run, tmp_path: Path, monkeypatch) -> None:
    """The level, its window and the KL coefficient are checkpointed: resuming from a middle
    checkpoint gives the same records and heads as the uninterrupted run."""
    import training.rl.run as run_module
    from training.rl.checkpoint import load_rl_checkpoint

    real_make_env_mix = run_module.make_env_mix
    monkeypatch.setattr(
        run_module, "make_env_mix", lambda *a, **k: _EveryEpisodeSucceeds(real_make_env_mix(*a, **k))
    )
    settings = dict(
        curriculum=True,
        curriculum_step=0.5,
        difficulty=1.0,
        curriculum_min_episodes=4,
        num_iterations=6,
        rollout_steps=20,
        save_every=1,
        kl_coef=0.5,
        kl_target=0.001,  # far below the measured KL: the coefficient doubles every iteration
    )
    whole, split = tmp_path / "whole", tmp_path / "split"
    train_ppo(_config(tiny_run["sft"], whole, **settings))
    train_ppo(_config(tiny_run["sft"], split, **settings))
    for name in ("final.pt", "checkpoint_iter_4.pt", "checkpoint_iter_5.pt", "checkpoint_iter_6.pt"):
        (split / name).unlink()
    train_ppo(_config(tiny_run["sft"], split, resume=True, **settings))

    keys = ("curriculum_level", "difficulty", "kl_coef", "kl_to_sft", "episodes", "goals")
    assert [{k: r[k] for k in keys} for r in _records(split)] == [
        {k: r[k] for k in keys} for r in _records(whole)
    ]
    assert len({r["curriculum_level"] for r in _records(whole)}) > 1  # the level did rise along the way
    heads = [load_rl_checkpoint(d / "final.pt")["heads"] for d in (whole, split)]
    for name, tensor in heads[0].items():
        assert torch.equal(tensor, heads[1][name]), name
