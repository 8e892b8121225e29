"""The residual PPO loop: collect a rollout, compute advantages, update the heads, log, evaluate.

Reads top to bottom like CleanRL's ``ppo_continuous_action.py``; the pieces live next door:
``policy.py`` (heads and distribution), ``buffer.py`` (storage and GAE), ``ppo.py`` (the update),
``checkpoint.py`` (files), ``eval/closed_loop.py`` (deterministic evaluation).
"""

from __future__ import annotations

import dataclasses
import platform
import time
from pathlib import Path
from typing import Any

import torch
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from eval.closed_loop import run_closed_loop
from eval.metrics import summarise
from training.common.device import resolve_device, set_cpu_threads
from training.common.errors import UserError
from training.common.io import atomic_write_json, ensure_writable_dir, file_sha256, load_checkpoint, read_json
from training.envs.registry import make_env
from training.rl.buffer import RolloutBuffer
from training.rl.checkpoint import build_policy, load_rl_checkpoint, save_rl_checkpoint
from training.rl.config import PPOConfig
from training.rl.env_interface import BatchedWaypointEnv, Observation, StepResult
from training.rl.policy import PPOPolicy
from training.rl.ppo import ppo_update
from training.sft.model import SFT_CHECKPOINT_KIND, model_from_checkpoint

RUN_FILES = ("config.json", "train_metrics.json", "eval_metrics.json", "final.pt")
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


# ---------------------------------------------------------------------------------------- set-up
def prepare_out_dir(config: PPOConfig) -> Path:
    """Create ``--out-dir``; refuse to overwrite a run there unless ``--overwrite`` or ``--resume``."""
    out_dir = Path(config.out_dir)
    existing = [name for name in RUN_FILES if (out_dir / name).exists()]
    existing += [p.name for p in out_dir.glob("checkpoint_iter_*.pt")] if out_dir.is_dir() else []
    if existing and not (config.overwrite or config.resume):
        raise UserError(
            f"{out_dir} already holds a run ({existing[0]}); "
            "pass --resume to continue it or --overwrite to replace it"
        )
    ensure_writable_dir(out_dir)
    for leftover in out_dir.glob(".*.tmp"):  # an atomic write interrupted by a crash
        leftover.unlink()
    if config.overwrite:
        for name in existing:
            (out_dir / name).unlink(missing_ok=True)
        for events in out_dir.glob("events.out.tfevents.*"):
            events.unlink()
    return out_dir


def latest_checkpoint(out_dir: Path) -> Path | None:
    """The checkpoint a resumed run continues from: ``final.pt``, else the highest iteration."""
    if (out_dir / "final.pt").is_file():
        return out_dir / "final.pt"
    numbered = []
    for path in out_dir.glob("checkpoint_iter_*.pt"):
        suffix = path.stem.removeprefix("checkpoint_iter_")
        if suffix.isdigit():
            numbered.append((int(suffix), path))
    return max(numbered)[1] if numbered else None


def check_spec_matches(env: BatchedWaypointEnv, sft_checkpoint: dict[str, Any], path: str) -> None:
    """The SFT model must read this environment's observations and emit its waypoint count."""
    spec = sft_checkpoint.get("env_spec", {})
    checks = (
        ("BEV shape", list(spec.get("bev_shape", [])), list(env.spec.bev_shape)),
        ("ego state size", spec.get("state_dim"), env.spec.state_dim),
        ("waypoint count", spec.get("num_waypoints"), env.spec.num_waypoints),
    )
    for what, model_value, env_value in checks:
        if model_value != env_value:
            raise UserError(
                f"SFT checkpoint {path} was trained for {what} {model_value}, the environment has {env_value}"
            )


