"""The in-training evaluation: the deterministic policy on the fixed held-out development scenarios.

Iteration 0 evaluates the SFT policy itself (the residual starts at 0); every ``--eval-every``
iterations and the last one evaluate the current heads. The records feed ``eval_metrics.json`` and
the selection of ``final.pt`` (``selection.py``).

Besides the means over the episodes, every record holds ``ade_shared`` and ``sft_ade_shared``: the
policy's and the SFT policy's ADE over the steps both drove in each scenario (the SFT policy's
per-step errors come from iteration 0's evaluation), which the selection guards instead of the
whole-episode ADE: a policy that drives further meets harder states, and its whole-episode ADE rises
with plans that are no worse (``eval.metrics.add_shared_window_errors``).
"""

from __future__ import annotations

import math
from typing import Any, NamedTuple

import torch
from torch import Tensor

from eval.closed_loop import run_closed_loop
from eval.metrics import mean_shared_window, summarise
from training.envs.protocol import BatchedWaypointEnv
from training.rl.config import PPOConfig
from training.rl.policy import PPOPolicy

# What every evaluation record holds besides iteration and env_steps (means over the held-out episodes).
EVAL_METRICS = (
    "ade",
    "fde",
    "episode_return",
    "route_completion",
    "collision_rate",
    "off_road_rate",
    "failure_rate",
    "goal_rate",
    "mean_abs_lateral_m",
    "mean_abs_jerk",
)


# Measured against the SFT policy's episodes: the policy's value and the SFT policy's, same windows.
SHARED_METRICS = ("ade_shared", "sft_ade_shared")


class EnvEvaluation(NamedTuple):
    """One environment's evaluation: its metrics and the per-step ADE of each of its episodes."""

    metrics: dict[str, float]
    episodes: int
    wall_time_s: float
    step_ade: list[Tensor]  # one float32 series per episode, in scenario-seed order


def evaluate(
    policy: PPOPolicy,
    envs: dict[str, BatchedWaypointEnv],
    config: PPOConfig,
    iteration: int,
    env_steps: int,
    sft_step_ade: dict[str, list[Tensor]] | None = None,
) -> tuple[dict[str, Any], dict[str, list[Tensor]]]:
    """One evaluation record and this policy's per-step ADE series (one per episode) per environment.

    ``sft_step_ade`` is what iteration 0 returned (the SFT policy's); None: this is iteration 0, and
    the shared-window values are measured against the policy's own episodes. An environment missing
    from it (a run resumed from a checkpoint that predates the shared window) gets no shared-window
    values. For a mix, the record holds the mean over environments plus ``<env>/<metric>`` keys.
    """
    with policy.deployed():  # full scale and bound, exactly as final.pt will drive
        per_env = {name: _evaluate_env(policy, env, config) for name, env in envs.items()}
    for name, result in per_env.items():
        sft = result.step_ade if sft_step_ade is None else sft_step_ade.get(name)
        if sft is not None:
            shared = mean_shared_window([a.numpy() for a in result.step_ade], [b.numpy() for b in sft])
            result.metrics.update(zip(SHARED_METRICS, shared, strict=True))
    record: dict[str, Any] = {"iteration": iteration, "env_steps": env_steps}
    for key in (*EVAL_METRICS, *SHARED_METRICS):
        if all(key in result.metrics for result in per_env.values()):
            record[key] = sum(result.metrics[key] for result in per_env.values()) / len(per_env)
    record["episodes"] = sum(result.episodes for result in per_env.values())
    record["wall_time_s"] = sum(result.wall_time_s for result in per_env.values())
    if len(per_env) > 1:
        for name, result in per_env.items():
            record |= {f"{name}/{key}": value for key, value in result.metrics.items()}
    return record, {name: result.step_ade for name, result in per_env.items()}


def _evaluate_env(policy: PPOPolicy, env: BatchedWaypointEnv, config: PPOConfig) -> EnvEvaluation:
    """Deterministic closed-loop metrics on the fixed held-out scenarios of one environment, and
    the per-step ADE series of its episodes."""
    result = run_closed_loop(
        env,
        lambda obs: policy.deterministic_waypoints(obs.bev, obs.state),
        seed=config.eval_seed,
        num_episodes=config.eval_episodes,
    )
    summary = summarise(result.episodes)
    metrics = {key: summary.get(key, math.nan) for key in EVAL_METRICS}
    step_ade = [torch.from_numpy(errors[:, 0]).to(torch.float32) for errors in result.step_errors]
    return EnvEvaluation(metrics, len(result.episodes), result.wall_time_s, step_ade)
