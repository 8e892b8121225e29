"""A training run's state and files: the out-dir, ``config.json``, checkpoints, and resuming.

``Run`` holds everything the PPO loop (``trainer.py``) works on; ``Run.state()`` is what a
checkpoint saves so that ``--resume`` continues exactly where a killed run stopped.
"""

from __future__ import annotations

import dataclasses
import platform
from pathlib import Path
from typing import Any

import torch

from training.common.device import resolve_device, set_cpu_threads
from training.common.errors import UserError
from training.common.io import atomic_write_json, ensure_writable_dir, file_sha256, read_json
from training.envs.capacity import announce
from training.envs.options import EnvOptions, for_process
from training.envs.protocol import BatchedWaypointEnv, Observation
from training.envs.registry import make_env_mix, make_envs
from training.rl.buffer import RolloutBuffer
from training.rl.checkpoint import load_rl_checkpoint, save_rl_checkpoint
from training.rl.config import PPOConfig
from training.rl.curriculum import Curriculum, curriculum_levels
from training.rl.distributed import RANK_SEED_STRIDE, DistContext
from training.rl.policy import PPOPolicy
from training.rl.selection import PolicySelection
from training.sft.external import read_sft

RUN_FILES = ("config.json", "train_metrics.json", "eval_metrics.json", "final.pt")


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
    """The checkpoint a resumed run continues from: the highest ``checkpoint_iter_N.pt``.

    ``final.pt`` holds the selected policy, not necessarily the last iteration's, so it is read
    only by a run folder that has no numbered checkpoint (written before they were kept).
    """
    numbered = []
    for path in out_dir.glob("checkpoint_iter_*.pt"):
        suffix = path.stem.removeprefix("checkpoint_iter_")
        if suffix.isdigit():
            numbered.append((int(suffix), path))
    if numbered:
        return max(numbered)[1]
    return out_dir / "final.pt" if (out_dir / "final.pt").is_file() else None


def package_versions() -> dict[str, str]:
    import gymnasium
    import numpy

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "numpy": numpy.__version__,
        "gymnasium": gymnasium.__version__,
    }


# Resuming a world without state_dict() re-seeds it from here on within the run's seed range.
RESEED_OFFSET = 500_000
# Sampling and minibatch generators of rank r are seeded this far from rank 0's.
RANK_GENERATOR_STRIDE = 1_000_003
# Settings that may differ between a run and its resumption (they do not change the numbers). The
# device may be named otherwise (``auto``) but must be of the same type (the generators' states are);
# the run folder and the SFT file may have moved (the SFT file's sha256 is checked).
_RESUME_FREE = {
    "resume",
    "overwrite",
    "progress",
    "num_threads",
    "device",
    "cuda_graph",
    "out_dir",
    "sft_checkpoint",
}


@dataclasses.dataclass
class Run:
    """Everything a training run holds; :meth:`state` is what a checkpoint saves to resume it."""

    config: PPOConfig
    policy: PPOPolicy
    optimizer: torch.optim.Optimizer
    env: BatchedWaypointEnv
    eval_envs: dict[str, BatchedWaypointEnv]  # held-out worlds per environment (rank 0 only)
    buffer: RolloutBuffer
    sample_gen: torch.Generator
    batch_gen: torch.Generator
    out_dir: Path
    info: dict[str, Any]
    ctx: DistContext = dataclasses.field(default_factory=DistContext)
    curriculum: Curriculum | None = None
    selection: PolicySelection | None = None  # the policy final.pt will hold (rank 0)
    kl_coef: float = 0.0
    obs: Observation | None = None
    iteration: int = 0
    env_steps: int = 0
    bad_iterations: int = 0
    train_records: list[dict[str, Any]] = dataclasses.field(default_factory=list)
    eval_records: list[dict[str, Any]] = dataclasses.field(default_factory=list)

    @property
    def train_seed_start(self) -> int:
        """This process's first training scenario seed (ranks draw from disjoint blocks)."""
        return self.config.train_seed_start + self.ctx.rank * RANK_SEED_STRIDE

    def _local_state(self) -> dict[str, Any]:
        """What differs between processes: worlds and sampling generators."""
        return {
            "rng": {
                "sample": self.sample_gen.get_state(),
                "batch": self.batch_gen.get_state(),
                "torch": torch.get_rng_state(),
            },
            # Worlds that can save their state (the toy world) resume exactly; others (None) are re-seeded.
            "world": self.env.state_dict(),
        }

    def state(self) -> dict[str, Any]:
        """The resumable state; in a distributed run a collective call (every rank must call it)."""
        local = self._local_state()
        state = {
            "iteration": self.iteration,
            "env_steps": self.env_steps,
            "bad_iterations": self.bad_iterations,
            "optimizer": self.optimizer.state_dict(),
            "kl_coef": self.kl_coef,
            "curriculum": self.curriculum.state_dict() if self.curriculum else None,
            "selection": self.selection.state_dict() if self.selection else None,
            "world_size": self.ctx.world_size,
            "device_type": self.sample_gen.device.type,
            **local,
        }
        if self.ctx.enabled:
            state["ranks"] = self.ctx.gather(local)
        return state

    def save(self, name: str, state: dict[str, Any] | None = None) -> None:
        """Write a checkpoint (rank 0 writes; every rank must call this in a distributed run).

        ``state``: what :meth:`state` returned, when the caller writes several files at once."""
        state = self.state() if state is None else state
        if self.ctx.is_main:
            save_rl_checkpoint(self.out_dir / name, self.policy.heads_state_dict(), self.info, **state)

    @property
    def final_choice(self) -> PolicySelection | None:
        """The selection ``final.pt`` holds; None: the last iteration (``--no-select-policy``)."""
        return self.selection if self.config.select_policy else None

    def save_final(self, state: dict[str, Any] | None = None) -> None:
        """``final.pt``: the selected policy (the last iteration's without selection), with the
        iteration it came from; the resumable state stays in ``checkpoint_iter_N.pt``."""
        state = self.state() if state is None else state
        if not self.ctx.is_main:
            return
        chosen = self.final_choice
        heads = chosen.heads if chosen else self.policy.heads_state_dict()
        save_rl_checkpoint(
            self.out_dir / "final.pt",
            heads,
            self.info,
            **state,
            selected_iteration=chosen.iteration if chosen else self.iteration,
            selected_eval=chosen.record if chosen else None,
        )


def run_device(config: PPOConfig, ctx: DistContext) -> torch.device:
    """``--device``, with each process of a distributed CUDA run on its own GPU."""
    device = resolve_device(config.device)
    if ctx.enabled and device.type == "cuda":
        return torch.device("cuda", ctx.local_rank)
    return device


def _adam(policy: PPOPolicy, lr: float, device: torch.device) -> torch.optim.Adam:
    """Adam over the heads and log std; fused (one kernel for every parameter) on the CPU and CUDA,
    where PyTorch has that kernel: the PPO update is a few hundred small minibatch steps per
    iteration, and the per-tensor loop cost 1.6x the fused step on the CPU (measured on the heads'
    shapes, minibatch 64)."""
    fused = device.type in ("cpu", "cuda")
    return torch.optim.Adam(policy.trainable_parameters(), lr=lr, eps=1e-5, fused=fused or None)


