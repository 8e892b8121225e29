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
from typing import Any

import torch
from torch import Tensor

from eval.closed_loop import run_closed_loop
from eval.metrics import shared_window_means, summarise
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
    metrics = {name: results[0] for name, results in per_env.items()}
    step_ade = {name: results[3] for name, results in per_env.items()}
    for name, own in step_ade.items():
        sft = own if sft_step_ade is None else sft_step_ade.get(name)
        if sft is not None:
            metrics[name] |= dict(zip(SHARED_METRICS, shared_window_ade(own, sft), strict=True))
    record: dict[str, Any] = {"iteration": iteration, "env_steps": env_steps}
    for key in (*EVAL_METRICS, *SHARED_METRICS):
        if all(key in values for values in metrics.values()):
            record[key] = sum(values[key] for values in metrics.values()) / len(metrics)
    record["episodes"] = sum(count for _, count, _, _ in per_env.values())
    record["wall_time_s"] = sum(wall for _, _, wall, _ in per_env.values())
    if len(metrics) > 1:
        for name, values in metrics.items():
            record |= {f"{name}/{key}": value for key, value in values.items()}
    return record, step_ade


def _evaluate_env(
    policy: PPOPolicy, env: BatchedWaypointEnv, config: PPOConfig
) -> tuple[dict[str, float], int, float, list[Tensor]]:
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
    return metrics, len(result.episodes), result.wall_time_s, step_ade


def shared_window_ade(own: list[Tensor], sft: list[Tensor]) -> tuple[float, float]:
    """Mean over episodes of the policy's and the SFT policy's ADE over the steps both drove in
    each scenario; both lists hold one per-step ADE series per episode, in scenario-seed order."""
    if len(own) != len(sft):
        raise ValueError(f"{len(own)} episodes against the SFT policy's {len(sft)}")
    pairs = [
        shared_window_means(a[:, None].numpy(), b[:, None].numpy()) for a, b in zip(own, sft, strict=True)
    ]
    return _mean([mine[0] for mine, _ in pairs]), _mean([theirs[0] for _, theirs in pairs])


def _mean(values: list[float]) -> float:
    finite = [float(v) for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan
