"""Throughput of the toy world, the rollout and residual PPO training, beside Stable-Baselines3.

    python -m benchmarks.throughput [--device cpu] [--num-envs 8,32,128] [--seconds 2] [--json] [--cuda-graph]
        [--compile-world] [--compile-update]

For each ``--num-envs``, built from the real trainer (``training.rl.run.build_run``):

- world-only steps/s: ``env.step`` (dynamics, controller, reward, autoreset, BEV render) driven by
  the expert plan the previous step returned (the world computes it anyway); with
  ``--compile-world`` each step is one compiled graph, as the trainer's flag makes it (its compile
  is part of the warm-up call);
- rollout steps/s: ``trainer.collect_rollout`` (world, frozen encoder, heads, buffer writes); with
  ``--cuda-graph`` (CUDA only) its steps, and those of the training figure, replay a CUDA graph;
- update steps/s: the PPO epochs alone (``trainer.update_policy`` on a full buffer), in env steps of
  the rollout they learn from: with the default heads their matrix products cost about as much per
  step as the encoder's (docs/benchmarks.md); with ``--compile-update`` each minibatch's whole
  step is one compiled graph, as the trainer's flag makes it;
- end-to-end training steps/s: ``trainer.train_iteration`` (rollout, GAE, PPO epochs on the cached
  features, the iteration's metrics);
- the arithmetic bound of training (``train_bound_steps_per_s``): the rate if a step cost only the
  frozen encoder, the world, the heads' counted FLOPs at the rate of their matrix products
  (measured once per run on the update's minibatch rows) and the optimizer's steps (the trainer's
  Adam on the heads, timed once per run), nothing else costing anything; with
  ``bound_vs_encoder`` and ``train_vs_bound``;
- peak memory: CUDA's peak allocated bytes, or the process's peak resident set on the CPU;
- Stable-Baselines3 PPO on the same world with the same frozen encoder and residual action
  (``benchmarks/sb3_side_by_side.py``) for sizes up to ``--sb3-max-envs``, and our ratio to it.

Once per run: SFT behaviour-cloning samples/s, the frozen encoder's FLOPs and bytes per step, the
heads' and a square float32 product's FLOP/s, the optimizer's step, and the half-precision waypoint
error against float32. Rates are medians over repeated timed calls after
one warm-up call: on shared cores they are lower bounds of the rate (upper bounds of the time).
``--json`` prints one JSON object: the largest size's figures at the top level and every size in
``rows``.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import dataclasses
import io
import json
import math
import pstats
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.op_count import world_ops_per_step
from training.common.compiling import check_compile_update
from training.common.device import resolve_device, set_cpu_threads
from training.common.errors import UserError, exit_on_user_error
from training.envs.registry import check_compile_world
from training.rl.buffer import minibatch_bounds
from training.rl.config import PPOConfig
from training.rl.policy import PolicySettings
from training.rl.run import Run, build_run
from training.rl.trainer import collect_rollout, train_iteration, update_policy
from training.sft.model import FROZEN_PRECISIONS, WaypointModel, load_sft_model

ROW_KEYS = (
    "world_steps_per_s",
    "encoder_steps_per_s",
    "rollout_steps_per_s",
    "update_steps_per_s",
    "train_steps_per_s",
    "world_vs_encoder",
    "train_vs_encoder",
    "train_bound_steps_per_s",  # encoder + world + the heads' FLOPs and Adam at measured rates, nothing else
    "bound_vs_encoder",
    "train_vs_bound",
    "world_ops_per_step",
    "peak_memory_bytes",
)
MIN_TIMED_CALLS = 3  # a rate is the median of at least this many timed calls
ERROR_SAMPLES = 256  # observations on which half precision is compared with float32 (CPU autocast is slow)


@dataclasses.dataclass
class BenchSettings:
    """What one benchmark run measures (the command line)."""

    device: torch.device
    num_envs: list[int]
    seconds: float
    rollout_steps: int
    minibatches: int
    update_epochs: int
    sft_checkpoint: str | None
    sb3_max_envs: int
    compile_encoder: bool
    profile: bool = False
    cuda_graph: bool = False  # replay each rollout step as a CUDA graph (``--cuda-graph``)
    compile_world: bool = False  # each world step one compiled graph (``--compile-world``)
    compile_update: bool = False  # each minibatch's whole step compiled (``--compile-update``)
    hidden_size: int = PolicySettings.hidden_size  # the heads' width (``--hidden-size``), ours and SB3's

    def batch_size(self, num_envs: int) -> int:
        """PPO minibatch size: a rollout split into ``minibatches`` (at least one transition)."""
        return max(1, num_envs * self.rollout_steps // self.minibatches)


# ---------------------------------------------------------------------------------------- timing
def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_rate(
    call: Callable[[], object], steps_per_call: int, seconds: float, device: torch.device
) -> float:
    """Median steps/s over timed calls of ``call`` (each ``steps_per_call`` steps), after one warm-up.

    Calls repeat until ``seconds`` have passed and at least ``MIN_TIMED_CALLS`` were timed.
    """

    def timed() -> float:
        started = time.perf_counter()
        call()
        _synchronize(device)
        return time.perf_counter() - started

    return median_rate_of_timed(timed, steps_per_call, seconds)


def median_rate_of_timed(call: Callable[[], float], steps_per_call: int, seconds: float) -> float:
    """:func:`median_rate` for a ``call`` that returns the seconds of its own timed part."""
    call()
    rates: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(rates) < MIN_TIMED_CALLS or time.perf_counter() < deadline:
        rates.append(steps_per_call / call())
    return statistics.median(rates)


def reset_peak_memory(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_bytes(device: torch.device) -> int:
    """CUDA: peak bytes allocated since the last reset; CPU: the process's peak resident set.

    The CPU figure never resets: it is the largest of every size measured so far in the process.
    """
    if device.type == "cuda":
        return int(torch.cuda.max_memory_allocated(device))
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * 1024  # Linux reports KiB


# ---------------------------------------------------------------------------------------- our loop
def build_bench_run(settings: BenchSettings, sft_path: Path, num_envs: int, out_dir: Path) -> Run:
    """A training run as ``train_ppo`` builds it, with no KL early stop (every epoch runs) and no warm-up."""
    config = PPOConfig(
        sft_checkpoint=str(sft_path),
        out_dir=str(out_dir),
        num_envs=num_envs,
        rollout_steps=settings.rollout_steps,
        batch_size=settings.batch_size(num_envs),
        update_epochs=settings.update_epochs,
        target_kl=None,
        critic_warmup_iterations=0,
        num_iterations=1_000_000,  # keeps the annealed learning rate away from 0
        eval_episodes=1,
        device=str(settings.device),
        cuda_graph=settings.cuda_graph,
        compile_world=settings.compile_world,
        compile_update=settings.compile_update,
        hidden_size=settings.hidden_size,
        progress=False,
        overwrite=True,
    )
    config.validate()
    run = build_run(config)
    if settings.compile_encoder:
        run.policy.sft_model.compile_encoder()
    run.obs = run.env.reset(seed=config.train_seed_start)
    return run


def world_rate(run: Run, settings: BenchSettings) -> float:
    """World-only steps/s: ``env.step`` driven by the expert's plan, which is computed outside the
    timed part (a trainer never asks for it)."""
    env = run.env
    device = settings.device

    def stepping_seconds() -> float:
        elapsed = 0.0
        for _ in range(settings.rollout_steps):
            plan = env.expert_waypoints()
            _synchronize(device)
            started = time.perf_counter()
            env.step(plan)
            _synchronize(device)
            elapsed += time.perf_counter() - started
        return elapsed

    rate = median_rate_of_timed(stepping_seconds, env.num_envs * settings.rollout_steps, settings.seconds)
    run.obs = env.reset(seed=run.config.train_seed_start)
    return rate


def encoder_rate(run: Run, settings: BenchSettings) -> float:
    """Steps/s of the frozen SFT encoder and waypoint head alone (inference on the worlds' batch):
    every training step runs it once, so it bounds end-to-end training."""
    obs = run.env.reset(seed=run.config.train_seed_start)

    def encode() -> None:
        run.policy.features(obs.bev, obs.state)

    rate = median_rate(encode, run.env.num_envs, settings.seconds, settings.device)
    run.obs = obs
    return rate


def rollout_rate(run: Run, settings: BenchSettings) -> float:
    """Rollout steps/s: ``collect_rollout`` into the run's buffer."""

    def rollout() -> None:
        run.obs, _ = collect_rollout(
            run.policy,
            run.env,
            run.buffer,
            run.obs,
            run.sample_gen,
            run.config.reward_scale,
            cuda_graph=run.config.cuda_graph,
        )

    return median_rate(rollout, run.buffer.size, settings.seconds, settings.device)


def update_rate(run: Run, settings: BenchSettings) -> float:
    """Steps/s of the PPO update alone: ``update_policy`` on the rollout in the run's buffer (the
    last ``rollout_rate`` filled it), in env steps of that rollout."""
    run.buffer.compute_advantages(run.config.gamma, run.config.gae_lambda)

    def update() -> None:
        update_policy(run, critic_only=False)

    return median_rate(update, run.buffer.size, settings.seconds, settings.device)


def train_rate(run: Run, settings: BenchSettings) -> float:
    """End-to-end training steps/s: ``train_iteration`` (rollout + GAE + PPO epochs + metrics)."""

    def iteration() -> None:
        run.iteration += 1
        train_iteration(run)

    return median_rate(iteration, run.buffer.size, settings.seconds, settings.device)


def measure_size(settings: BenchSettings, sft_path: Path, num_envs: int, work_dir: Path) -> dict[str, Any]:
    """Every per-size figure of ``ROW_KEYS`` for ``num_envs`` worlds."""
    reset_peak_memory(settings.device)
    run = build_bench_run(settings, sft_path, num_envs, work_dir / f"rl_{num_envs}")
    row: dict[str, Any] = {"num_envs": num_envs, "batch_size": run.config.batch_size}
    row["world_steps_per_s"] = world_rate(run, settings)
    row["encoder_steps_per_s"] = encoder_rate(run, settings)
    ops = world_ops_per_step(num_envs, str(settings.device), compile_step=settings.compile_world)
    row["world_ops_per_step"], row["world_ops_per_step_mean"] = ops["max"], ops["mean"]
    row["rollout_steps_per_s"] = rollout_rate(run, settings)
    row["update_steps_per_s"] = update_rate(run, settings)
    row["train_steps_per_s"] = train_rate(run, settings)
    # the encoder runs once per step: the CPU's ceiling for both (docs/benchmarks.md)
    row["world_vs_encoder"] = row["world_steps_per_s"] / row["encoder_steps_per_s"]
    row["train_vs_encoder"] = row["train_steps_per_s"] / row["encoder_steps_per_s"]
    row["peak_memory_bytes"] = peak_memory_bytes(settings.device)
    if settings.profile and num_envs == settings.num_envs[-1]:
        print(profile_iteration(run), file=sys.stderr)
    return row


def profile_iteration(run: Run, top: int = 30) -> str:
    """cProfile of one ``train_iteration``: the functions with the most cumulative time."""
    profiler = cProfile.Profile()
    run.iteration += 1
    profiler.enable()
    train_iteration(run)
    profiler.disable()
    text = io.StringIO()
    pstats.Stats(profiler, stream=text).sort_stats("cumulative").print_stats(top)
    return text.getvalue()


# ---------------------------------------------------------------------------------------- once per run
def sft_samples_per_s(
    model: WaypointModel, run: Run, settings: BenchSettings, batch_size: int = 128
) -> float:
    """Behaviour-cloning samples/s: the SFT trainer's step (forward, smooth-L1, backward, clip, AdamW)
    on one batch of the world's observations and expert plans (a copy of the model is trained)."""
    from training.sft.train_waypoint_bc_torch_v0 import SFTTrainConfig, waypoint_loss

    train_config = SFTTrainConfig()
    student = copy.deepcopy(model).to(settings.device).requires_grad_(True).train()
    optimizer = torch.optim.AdamW(
        student.parameters(), lr=train_config.lr, weight_decay=train_config.weight_decay
    )
    obs, expert = run.obs, run.env.expert_waypoints()
    repeats = math.ceil(batch_size / obs.bev.shape[0])
    bev = obs.bev.repeat(repeats, 1, 1, 1)[:batch_size]
    state = obs.state.repeat(repeats, 1)[:batch_size]
    target = expert.repeat(repeats, 1, 1)[:batch_size]

    def step() -> None:
        loss = waypoint_loss(student(bev, state), target, train_config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), train_config.max_grad_norm)
        optimizer.step()

    return median_rate(step, batch_size, settings.seconds, settings.device)


