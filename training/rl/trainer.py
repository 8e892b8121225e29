"""The residual PPO loop: collect a rollout, compute advantages, update the heads, log, evaluate.

Reads top to bottom like CleanRL's ``ppo_continuous_action.py``; the pieces live next door:
``policy.py`` (heads and distribution), ``buffer.py`` (storage and GAE), ``ppo.py`` (the update),
``run.py`` (the run's state, files, checkpoints and resuming), ``eval/closed_loop.py``
(deterministic evaluation).
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from eval.closed_loop import run_closed_loop
from eval.metrics import summarise
from training.common.errors import UserError
from training.common.io import atomic_write_json
from training.rl.buffer import RolloutBuffer
from training.rl.config import PPOConfig
from training.rl.env_interface import BatchedWaypointEnv, Observation, StepResult
from training.rl.policy import PPOPolicy
from training.rl.ppo import ppo_update
from training.rl.run import Run, build_run, latest_checkpoint, resume_from, write_run_config

# What every evaluation record holds besides iteration and env_steps (means over the held-out episodes).
EVAL_METRICS = (
    "ade",
    "fde",
    "episode_return",
    "route_completion",
    "collision_rate",
    "off_road_rate",
    "goal_rate",
    "mean_abs_lateral_m",
)


# ---------------------------------------------------------------------------------------- rollout
@dataclasses.dataclass
class EpisodeTally:
    """Statistics of the training episodes that ended during one rollout (device tensors)."""

    count: torch.Tensor
    ret: torch.Tensor
    route_completion: torch.Tensor
    collision: torch.Tensor
    off_road: torch.Tensor
    nonfinite: torch.Tensor  # non-finite reward or observation entries seen

    @classmethod
    def zeros(cls, device: torch.device) -> EpisodeTally:
        return cls(*(torch.zeros((), device=device) for _ in range(6)))

    def add(self, result: StepResult) -> None:
        ep = result.info.episode
        done = ep.done.float()
        self.count += done.sum()
        self.ret += (done * ep.episode_return).sum()
        self.route_completion += (done * ep.route_completion).sum()
        self.collision += (done * ep.collision.float()).sum()
        self.off_road += (done * ep.off_road.float()).sum()

    def means(self) -> dict[str, float]:
        """Read once per iteration; NaN when no episode ended."""
        count = int(self.count.item())
        per_episode = (lambda total: total.item() / count) if count else (lambda total: float("nan"))
        return {
            "nonfinite_inputs": int(self.nonfinite.item()),
            "episodes": count,
            "episode_return": per_episode(self.ret),
            "route_completion": per_episode(self.route_completion),
            "collision_rate": per_episode(self.collision),
            "off_road_rate": per_episode(self.off_road),
        }


def bootstrap_values(policy: PPOPolicy, result: StepResult, next_value: torch.Tensor) -> torch.Tensor:
    """``V`` of the state after each step: ``V(final_observation)`` where the episode was truncated.

    Terminated steps get no bootstrap in GAE, so their entry does not matter. On the CPU only
    the truncated worlds are encoded again; on CUDA all are (no host synchronisation).
    """
    truncated = result.truncated
    final = result.info.final_observation
    if next_value.device.type == "cpu":
        if not bool(truncated.any()):
            return next_value
        index = truncated.nonzero()[:, 0]
        z, sft = policy.features(final.bev[index], final.state[index])
        values = next_value.clone()
        values[index] = policy.value(z, sft)
        return values
    z, sft = policy.features(final.bev, final.state)
    return torch.where(truncated, policy.value(z, sft), next_value)


@torch.no_grad()
def collect_rollout(
    policy: PPOPolicy,
    env: BatchedWaypointEnv,
    buffer: RolloutBuffer,
    obs: Observation,
    generator: torch.Generator,
    reward_scale: float,
) -> tuple[Observation, EpisodeTally]:
    """Fill ``buffer`` with ``buffer.num_steps`` steps of every world; return the next observation.

    Non-finite rewards and observations are counted in ``tally.nonfinite`` (read once per
    iteration, no per-step host synchronisation); the caller skips the update when any appeared.
    """
    tally = EpisodeTally.zeros(env.device)
    z, sft_waypoints = policy.features(obs.bev, obs.state)
    for step in range(buffer.num_steps):
        delta, log_prob, value = policy.act(z, sft_waypoints, generator=generator)
        result = env.step(policy.final_waypoints(sft_waypoints, delta))
        next_z, next_sft = policy.features(result.obs.bev, result.obs.state)
        next_value = bootstrap_values(policy, result, policy.value(next_z, next_sft))
        buffer.add(
            step,
            z=z,
            sft_waypoints=sft_waypoints,
            delta=delta,
            log_prob=log_prob,
            value=value,
            reward=result.reward * reward_scale,
            terminated=result.terminated,
            truncated=result.truncated,
            next_value=next_value,
        )
        tally.add(result)
        tally.nonfinite += (~torch.isfinite(result.reward)).sum() + (~torch.isfinite(result.obs.state)).sum()
        obs, z, sft_waypoints = result.obs, next_z, next_sft
    return obs, tally


# ---------------------------------------------------------------------------------------- evaluation
def evaluate(
    policy: PPOPolicy, env: BatchedWaypointEnv, config: PPOConfig, iteration: int, env_steps: int
) -> dict[str, Any]:
    """Deterministic closed-loop evaluation on the fixed held-out scenarios."""
    policy.eval()
    result = run_closed_loop(
        env,
        lambda obs: policy.deterministic_waypoints(obs.bev, obs.state),
        seed=config.eval_seed,
        num_episodes=config.eval_episodes,
    )
    policy.train()
    summary = summarise(result.episodes)
    record = {"iteration": iteration, "env_steps": env_steps}
    record |= {key: summary.get(key, float("nan")) for key in EVAL_METRICS}
    record["episodes"] = len(result.episodes)
    record["wall_time_s"] = result.wall_time_s
    return record


# ---------------------------------------------------------------------------------------- the loop
def start_fresh(run: Run) -> None:
    """Write ``config.json``, evaluate the SFT baseline (iteration 0) and reset the worlds."""
    write_run_config(run)
    run.eval_records = [evaluate(run.policy, run.eval_env, run.config, 0, 0)]
    atomic_write_json(run.out_dir / "eval_metrics.json", run.eval_records)
    run.obs = run.env.reset(seed=run.config.train_seed_start)


def train_iteration(run: Run) -> dict[str, Any]:
    """One PPO iteration: rollout, advantages, update (skipped on non-finite inputs), metrics."""
    config, iteration = run.config, run.iteration
    started = time.perf_counter()
    if config.anneal_lr:
        run.optimizer.param_groups[0]["lr"] = config.lr * (1.0 - (iteration - 1) / config.num_iterations)

    # 1. rollout with the current policy
    run.obs, tally = collect_rollout(
        run.policy, run.env, run.buffer, run.obs, run.sample_gen, config.reward_scale
    )
    run.env_steps += config.num_envs * config.rollout_steps
    episodes = tally.means()

    # 2. advantages (GAE; bootstraps through truncation, never through termination)
    stats: dict[str, Any] = {}
    if episodes["nonfinite_inputs"] == 0:
        run.buffer.compute_advantages(config.gamma, config.gae_lambda)
        # 3. PPO epochs on the cached features
        stats = ppo_update(
            run.policy,
            run.optimizer,
            run.buffer,
            update_epochs=config.update_epochs,
            minibatch_size=config.batch_size,
            clip_epsilon=config.clip_epsilon,
            value_coef=config.value_coef,
            entropy_coef=config.entropy_coef,
            max_grad_norm=config.max_grad_norm,
            target_kl=config.target_kl,
            residual_l2_coef=config.residual_l2_coef,
            critic_only=iteration <= config.critic_warmup_iterations,
            generator=run.batch_gen,
        )
    healthy = bool(stats) and stats["minibatch_updates"] > 0
    run.bad_iterations = 0 if healthy else run.bad_iterations + 1

    # 4. the iteration's record
    elapsed = time.perf_counter() - started
    record = {"iteration": iteration, "env_steps": run.env_steps, **stats, **episodes}
    record["update_skipped"] = not healthy
    record["steps_per_s"] = config.num_envs * config.rollout_steps / elapsed
    record["lr"] = run.optimizer.param_groups[0]["lr"]
    record["delta_norm"] = _mean_delta_norm(run.buffer, run.policy)
    return record


def train_ppo(config: PPOConfig) -> dict[str, Any]:
    """Run (or with ``config.resume`` continue) residual PPO; returns the baseline and final evaluations."""
    config.validate()
    run = build_run(config)
    checkpoint = latest_checkpoint(run.out_dir) if config.resume else None
    if checkpoint is None:
        start_fresh(run)
    else:
        resume_from(run, checkpoint)
    writer = SummaryWriter(log_dir=str(run.out_dir), purge_step=run.env_steps if checkpoint else None)
    if checkpoint is None:
        _log_scalars(writer, "eval", run.eval_records[0], 0)

    bar = tqdm(total=config.num_iterations, initial=run.iteration, desc="ppo", disable=not config.progress)
    while run.iteration < config.num_iterations:
        run.iteration += 1
        record = train_iteration(run)
        run.train_records.append(record)
        atomic_write_json(run.out_dir / "train_metrics.json", run.train_records)
        _log_scalars(writer, "train", record, run.env_steps)
        if run.bad_iterations >= config.max_bad_iterations:
            writer.close()
            raise TrainingDiverged(
                f"{run.bad_iterations} updates in a row were skipped for NaN/inf "
                f"(iteration {run.iteration}); "
                f"stopped, the last good checkpoint in {run.out_dir} is kept"
            )
        last = run.iteration == config.num_iterations
        if (config.eval_every and run.iteration % config.eval_every == 0) or last:
            run.eval_records.append(evaluate(run.policy, run.eval_env, config, run.iteration, run.env_steps))
            atomic_write_json(run.out_dir / "eval_metrics.json", run.eval_records)
            _log_scalars(writer, "eval", run.eval_records[-1], run.env_steps)
        if (config.save_every and run.iteration % config.save_every == 0) or last:
            run.save("final.pt" if last else f"checkpoint_iter_{run.iteration}.pt")
            if last and config.save_every and run.iteration % config.save_every == 0:
                run.save(f"checkpoint_iter_{run.iteration}.pt")
        bar.update(1)
        bar.set_postfix(
            steps_s=f"{record['steps_per_s']:.0f}",
            ret=f"{record['episode_return']:.2f}",
            ade=f"{run.eval_records[-1]['ade']:.3f}",
        )
    bar.close()
    writer.close()
    return {
        "out_dir": str(run.out_dir),
        "baseline": run.eval_records[0],
        "final": run.eval_records[-1],
        "policy": run.policy,
    }


class TrainingDiverged(UserError):
    """Updates kept meeting non-finite values; the run stops and keeps its last good checkpoint."""


_TB_GROUPS = {
    "policy_loss": "losses",
    "value_loss": "losses",
    "entropy": "losses",
    "approx_kl": "losses",
    "clip_fraction": "losses",
    "explained_variance": "losses",
    "loss": "losses",
    "grad_norm": "losses",
    "residual_l2": "losses",
    "std": "policy",
    "delta_norm": "policy",
    "lr": "charts",
    "steps_per_s": "charts",
}


def _log_scalars(writer: SummaryWriter, split: str, record: dict[str, Any], step: int) -> None:
    """TensorBoard scalars under the same names as the metrics files (``losses/value_loss`` ...)."""
    for key, value in record.items():
        if key in ("iteration", "env_steps") or not isinstance(value, int | float):
            continue
        group = "eval" if split == "eval" else _TB_GROUPS.get(key, "charts")
        writer.add_scalar(f"{group}/{key}", value, step)


def _mean_delta_norm(buffer: RolloutBuffer, policy: PPOPolicy) -> float:
    """Mean L2 norm (m) of the mean residual per waypoint over the rollout's states."""
    with torch.no_grad():
        z = buffer.z.flatten(0, 1)
        sft = buffer.sft_waypoints.flatten(0, 1)
        return policy.delta_head(z, sft).norm(dim=-1).mean().item()
