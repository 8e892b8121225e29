"""Behaviour cloning of the toy world's expert: BEV + ego state -> K future waypoints (metres).

```
python -m training.sft.train_waypoint_bc_torch_v0 --out-dir out/sft_waypoint_bc_torch_v0
```

1. record expert demonstrations (training and held-out scenario seeds) under ``<out-dir>/demos/``;
2. fit ``WaypointModel`` with a smooth-L1 loss on the waypoints in metres (AdamW, cosine decay);
3. after every epoch, measure held-out ADE/FDE (metres) and write ``metrics.json``;
4. write ``model.pt`` (``kind: "sft_waypoint_model"``), ``config.json`` and TensorBoard events.

With ``--sft-model MODULE:FACTORY`` it clones the architecture ``FACTORY()`` returns instead
(``training/sft/external.py`` says what that module must offer), checked against the
environment's shapes before any demonstration is recorded, and ``model.pt`` is its plain
``state_dict``: the RL trainer and the comparison read it with the same ``--sft-model``.

The defaults take about a minute on a 2-core CPU and give a model that drives but drifts in
closed loop (it only saw the expert's own states), which the RL stage then improves.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from training.common.cli import config_field, config_to_dict, console_script, parse_config, require
from training.common.device import resolve_device, set_cpu_threads
from training.common.errors import UserError, exit_on_user_error
from training.common.io import atomic_write_json, ensure_writable_dir, save_checkpoint
from training.common.progress import log_line, progress_bar
from training.envs.capacity import default_worlds
from training.envs.options import SimulatorFlags
from training.envs.protocol import BatchedWaypointEnv, EnvSpec
from training.envs.registry import check_env_choice, make_env
from training.sft.data import (
    SEEDS_PER_RUN_SEED,
    VAL_SEED_OFFSET,
    WaypointDemoDataset,
    collect_split,
    split_first_seed,
)
from training.sft.external import ExternalSFTModel, adapt_to_spec, build_from_factory, parse_factory_spec
from training.sft.model import SFTModelConfig, WaypointModel, encoder_macs_per_sample, save_sft_checkpoint

LOSSES = ("smooth_l1", "l1")


TOY_EPISODES_PER_BATCH = 120  # the toy world's recording batch (one tensor batch: free)


@dataclass
class SFTTrainConfig(SimulatorFlags):
    """Every setting of one behaviour-cloning run (written to ``config.json``)."""

    out_dir: str = config_field(
        "out/sft_waypoint_bc_torch_v0", "output folder: model.pt, config.json, metrics.json, demos/, events"
    )
    env: str = config_field("toy", "environment whose expert is cloned (toy, metadrive or carla)")
    sft_model: str | None = config_field(
        None,
        "clone your own architecture: FACTORY() in MODULE returns the nn.Module; model.pt is then its "
        "state_dict (default: this project's WaypointModel)",
        metavar="MODULE:FACTORY",
    )
    difficulty: float = config_field(0.5, "toy world difficulty in [0, 1] (curvature, traffic)")
    num_episodes: int = config_field(200, "expert episodes recorded for training")
    val_episodes: int = config_field(60, "held-out expert episodes (disjoint scenario seeds) for ADE/FDE")
    episodes_per_batch: int | None = config_field(
        None,
        f"worlds simulated together while recording (default: {TOY_EPISODES_PER_BATCH} for the toy world; "
        "with a simulator that runs a process per world, as many as the machine runs well)",
    )
    record_every: int = config_field(2, "record every n-th policy step of an episode")
    expert_noise: float = config_field(
        0.0, "std of noise added to the plan the expert executes (labels stay clean)", unit="m"
    )
    epochs: int = config_field(4, "passes over the training demonstrations")
    batch_size: int = config_field(128, "samples per gradient step")
    lr: float = config_field(1e-3, "peak AdamW learning rate (cosine decay to 0)")
    weight_decay: float = config_field(1e-4, "AdamW weight decay")
    loss: str = config_field("smooth_l1", "waypoint loss in metres: smooth_l1 or l1")
    smooth_l1_beta: float = config_field(1.0, "smooth-L1 transition point", unit="m")
    max_grad_norm: float = config_field(5.0, "gradient norm clip (0 disables)")
    feature_dim: int = config_field(256, "size of the encoder feature z the RL heads read (WaypointModel)")
    waypoint_scale: float = config_field(10.0, "output normalisation of the head (WaypointModel)", unit="m")
    device: str = config_field(
        "auto", "torch device: auto (cuda when available, else cpu), cpu, cuda, cuda:N"
    )
    num_threads: int = config_field(
        1, "torch CPU threads (0: torch's default; see training/common/device.py)"
    )
    seed: int = config_field(0, "seed of weights, shuffling and scenario seeds (0 <= seed < 500)")
    overwrite: bool = config_field(False, "replace an out-dir that already holds a model.pt")

    def validate(self) -> None:
        check_env_choice(self.env)
        if self.sft_model is not None:
            parse_factory_spec(self.sft_model)
        self.validate_simulator_flags()
        require(0.0 <= self.difficulty <= 1.0, f"--difficulty must be in [0, 1], got {self.difficulty}")
        require(self.num_episodes >= 1, f"--num-episodes must be >= 1, got {self.num_episodes}")
        require(
            self.num_episodes < SEEDS_PER_RUN_SEED and self.val_episodes < SEEDS_PER_RUN_SEED,
            f"--num-episodes and --val-episodes must be < {SEEDS_PER_RUN_SEED}",
        )
        require(self.val_episodes >= 1, f"--val-episodes must be >= 1, got {self.val_episodes}")
        require(
            self.episodes_per_batch is None or self.episodes_per_batch >= 1,
            f"--episodes-per-batch must be >= 1, got {self.episodes_per_batch}",
        )
        require(self.record_every >= 1, f"--record-every must be >= 1, got {self.record_every}")
        require(
            self.expert_noise >= 0 and math.isfinite(self.expert_noise),
            f"--expert-noise must be >= 0, got {self.expert_noise}",
        )
        require(self.epochs >= 1, f"--epochs must be >= 1, got {self.epochs}")
        require(self.batch_size >= 1, f"--batch-size must be >= 1, got {self.batch_size}")
        require(self.lr > 0 and math.isfinite(self.lr), f"--lr must be > 0, got {self.lr}")
        require(self.weight_decay >= 0, f"--weight-decay must be >= 0, got {self.weight_decay}")
        require(self.loss in LOSSES, f"--loss must be one of {', '.join(LOSSES)}, got {self.loss!r}")
        require(self.smooth_l1_beta > 0, f"--smooth-l1-beta must be > 0, got {self.smooth_l1_beta}")
        require(self.max_grad_norm >= 0, f"--max-grad-norm must be >= 0, got {self.max_grad_norm}")
        require(self.feature_dim >= 1, f"--feature-dim must be >= 1, got {self.feature_dim}")
        require(self.waypoint_scale > 0, f"--waypoint-scale must be > 0, got {self.waypoint_scale}")
        max_seed = VAL_SEED_OFFSET // SEEDS_PER_RUN_SEED
        require(0 <= self.seed < max_seed, f"--seed must be in [0, {max_seed}), got {self.seed}")
        require(self.num_threads >= 0, f"--num-threads must be >= 0, got {self.num_threads}")
        resolve_device(self.device)


def waypoint_loss(pred_m: Tensor, target_m: Tensor, config: SFTTrainConfig) -> Tensor:
    """Mean per-coordinate loss between ``[B, K, 2]`` waypoints in metres."""
    if config.loss == "l1":
        return F.l1_loss(pred_m, target_m)
    return F.smooth_l1_loss(pred_m, target_m, beta=config.smooth_l1_beta)


@torch.inference_mode()
def evaluate_ade_fde(
    model: WaypointModel | ExternalSFTModel, data: WaypointDemoDataset, batch_size: int = 512
) -> dict[str, float]:
    """Average (ADE) and final (FDE) displacement error in metres of ``model`` on ``data``."""
    was_training = model.training
    model.eval()
    ade_sum = fde_sum = 0.0
    for start in range(0, len(data), batch_size):
        stop = min(start + batch_size, len(data))
        pred = model(data.bev[start:stop], data.state[start:stop])
        dist = (pred - data.waypoints[start:stop]).norm(dim=-1)  # [B, K] metres
        ade_sum += float(dist.mean(dim=1).sum())
        fde_sum += float(dist[:, -1].sum())
    model.train(was_training)
    return {"ade_m": ade_sum / len(data), "fde_m": fde_sum / len(data)}


def constant_plan_ade_fde(plan_m: Tensor, data: WaypointDemoDataset) -> dict[str, float]:
    """ADE/FDE (metres) of predicting the same plan ``[K, 2]`` everywhere (a no-skill baseline)."""
    dist = (plan_m.to(data.waypoints.device) - data.waypoints).norm(dim=-1)
    return {"ade_m": float(dist.mean()), "fde_m": float(dist[:, -1].mean())}


def _record_demos(
    config: SFTTrainConfig, env: BatchedWaypointEnv, demo_dir: Path, show_progress: bool
) -> None:
    total = config.num_episodes + config.val_episodes
    with progress_bar(total, "expert demos", "ep", show_progress) as bar:
        offset = 0
        for split, episodes in (("train", config.num_episodes), ("val", config.val_episodes)):

            def progress(done: int, offset: int = offset) -> None:
                bar.n = offset + done
                bar.refresh()

            collect_split(
                env,
                demo_dir / split,
                split,
                num_episodes=episodes,
                first_seed=split_first_seed(split, config.seed),
                record_every=config.record_every,
                action_noise_m=config.expert_noise,
                noise_seed=config.seed + (0 if split == "train" else 1),
                progress=progress,
            )
            offset += episodes
            log_line(f"expert demos: {episodes} {split} episodes recorded", show_progress)


def _recording_env(config: SFTTrainConfig, device: torch.device) -> BatchedWaypointEnv:
    """The worlds that record the demonstrations: one batch of ``--episodes-per-batch`` episodes."""
    per_batch = default_worlds(
        config.env, config.episodes_per_batch, TOY_EPISODES_PER_BATCH, "--episodes-per-batch", "recording"
    )
    num_envs = min(per_batch, max(config.num_episodes, config.val_episodes))
    return make_env(config.env, num_envs, device, options=config.env_options(config.difficulty))


def train_sft(config: SFTTrainConfig, show_progress: bool = True) -> dict[str, Any]:
    """Record demonstrations, train, evaluate and save; returns the final metrics and file paths.

    Raises:
        UserError: the output folder already holds a model and ``overwrite`` is off, or it is
            not writable, or a setting is invalid.
    """
    from torch.utils.tensorboard import SummaryWriter

    config.validate()
    set_cpu_threads(config.num_threads)
    started = time.perf_counter()
    out_dir = Path(config.out_dir)
    model_path = out_dir / "model.pt"
    if model_path.exists() and not config.overwrite:
        raise UserError(f"{model_path} already exists; pass --overwrite to replace it")
    device = resolve_device(config.device)
    env = _recording_env(config, device)  # a simulator that cannot start fails before any file is written
    try:
        own_model = _own_model(config, env.spec, device)  # so does an --sft-model that does not fit
        ensure_writable_dir(out_dir)
        torch.manual_seed(config.seed)
        atomic_write_json(out_dir / "config.json", config_to_dict(config))
        demo_dir = out_dir / "demos"
        _record_demos(config, env, demo_dir, show_progress)
    finally:
        env.close()
    train_data = WaypointDemoDataset(demo_dir / "train").to(device)
    val_data = WaypointDemoDataset(demo_dir / "val").to(device)
    env_spec = train_data.manifest["env_spec"]
    record_time = time.perf_counter() - started

    model = own_model if own_model is not None else _waypoint_model(config, env_spec, train_data, device)
    mean_plan = train_data.waypoints.mean(dim=0)
    baselines = {
        "mean_plan_val": constant_plan_ade_fde(mean_plan, val_data),
        "zero_plan_val": constant_plan_ade_fde(torch.zeros_like(mean_plan), val_data),
    }

    steps_per_epoch = math.ceil(len(train_data) / config.batch_size)
    total_steps = steps_per_epoch * config.epochs
    optimizer = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))
    )
    shuffle = torch.Generator().manual_seed(config.seed)
    writer = SummaryWriter(log_dir=str(out_dir))
    epochs: list[dict[str, float]] = []
    metrics: dict[str, Any] = {}
    global_step = 0
    try:
        with progress_bar(total_steps, "behaviour cloning", "batch", show_progress) as bar:
            for epoch in range(1, config.epochs + 1):
                model.train()
                order = torch.randperm(len(train_data), generator=shuffle).to(device)
                loss_sum = torch.zeros((), device=device)
                for start in range(0, len(order), config.batch_size):
                    idx = order[start : start + config.batch_size]
                    pred = model(train_data.bev[idx], train_data.state[idx])
                    loss = waypoint_loss(pred, train_data.waypoints[idx], config)
                    optimizer.zero_grad(set_to_none=True)
                    loss.backward()
                    if config.max_grad_norm > 0:
                        torch.nn.utils.clip_grad_norm_(model.parameters(), config.max_grad_norm)
                    optimizer.step()
                    scheduler.step()
                    loss_sum += loss.detach() * len(idx)
                    global_step += 1
                    bar.update(1)
                val = evaluate_ade_fde(model, val_data)
                record = {
                    "epoch": epoch,
                    "train_loss": float(loss_sum) / len(train_data),
                    "val_ade_m": val["ade_m"],
                    "val_fde_m": val["fde_m"],
                    "lr": scheduler.get_last_lr()[0],
                    "wall_time_s": time.perf_counter() - started,
                }
                epochs.append(record)
                bar.set_postfix(loss=f"{record['train_loss']:.3f}", val_ade=f"{val['ade_m']:.2f}m")
                log_line(
                    f"epoch {epoch}/{config.epochs}: train loss {record['train_loss']:.4f}, "
                    f"held-out ADE {val['ade_m']:.3f} m, FDE {val['fde_m']:.3f} m",
                    show_progress,
                )
                writer.add_scalar("losses/train_loss", record["train_loss"], global_step)
                writer.add_scalar("eval/val_ade_m", record["val_ade_m"], global_step)
                writer.add_scalar("eval/val_fde_m", record["val_fde_m"], global_step)
                writer.add_scalar("charts/learning_rate", record["lr"], global_step)
                metrics = _metrics_record(
                    model, epochs, baselines, train_data, val_data, record_time, started
                )
                atomic_write_json(out_dir / "metrics.json", metrics)
    finally:
        writer.close()

    final = metrics["final"]
    if config.sft_model is None:
        # the model file holds no wall time, so that the same command writes the same bytes (its
        # sha256 pairs RL runs with their SFT model); metrics.json keeps it
        timeless = {k: v for k, v in final.items() if k != "wall_time_s"}
        save_sft_checkpoint(model_path, model.cpu(), env_spec, config_to_dict(config), timeless)
    else:  # the plain state_dict a user would bring, read again with the same --sft-model
        module = model.module if isinstance(model, ExternalSFTModel) else model
        save_checkpoint(model_path, {k: v.detach().cpu().clone() for k, v in module.state_dict().items()})
    return {**final, "model_path": str(model_path), "metrics_path": str(out_dir / "metrics.json")}


def _own_model(
    config: SFTTrainConfig, spec: EnvSpec, device: torch.device
) -> WaypointModel | ExternalSFTModel | None:
    """``--sft-model``'s architecture, initialised from ``--seed`` and checked against ``spec``."""
    if config.sft_model is None:
        return None
    torch.manual_seed(config.seed)
    module = build_from_factory(config.sft_model).to(device)
    return adapt_to_spec(module, spec, config.sft_model)