def encoder_cost(model: WaypointModel, run: Run) -> dict[str, float]:
    """FLOPs (counted by ``FlopCounterMode``) and bytes per env step of the frozen model.

    ``bev_bytes``: the uint8 BEV written by the renderer and read by the encoder. ``eager_bytes``: an
    unfused float32 forward's traffic, each activation written once and read once (measured with
    forward hooks), plus the BEV. ``train_flops_per_step``: every counted FLOP of one
    ``train_iteration`` (encoder, heads, PPO epochs) per env step.
    """
    obs = run.obs
    n = obs.bev.shape[0]
    with FlopCounterMode(display=False) as counter:
        model.frozen_features(obs.bev, obs.state)
    encoder_flops = counter.get_total_flops() / n
    with FlopCounterMode(display=False) as counter:
        run.iteration += 1
        train_iteration(run)
    train_flops = counter.get_total_flops() / run.buffer.size

    activation_bytes = [0]

    def count(_module: torch.nn.Module, _inputs: object, output: torch.Tensor) -> None:
        activation_bytes[0] += output.numel() * output.element_size()

    leaves = [m for m in model.modules() if isinstance(m, torch.nn.Conv2d | torch.nn.Linear | torch.nn.ReLU)]
    hooks = [m.register_forward_hook(count) for m in leaves]
    try:
        model.frozen_features(obs.bev, obs.state, precision="fp32")
    finally:
        for hook in hooks:
            hook.remove()
    bev_bytes = obs.bev[0].numel() * obs.bev.element_size()
    float_image_bytes = obs.bev[0].numel() * 4
    return {
        "encoder_flops_per_step": encoder_flops,
        "train_flops_per_step": train_flops,
        "bev_bytes_per_step": float(bev_bytes),
        "eager_bytes_per_step": float(2 * bev_bytes + 2 * float_image_bytes + 2 * activation_bytes[0] / n),
    }