def build_run(config: PPOConfig, ctx: DistContext | None = None) -> Run:
    """Load the SFT model, build worlds, policy, optimiser and buffer (nothing written yet but the folder)."""
    ctx = ctx or DistContext()
    set_cpu_threads(config.num_threads)
    device = run_device(config, ctx)
    sft_source = read_sft(
        config.sft_checkpoint, config.sft_model, device
    )  # a bad file fails before any world
    # each process its own block of simulator servers: training worlds plus rank 0's evaluation worlds
    options = for_process(
        config.env_options(config.difficulty), ctx.rank, config.num_envs + config.num_eval_worlds
    )
    env = make_env_mix(
        config.env_mix(), device, dataclasses.replace(options, asynchronous=config.async_worlds)
    )
    try:
        sft_model = sft_source.for_env(env.spec)  # the model's shapes against the environment's
        curriculum = _build_curriculum(config, env)
        buffer = _allocate_buffer(config, sft_model.feature_dim, sft_model.num_waypoints, device)
        out_dir = prepare_out_dir(config) if ctx.is_main else Path(config.out_dir)
        eval_envs = _build_eval_envs(config, device, options) if ctx.is_main else {}
    except BaseException:
        env.close()
        raise

    torch.manual_seed(config.seed)  # identical heads on every rank
    policy = PPOPolicy(sft_model, config.policy_settings()).to(device)
    policy.train()
    rank_seed = config.seed + RANK_GENERATOR_STRIDE * ctx.rank
    return Run(
        config=config,
        policy=policy,
        optimizer=_adam(policy, config.lr, device),
        env=env,
        eval_envs=eval_envs,
        buffer=buffer,
        sample_gen=torch.Generator(device=device).manual_seed(rank_seed),
        batch_gen=torch.Generator(device=device).manual_seed(rank_seed + 1),
        out_dir=out_dir,
        info={
            "config": dataclasses.asdict(config),
            "sft_checkpoint": str(config.sft_checkpoint),
            "sft_sha256": file_sha256(config.sft_checkpoint),
        },
        ctx=ctx,
        curriculum=curriculum,
        kl_coef=config.kl_coef,
    )


def _allocate_buffer(
    config: PPOConfig, feature_dim: int, num_waypoints: int, device: torch.device
) -> RolloutBuffer:
    """The rollout buffer, or one line naming the flags when it does not fit in memory."""
    try:
        return RolloutBuffer(config.rollout_steps, config.num_envs, feature_dim, num_waypoints, device=device)
    except (RuntimeError, MemoryError) as error:  # torch.OutOfMemoryError is a RuntimeError
        if not isinstance(error, MemoryError) and "alloc" not in str(error).lower():
            raise
        raise UserError(
            f"the rollout buffer (--num-envs {config.num_envs} x --rollout-steps {config.rollout_steps} "
            f"transitions of {feature_dim} features) does not fit in the {device.type} memory"
        ) from None


def _build_curriculum(config: PPOConfig, env: BatchedWaypointEnv) -> Curriculum | None:
    if not config.curriculum:
        return None
    levels = curriculum_levels(config.curriculum_start, config.curriculum_step, config.difficulty)
    curriculum = Curriculum(levels, config.curriculum_threshold, config.curriculum_min_episodes)
    if not env.set_difficulty(curriculum.difficulty):
        raise UserError(
            f"--curriculum needs an environment with a difficulty (toy); --env {config.env} has none"
        )
    return curriculum


def _build_eval_envs(
    config: PPOConfig, device: torch.device, options: EnvOptions
) -> dict[str, BatchedWaypointEnv]:
    """Held-out worlds for each environment of the mix, always at the target ``--difficulty``."""
    eager = dataclasses.replace(options, compile_world=False)  # evaluated on the world as it always ran
    return make_envs([(name, config.num_eval_worlds) for name, _ in config.env_mix()], device, eager)


# Settings added after runs were already being checkpointed, with the value that is exactly how those
# runs ran. A setting whose default changed what a run does (``select_policy``, say) is not here: a run
# from before it is refused, not resumed under a behaviour it never had.
_ADDED_AS_BEFORE = {"async_worlds": False, "compile_update": False}


def _with_later_defaults(saved_config: dict[str, Any]) -> dict[str, Any]:
    """A saved run's settings, with the settings of ``_ADDED_AS_BEFORE`` that it predates filled in."""
    return {**_ADDED_AS_BEFORE, **saved_config}