def _waypoint_model(
    config: SFTTrainConfig, env_spec: dict[str, Any], train_data: WaypointDemoDataset, device: torch.device
) -> WaypointModel:
    """This project's model for the recorded world, its normalisation fitted on the training data."""
    model_config = SFTModelConfig(
        bev_shape=tuple(env_spec["bev_shape"]),
        state_dim=int(env_spec["state_dim"]),
        num_waypoints=int(env_spec["num_waypoints"]),
        feature_dim=config.feature_dim,
        waypoint_scale=config.waypoint_scale,
    )
    torch.manual_seed(config.seed)
    model = WaypointModel(model_config).to(device)
    model.fit_normalization(train_data.state, train_data.waypoints)
    return model


def _metrics_record(
    model: WaypointModel | ExternalSFTModel,
    epochs: list[dict[str, float]],
    baselines: dict[str, dict[str, float]],
    train_data: WaypointDemoDataset,
    val_data: WaypointDemoDataset,
    record_time: float,
    started: float,
) -> dict[str, Any]:
    last = epochs[-1]
    return {
        "final": {
            "epoch": last["epoch"],
            "train_loss": last["train_loss"],
            "val_ade_m": last["val_ade_m"],
            "val_fde_m": last["val_fde_m"],
            "mean_plan_val_ade_m": baselines["mean_plan_val"]["ade_m"],
            "num_train_samples": len(train_data),
            "num_val_samples": len(val_data),
            "wall_time_s": time.perf_counter() - started,
        },
        "epochs": epochs,
        "baselines": baselines,
        "data": {
            "train": {k: train_data.manifest[k] for k in ("num_samples", "num_episodes", "scenario_seeds")},
            "val": {k: val_data.manifest[k] for k in ("num_samples", "num_episodes", "scenario_seeds")},
            "expert_outcomes_train": train_data.manifest["expert_outcomes"],
            "record_time_s": record_time,
        },
        "encoder_mflops_per_sample": (
            2 * encoder_macs_per_sample(model.config)["encode"] / 1e6
            if isinstance(model, WaypointModel)
            else None
        ),
    }


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    config = parse_config(
        SFTTrainConfig,
        argv,
        prog="python -m training.sft.train_waypoint_bc_torch_v0",
        description="Behaviour cloning of the expert: BEV + ego state -> future waypoints.",
    )
    result = train_sft(config)
    print(
        f"SFT done in {result['wall_time_s']:.0f} s: {result['num_train_samples']} training samples, "
        f"held-out ADE {result['val_ade_m']:.2f} m, FDE {result['val_fde_m']:.2f} m "
        f"(mean-plan baseline ADE {result['mean_plan_val_ade_m']:.2f} m)"
    )
    print(f"model: {result['model_path']}")
    if config.sft_model is not None:
        print(
            f"(a state_dict of {config.sft_model}: the RL trainer and the comparison read it with "
            f"--sft-model {config.sft_model})"
        )
    return result


cli = console_script(main)  # the console script; `python -m` stays the documented form

if __name__ == "__main__":
    main()