def heads_matmul_flops_per_s(run: Run, settings: BenchSettings) -> float:
    """FLOP/s of the heads' matrix products on the update's minibatch rows (the largest size's): every
    linear layer of both heads, forward, timed together (no other op)."""
    layers = [
        m
        for m in (*run.policy.delta_head.modules(), *run.policy.value_head.modules())
        if isinstance(m, torch.nn.Linear)
    ]
    rows = settings.batch_size(settings.num_envs[-1])
    inputs = [torch.randn(rows, layer.in_features, device=settings.device) for layer in layers]
    flops = sum(2 * rows * layer.in_features * layer.out_features for layer in layers)

    @torch.no_grad()
    def products() -> None:
        for layer, x in zip(layers, inputs, strict=True):
            torch.nn.functional.linear(x, layer.weight, layer.bias)

    return median_rate(products, flops, settings.seconds, settings.device)


def square_matmul_flops_per_s(settings: BenchSettings, size: int = 1024) -> float:
    """FLOP/s of one float32 product of two square ``size`` matrices: about the best the device's
    matrix units give one process, against which ``heads_matmul_flops_per_s`` is read."""
    a, b = (torch.randn(size, size, device=settings.device) for _ in range(2))
    return median_rate(lambda: a @ b, 2 * size**3, settings.seconds, settings.device)