def package_versions() -> dict[str, str]:
    import gymnasium
    import numpy

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "gymnasium": gymnasium.__version__,
    }


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
        count = self.count.item()
        nonfinite = int(self.nonfinite.item())
        if count == 0:
            nan = float("nan")
            return {
                "nonfinite_inputs": nonfinite,
                "episodes": 0,
                "episode_return": nan,
                "route_completion": nan,
                "collision_rate": nan,
                "off_road_rate": nan,
            }
        return {
            "nonfinite_inputs": nonfinite,
            "episodes": int(count),
            "episode_return": self.ret.item() / count,
            "route_completion": self.route_completion.item() / count,
            "collision_rate": self.collision.item() / count,
            "off_road_rate": self.off_road.item() / count,
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
# Resuming a world without state_dict() re-seeds it from here on within the run's seed range.
RESEED_OFFSET = 500_000
# Settings that may differ between a run and its resumption (they do not change the numbers).
_RESUME_FREE = {"resume", "overwrite", "progress", "num_threads", "device"}


@dataclasses.dataclass
class Run:
    """Everything a training run holds; :meth:`state` is what a checkpoint saves to resume it."""

    config: PPOConfig
    policy: PPOPolicy
    optimizer: torch.optim.Optimizer
    env: BatchedWaypointEnv
    eval_env: BatchedWaypointEnv
    buffer: RolloutBuffer
    sample_gen: torch.Generator
    batch_gen: torch.Generator
    out_dir: Path
    info: dict[str, Any]
    obs: Observation | None = None
    iteration: int = 0
    env_steps: int = 0
    bad_iterations: int = 0
    train_records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    eval_records: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    def state(self) -> dict[str, Any]:
        return {
            "iteration": self.iteration,
            "env_steps": self.env_steps,
            "bad_iterations": self.bad_iterations,
            "optimizer": self.optimizer.state_dict(),
            "rng": {
                "sample": self.sample_gen.get_state(),
                "batch": self.batch_gen.get_state(),
                "torch": torch.get_rng_state(),
            },
            # Worlds that can save their state (the toy world) resume exactly; others are re-seeded.
            "world": self.env.state_dict() if hasattr(self.env, "state_dict") else None,
        }

    def save(self, name: str) -> None:
        save_rl_checkpoint(self.out_dir / name, self.policy, self.info, **self.state())


def build_run(config: PPOConfig) -> Run:
    """Load the SFT model, build worlds, policy, optimiser and buffer (nothing written yet but the folder)."""
    set_cpu_threads(config.num_threads)
    device = resolve_device(config.device)
    sft_raw = load_checkpoint(config.sft_checkpoint, expected_kind=SFT_CHECKPOINT_KIND)
    sft_model = model_from_checkpoint(sft_raw, source=config.sft_checkpoint).to(device)
    env = make_env(config.env, config.num_envs, device, config.difficulty)
    check_spec_matches(env, sft_raw, config.sft_checkpoint)
    out_dir = prepare_out_dir(config)

    torch.manual_seed(config.seed)
    policy = build_policy(sft_model, dataclasses.asdict(config)).to(device)
    policy.train()
    return Run(
        config=config,
        policy=policy,
        optimizer=torch.optim.Adam(policy.trainable_parameters(), lr=config.lr, eps=1e-5),
        env=env,
        eval_env=make_env(config.env, config.eval_episodes, device, config.difficulty),
        buffer=RolloutBuffer(
            config.rollout_steps,
            config.num_envs,
            sft_model.feature_dim,
            sft_model.num_waypoints,
            device=device,
        ),
        sample_gen=torch.Generator(device=device).manual_seed(config.seed),
        batch_gen=torch.Generator(device=device).manual_seed(config.seed + 1),
        out_dir=out_dir,
        info={
            "config": dataclasses.asdict(config),
            "sft_checkpoint": str(config.sft_checkpoint),
            "sft_sha256": file_sha256(config.sft_checkpoint),
        },
    )


def start_fresh(run: Run) -> None:
    """Write ``config.json``, evaluate the SFT baseline (iteration 0) and reset the worlds."""
    config = run.config
    atomic_write_json(
        run.out_dir / "config.json",
        {
            **dataclasses.asdict(config),
            "sft_sha256": run.info["sft_sha256"],
            "resolved_device": str(run.env.device),
            "env_spec": run.env.spec.to_dict(),
            "versions": package_versions(),
        },
    )
    for stale in ("train_metrics.json", "eval_metrics.json"):
        (run.out_dir / stale).unlink(missing_ok=True)
    run.eval_records = [evaluate(run.policy, run.eval_env, config, 0, 0)]
    atomic_write_json(run.out_dir / "eval_metrics.json", run.eval_records)
    run.obs = run.env.reset(seed=config.train_seed_start)


def resume_from(run: Run, path: Path) -> None:
    """Restore the run saved in ``path``; metrics files keep each iteration up to it exactly once."""
    checkpoint = load_rl_checkpoint(path)
    saved = {k: v for k, v in checkpoint["config"].items() if k not in _RESUME_FREE}
    current = {k: v for k, v in dataclasses.asdict(run.config).items() if k not in _RESUME_FREE}
    changed = sorted(k for k in current if saved.get(k) != current[k])
    if changed:
        raise UserError(
            f"--resume: the run in {run.out_dir} was started with other settings ({', '.join(changed)})"
        )
    if checkpoint["sft_sha256"] != run.info["sft_sha256"]:
        raise UserError(
            f"--resume: {run.config.sft_checkpoint} is not the SFT checkpoint this run started from"
        )
    device = run.env.device
    run.policy.load_heads_state_dict({k: v.to(device) for k, v in checkpoint["heads"].items()})
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.sample_gen.set_state(checkpoint["rng"]["sample"])
    run.batch_gen.set_state(checkpoint["rng"]["batch"])
    torch.set_rng_state(checkpoint["rng"]["torch"])
    run.iteration, run.env_steps = checkpoint["iteration"], checkpoint["env_steps"]
    if checkpoint["world"] is not None:
        run.obs = run.env.load_state_dict(checkpoint["world"])
    else:  # a clean re-seed on fresh training scenarios of this run
        run.obs = run.env.reset(
            seed=run.config.train_seed_start + RESEED_OFFSET + run.iteration * run.config.num_envs
        )
    run.bad_iterations = checkpoint["bad_iterations"]
    run.train_records = _records_up_to(run.out_dir / "train_metrics.json", run.iteration)
    run.eval_records = _records_up_to(run.out_dir / "eval_metrics.json", run.iteration)
    atomic_write_json(run.out_dir / "train_metrics.json", run.train_records)
    atomic_write_json(run.out_dir / "eval_metrics.json", run.eval_records)


def _records_up_to(path: Path, iteration: int) -> list[dict[str, Any]]:
    try:
        records = read_json(path)
    except UserError:
        return []
    return [r for r in records if isinstance(r, dict) and r.get("iteration", -1) <= iteration]


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