def resume_from(run: Run, path: Path) -> None:
    """Restore the run saved in ``path``; metrics files keep each iteration up to it exactly once."""
    checkpoint = load_rl_checkpoint(path)
    saved = {k: v for k, v in _with_later_defaults(checkpoint["config"]).items() if k not in _RESUME_FREE}
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
    _check_device_type(run, checkpoint.get("device_type"))
    saved_world_size = checkpoint.get("world_size", 1)
    if saved_world_size != run.ctx.world_size:
        raise UserError(
            f"--resume: the run in {run.out_dir} ran on {saved_world_size} processes, "
            f"this one on {run.ctx.world_size}; resume it with the same --nproc-per-node"
        )
    run.policy.load_heads_state_dict(checkpoint["heads"])
    run.optimizer.load_state_dict(checkpoint["optimizer"])
    run.iteration, run.env_steps = checkpoint["iteration"], checkpoint["env_steps"]
    run.bad_iterations = checkpoint["bad_iterations"]
    run.kl_coef = float(checkpoint.get("kl_coef", run.config.kl_coef))
    if checkpoint.get("selection") is not None:
        run.selection = PolicySelection.from_state_dict(checkpoint["selection"])
    if run.curriculum is not None and checkpoint.get("curriculum") is not None:
        run.curriculum.load_state_dict(checkpoint["curriculum"])
        run.env.set_difficulty(run.curriculum.difficulty)
    _restore_local_state(run, checkpoint["ranks"][run.ctx.rank] if run.ctx.enabled else checkpoint)
    if run.ctx.is_main:
        run.train_records = _records_up_to(run.out_dir / "train_metrics.json", run.iteration)
        run.eval_records = _records_up_to(run.out_dir / "eval_metrics.json", run.iteration)
        if not run.eval_records and run.selection is not None:  # the file was deleted or unreadable
            announce(
                f"--resume: {run.out_dir / 'eval_metrics.json'} was missing or unreadable; its records "
                f"up to iteration {run.iteration} are lost but SFT's (iteration 0, kept in the checkpoint)"
            )
            run.eval_records = [dict(run.selection.baseline)]
        atomic_write_json(run.out_dir / "train_metrics.json", run.train_records)
        atomic_write_json(run.out_dir / "eval_metrics.json", run.eval_records)


def _check_device_type(run: Run, saved: str | None) -> None:
    """The sampling generators' states only load on the type of device that saved them."""
    current = run.sample_gen.device.type
    if saved is not None and saved != current:
        raise UserError(
            f"--resume: the run in {run.out_dir} ran on {saved}, this one on {current} "
            f"(--device {run.config.device}); resume it on a {saved} device"
        )


def _restore_local_state(run: Run, local: dict[str, Any]) -> None:
    try:
        run.sample_gen.set_state(local["rng"]["sample"])
        run.batch_gen.set_state(local["rng"]["batch"])
    except RuntimeError:  # a checkpoint from before device_type was saved, from another device type
        raise UserError(
            f"--resume: the run in {run.out_dir} ran on another type of device than "
            f"{run.sample_gen.device.type}; resume it on the device it ran on"
        ) from None
    torch.set_rng_state(local["rng"]["torch"])
    if local["world"] is not None:
        run.obs = run.env.load_state_dict(local["world"])
    else:  # a clean re-seed on fresh training scenarios of this run
        run.obs = run.env.reset(
            seed=run.train_seed_start + RESEED_OFFSET + run.iteration * run.config.num_envs
        )


def _records_up_to(path: Path, iteration: int) -> list[dict[str, Any]]:
    try:
        records = read_json(path)
    except UserError:
        return []
    return [r for r in records if isinstance(r, dict) and r.get("iteration", -1) <= iteration]


def write_run_config(run: Run) -> None:
    """``config.json``: every setting, the SFT checkpoint's sha256, the env spec, package versions."""
    atomic_write_json(
        run.out_dir / "config.json",
        {
            **dataclasses.asdict(run.config),
            "sft_sha256": run.info["sft_sha256"],
            "resolved_device": str(run.env.device),
            "env_spec": run.env.spec.to_dict(),
            "versions": package_versions(),
        },
    )
    for stale in ("train_metrics.json", "eval_metrics.json"):
        (run.out_dir / stale).unlink(missing_ok=True)