def optimizer_step_seconds(run: Run, settings: BenchSettings) -> float:
    """Seconds of one step of the run's optimizer (the trainer's fused Adam on the CPU and CUDA) over
    copies of the trained parameters, with gradients in place: what every minibatch pays besides the
    heads' products, whatever the rows."""
    params = [torch.nn.Parameter(p.detach().clone()) for p in run.policy.trainable_parameters()]
    for param in params:
        param.grad = torch.randn_like(param) * 1e-3
    optimizer = type(run.optimizer)(params, **run.optimizer.defaults)
    return 1 / median_rate(optimizer.step, 1, settings.seconds, settings.device)


def optimizer_steps_per_env_step(settings: BenchSettings, num_envs: int) -> float:
    """Minibatch steps the update takes per env step of its rollout (every epoch runs)."""
    rollout = num_envs * settings.rollout_steps
    return settings.update_epochs * len(minibatch_bounds(rollout, settings.batch_size(num_envs))) / rollout


def add_arithmetic_bound(
    rows: list[dict[str, Any]],
    settings: BenchSettings,
    heads_flops_per_step: float,
    heads_flops_per_s: float,
    optimizer_step_s: float,
) -> None:
    """Each row's ``train_bound_steps_per_s``: the training rate if a step cost only the frozen encoder,
    the world, the heads' counted FLOPs at ``heads_flops_per_s`` (rollout and update) and the
    optimizer's steps at ``optimizer_step_s`` each (nothing else costing anything); with
    ``bound_vs_encoder`` and ``train_vs_bound``. No training of these heads with this optimizer can
    beat it on this machine, however few operations it issues."""
    heads_seconds = heads_flops_per_step / heads_flops_per_s
    for row in rows:
        optimizer_seconds = optimizer_step_s * optimizer_steps_per_env_step(settings, row["num_envs"])
        seconds = (
            1 / row["encoder_steps_per_s"] + 1 / row["world_steps_per_s"] + heads_seconds + optimizer_seconds
        )
        row["train_bound_steps_per_s"] = 1 / seconds
        row["bound_vs_encoder"] = row["train_bound_steps_per_s"] / row["encoder_steps_per_s"]
        row["train_vs_bound"] = row["train_steps_per_s"] / row["train_bound_steps_per_s"]


