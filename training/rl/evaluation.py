"""The in-training evaluation: the deterministic policy on the fixed held-out development scenarios.

Iteration 0 evaluates the SFT policy itself (the residual starts at 0); every ``--eval-every``
iterations and the last one evaluate the current heads. The records feed ``eval_metrics.json`` and
the selection of ``final.pt`` (``selection.py``).
"""

from __future__ import annotations

from typing import Any

from eval.closed_loop import run_closed_loop
from eval.metrics import summarise
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


def evaluate(
    policy: PPOPolicy,
    envs: dict[str, BatchedWaypointEnv],
    config: PPOConfig,
    iteration: int,
    env_steps: int,
) -> dict[str, Any]:
    """One evaluation record; for a mix, the mean over environments plus ``<env>/<metric>`` keys."""
    with policy.deployed():  # full scale and bound, exactly as final.pt will drive
        per_env = {name: evaluate_env(policy, env, config) for name, env in envs.items()}
    record: dict[str, Any] = {"iteration": iteration, "env_steps": env_steps}
    for key in EVAL_METRICS:
        record[key] = sum(metrics[key] for metrics, _, _ in per_env.values()) / len(per_env)
    record["episodes"] = sum(count for _, count, _ in per_env.values())
    record["wall_time_s"] = sum(wall for _, _, wall in per_env.values())
    if len(per_env) > 1:
        for name, (metrics, _, _) in per_env.items():
            record |= {f"{name}/{key}": value for key, value in metrics.items()}
    return record


def evaluate_env(
    policy: PPOPolicy, env: BatchedWaypointEnv, config: PPOConfig
) -> tuple[dict[str, float], int, float]:
    """Deterministic closed-loop metrics on the fixed held-out scenarios of one environment."""
    result = run_closed_loop(
        env,
        lambda obs: policy.deterministic_waypoints(obs.bev, obs.state),
        seed=config.eval_seed,
        num_episodes=config.eval_episodes,
    )
    summary = summarise(result.episodes)
    return (
        {key: summary.get(key, float("nan")) for key in EVAL_METRICS},
        len(result.episodes),
        result.wall_time_s,
    )