def half_precision_error_m(model: WaypointModel, run: Run) -> dict[str, float | None]:
    """Largest waypoint distance (m) of each autocast precision from float32 on this run's observations.

    On CUDA this is the path the frozen encoder takes; elsewhere autocast is off, so the figure is
    an estimate from CPU autocast (the same number formats) and says so in ``half_precision_on``.
    """
    bev, state = run.obs.bev[:ERROR_SAMPLES], run.obs.state[:ERROR_SAMPLES]
    device_type = bev.device.type
    with torch.inference_mode():
        reference = model.head(model.encode(bev, state))
        errors: dict[str, float | None] = {}
        for name, dtype in FROZEN_PRECISIONS.items():
            if dtype is None:
                continue
            with torch.autocast(device_type=device_type, dtype=dtype):
                z = model.encode(bev, state)
            waypoints = model.head(z.float())
            errors[f"{name}_waypoint_error_m"] = (waypoints - reference).norm(dim=-1).max().item()
    return errors


# ---------------------------------------------------------------------------------------- the run
def prepare_sft(settings: BenchSettings, work_dir: Path) -> Path:
    """The SFT checkpoint to benchmark: ``--sft-checkpoint`` or a tiny one trained in seconds."""
    if settings.sft_checkpoint is not None:
        load_sft_model(settings.sft_checkpoint)  # fails early with one line on a bad file
        return Path(settings.sft_checkpoint)
    from training.rl.test_ppo_delta_smoke import make_tiny_sft

    return make_tiny_sft(work_dir / "sft")


def sb3_row(sft_path: Path, settings: BenchSettings, num_envs: int) -> dict[str, float]:
    """Stable-Baselines3 figures for ``num_envs`` Gymnasium views (CPU: SB3 steps worlds on the host)."""
    from benchmarks.sb3_side_by_side import SB3Settings, measure_sb3

    sb3_settings = SB3Settings(
        num_envs=num_envs,
        rollout_steps=settings.rollout_steps,
        batch_size=settings.batch_size(num_envs),
        update_epochs=settings.update_epochs,
        hidden_size=settings.hidden_size,
    )
    result = measure_sb3(load_sft_model(sft_path), sb3_settings, rollouts=1)
    return {
        "sb3_train_steps_per_s": result["train_steps_per_s"],
        "sb3_rollout_steps_per_s": result["rollout_steps_per_s"],
        "sb3_update_share": result["update_share"],
    }


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({torch.get_num_threads()} torch thread)"


def run_benchmark(settings: BenchSettings, work_dir: Path) -> dict[str, Any]:
    """Measure every size; returns the JSON object ``--json`` prints."""
    sft_path = prepare_sft(settings, work_dir)
    rows = []
    for num_envs in settings.num_envs:
        row = measure_size(settings, sft_path, num_envs, work_dir)
        if num_envs <= settings.sb3_max_envs:
            row |= sb3_row(sft_path, settings, num_envs)
            row["train_vs_sb3"] = row["train_steps_per_s"] / row["sb3_train_steps_per_s"]
        rows.append(row)

    # counted under a torch dispatch mode, which compiled graphs cannot run in
    eager = dataclasses.replace(settings, compile_world=False, compile_update=False)
    probe = build_bench_run(eager, sft_path, settings.num_envs[0], work_dir / "probe")
    model = probe.policy.sft_model
    costs = encoder_cost(model, probe)
    heads_rate = heads_matmul_flops_per_s(probe, settings)
    optimizer_step_s = optimizer_step_seconds(probe, settings)
    heads_flops = costs["train_flops_per_step"] - costs["encoder_flops_per_step"]
    add_arithmetic_bound(rows, settings, heads_flops, heads_rate, optimizer_step_s)
    result: dict[str, Any] = {
        "device": str(settings.device),
        "device_name": device_name(settings.device),
        "torch": torch.__version__,
        **{key: value for key, value in rows[-1].items() if key != "peak_memory_bytes"},
        "peak_memory_bytes": max(row["peak_memory_bytes"] for row in rows),
        "peak_memory_kind": "cuda_max_allocated" if settings.device.type == "cuda" else "process_max_rss",
        "rollout_steps": settings.rollout_steps,
        "update_epochs": settings.update_epochs,
        "minibatches": settings.minibatches,
        "compile_encoder": settings.compile_encoder,
        "cuda_graph": settings.cuda_graph,
        "compile_world": settings.compile_world,
        "compile_update": settings.compile_update,
        "hidden_size": settings.hidden_size,
        "sft_train_samples_per_s": sft_samples_per_s(model, probe, settings),
        **costs,
        "heads_matmul_flops_per_s": heads_rate,
        "square_matmul_flops_per_s": square_matmul_flops_per_s(settings),
        "optimizer_step_s": optimizer_step_s,
        **half_precision_error_m(model, probe),
        "half_precision_on": settings.device.type,
        "rows": rows,
    }
    return result


# ---------------------------------------------------------------------------------------- command line
def parse_sizes(text: str) -> list[int]:
    """``"16,64,256"`` -> ``[16, 64, 256]``; a bad list is a ``UserError``."""
    try:
        sizes = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UserError(f"--num-envs must be a comma-separated list of integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise UserError(f"--num-envs needs sizes >= 1, got {text!r}")
    return sizes


def parse_settings(argv: list[str] | None) -> tuple[BenchSettings, bool]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.throughput", description=__doc__)
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    parser.add_argument("--num-envs", default="8,32,128", help="comma-separated world counts to measure")
    parser.add_argument("--seconds", type=float, default=2.0, help="time per measurement and size")
    parser.add_argument("--rollout-steps", type=int, default=32, help="steps per world per rollout")
    parser.add_argument("--minibatches", type=int, default=16, help="PPO minibatches per epoch")
    parser.add_argument("--update-epochs", type=int, default=4, help="PPO epochs per rollout")
    parser.add_argument("--sft-checkpoint", default=None, help="SFT model.pt (default: train a tiny one)")
    parser.add_argument(
        "--sb3-max-envs", type=int, default=32, help="run Stable-Baselines3 for sizes up to this (0: never)"
    )
    parser.add_argument("--compile", action="store_true", help="torch.compile the encoder's convolutions")
    parser.add_argument(
        "--cuda-graph",
        action="store_true",
        help="replay each rollout step as a CUDA graph (CUDA only; docs/benchmarks.md)",
    )
    parser.add_argument(
        "--compile-world",
        action="store_true",
        help="run each world step as one compiled graph, as the trainer's --compile-world does",
    )
    parser.add_argument(
        "--compile-update",
        action="store_true",
        help="compile each PPO minibatch's whole step, as the trainer's --compile-update does",
    )
    parser.add_argument(
        "--hidden-size",
        type=int,
        default=PolicySettings.hidden_size,
        help="width of the delta and value heads' two hidden layers (the trainer's --hidden-size)",
    )
    parser.add_argument(
        "--profile",
        action="store_true",
        help="print a cProfile of one training iteration (largest size) to stderr",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    if not (math.isfinite(args.seconds) and args.seconds >= 0):
        raise UserError(f"--seconds must be >= 0, got {args.seconds}")
    for flag in ("rollout_steps", "minibatches", "update_epochs", "hidden_size"):
        if getattr(args, flag) < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.sb3_max_envs < 0:
        raise UserError(f"--sb3-max-envs must be >= 0, got {args.sb3_max_envs}")
    device = resolve_device(args.device)
    if args.compile_world:
        check_compile_world(["toy"], device, args.device)
    if args.compile_update:
        check_compile_update(device, args.device)
    if args.cuda_graph and device.type != "cuda":
        raise UserError(f"--cuda-graph needs a CUDA device (--device {args.device} gives {device.type})")
    settings = BenchSettings(
        device=device,
        num_envs=sorted(set(parse_sizes(args.num_envs))),
        seconds=args.seconds,
        rollout_steps=args.rollout_steps,
        minibatches=args.minibatches,
        update_epochs=args.update_epochs,
        sft_checkpoint=args.sft_checkpoint,
        sb3_max_envs=args.sb3_max_envs,
        compile_encoder=args.compile,
        profile=args.profile,
        cuda_graph=args.cuda_graph,
        compile_world=args.compile_world,
        compile_update=args.compile_update,
        hidden_size=args.hidden_size,
    )
    return settings, args.json


def format_table(result: dict[str, Any]) -> str:
    """The human-readable report: one line per size, then the once-per-run figures."""
    flags = [
        ("cuda_graph", "rollout step as a CUDA graph"),
        ("compile_world", "compiled world"),
        ("compile_update", "compiled update"),
    ]
    graph = "".join(f", {words}" for key, words in flags if result[key])
    lines = [
        f"device {result['device_name']}, torch {result['torch']}, heads 2 x {result['hidden_size']}{graph}; "
        "env steps/s (median, upper bound of time)",
        f"{'num_envs':>8} {'world':>10} {'encoder':>10} {'rollout':>10} {'update':>10} {'train':>10} "
        f"{'train/enc':>9} {'bound/enc':>9} {'SB3 train':>10} "
        f"{'ratio':>7} {'ops/step':>9} {'peak MiB':>9}",
    ]
    for row in result["rows"]:
        sb3 = row.get("sb3_train_steps_per_s")
        ratio = row.get("train_vs_sb3")
        lines.append(
            f"{row['num_envs']:>8} {row['world_steps_per_s']:>10.0f} {row['encoder_steps_per_s']:>10.0f} "
            f"{row['rollout_steps_per_s']:>10.0f} {row['update_steps_per_s']:>10.0f} "
            f"{row['train_steps_per_s']:>10.0f} {row['train_vs_encoder']:>9.0%} "
            f"{row['bound_vs_encoder']:>9.0%} "
            f"{'-' if sb3 is None else f'{sb3:.0f}':>10} {'-' if ratio is None else f'{ratio:.1f}x':>7} "
            f"{row['world_ops_per_step']:>9} {row['peak_memory_bytes'] / 2**20:>9.0f}"
        )
    lines += [
        f"bound: encoder + world + the heads' counted FLOPs at their matrix products' "
        f"{result['heads_matmul_flops_per_s'] / 1e9:.0f} GFLOP/s (square 1024 products: "
        f"{result['square_matmul_flops_per_s'] / 1e9:.0f}) + the optimizer's steps at "
        f"{result['optimizer_step_s'] * 1e3:.2f} ms each, nothing else costing anything",
        f"SFT training: {result['sft_train_samples_per_s']:.0f} samples/s",
        f"encoder: {result['encoder_flops_per_step'] / 1e6:.2f} MFLOP/step, "
        f"all counted training FLOPs {result['train_flops_per_step'] / 1e6:.2f} MFLOP/step, "
        f"BEV {result['bev_bytes_per_step'] / 1e3:.1f} kB/step, eager fp32 traffic "
        f"{result['eager_bytes_per_step'] / 1e3:.0f} kB/step",
        f"waypoint error vs fp32 ({result['half_precision_on']} autocast): "
        f"fp16 {result['fp16_waypoint_error_m'] * 100:.2f} cm, "
        f"bf16 {result['bf16_waypoint_error_m'] * 100:.2f} cm",
    ]
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> dict[str, Any]:
    settings, as_json = parse_settings(argv)
    set_cpu_threads(1)
    with tempfile.TemporaryDirectory(prefix="throughput-") as tmp:
        result = run_benchmark(settings, Path(tmp))
    print(json.dumps(result) if as_json else format_table(result))
    return result


if __name__ == "__main__":
    main()
