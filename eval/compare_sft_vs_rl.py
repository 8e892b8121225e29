"""Paired closed-loop comparison of an SFT model and its RL refinement, with a report.

    python -m eval.compare_sft_vs_rl --sft-checkpoint out/sft_waypoint_bc_torch_v0/model.pt \\
        --rl-checkpoint out/rl_delta_ppo_v0/final.pt

Both policies drive exactly the same held-out scenarios (same seeds, same roads, same traffic),
deterministically. Writes ``compare.json``, ``compare.md``, PNG plots and side-by-side animations
of the worst SFT scenarios (``animations/seed_<S>.mp4``, GIF without an MP4 encoder), and prints
the table.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from eval.animation import VIDEO_FORMATS, animate_worst_scenarios, video_suffix
from eval.closed_loop import MAX_WORLDS, ClosedLoopResult, collisions_closed_by, run_closed_loop
from eval.metrics import add_shared_window_errors, compare_paired, summarise
from eval.plots import plot_ade_distribution, plot_episodes, plot_metric_bars, plot_training_curves
from eval.report import format_table, write_report
from training.common.cli import config_field, console_script, parse_config, require
from training.common.device import resolve_device, set_cpu_threads
from training.common.errors import UserError, exit_on_user_error
from training.common.io import ensure_writable_dir, file_sha256
from training.common.seeds import DEV_SEED_START, RL_TRAIN_SEED_START, TEST_SEED_START, split_of
from training.envs.capacity import default_worlds
from training.envs.options import EnvOptions, SimulatorFlags
from training.envs.protocol import BatchedWaypointEnv
from training.envs.registry import check_env_choice, make_env
from training.rl.checkpoint import load_rl_checkpoint, trained_policy
from training.rl.policy import PPOPolicy
from training.sft.external import parse_factory_spec, read_sft


@dataclass
class CompareConfig(SimulatorFlags):
    """Settings of one SFT-vs-RL comparison."""

    sft_checkpoint: str = config_field(
        dataclasses.MISSING,
        "SFT model: this project's model.pt, a torch.export .pt2 or TorchScript file, or with --sft-model "
        "a state_dict",
    )
    rl_checkpoint: str = config_field(
        dataclasses.MISSING, "RL checkpoint (final.pt) trained from that SFT model"
    )
    sft_model: str | None = config_field(
        None,
        "your own SFT architecture: FACTORY() in MODULE returns the nn.Module and --sft-checkpoint is its "
        "state_dict (default: the RL run's --sft-model)",
        metavar="MODULE:FACTORY",
    )
    env: str = config_field("toy", "environment: toy, metadrive or carla")
    episodes: int = config_field(100, "scenarios, each driven by both policies", "episodes")
    worlds: int | None = config_field(
        None,
        "worlds that drive them, each going on to the next scenario when its episode ends "
        f"(default: one per episode up to {MAX_WORLDS}; with a simulator that runs a process per world, "
        "as many as the machine runs well)",
    )
    seed: int = config_field(
        TEST_SEED_START,
        "first scenario seed: the test range, which no training, evaluation or tuning sees "
        f"(the development range starts at {DEV_SEED_START})",
    )
    out_dir: str | None = config_field(None, "output folder (default: compare/ next to the RL checkpoint)")
    device: str = config_field("auto", "auto, cpu, cuda or cuda:N")
    num_threads: int = config_field(1, "torch CPU threads (small ops run fastest on 1; 0: torch's default)")
    difficulty: float | None = config_field(None, "toy world difficulty (default: the RL run's)")
    allow_mismatch: bool = config_field(
        False, "compare even if the RL run was trained from another SFT model"
    )
    bootstrap_resamples: int = config_field(2000, "bootstrap resamples for the confidence intervals")
    plot_episodes: int = config_field(4, "episodes drawn from above in episodes.png")
    animations: int = config_field(
        3, "scenarios animated side by side, SFT | RL, worst SFT episodes first (0: none)"
    )
    animation_format: str = config_field(
        "auto", "animations as mp4, gif, or auto (MP4 where imageio-ffmpeg is installed, else GIF)"
    )

    def validate(self) -> None:
        if self.sft_model is not None:
            parse_factory_spec(self.sft_model)
        require(self.episodes >= 1, f"--episodes must be >= 1, got {self.episodes}")
        require(self.worlds is None or self.worlds >= 1, f"--worlds must be >= 1, got {self.worlds}")
        require(
            self.seed >= DEV_SEED_START and self.seed + self.episodes <= RL_TRAIN_SEED_START,
            f"--seed must be in [{DEV_SEED_START}, {RL_TRAIN_SEED_START - self.episodes}] so the scenarios "
            "are held out from training (development range, or the test range from "
            f"{TEST_SEED_START})",
        )
        require(self.difficulty is None or 0 <= self.difficulty <= 1, "--difficulty must be in [0, 1]")
        require(self.bootstrap_resamples >= 100, "--bootstrap-resamples must be >= 100")
        require(self.plot_episodes >= 0, "--plot-episodes must be >= 0")
        require(self.animations >= 0, f"--animations must be >= 0, got {self.animations}")
        require(
            self.animation_format in VIDEO_FORMATS,
            f"--animation-format must be one of {', '.join(VIDEO_FORMATS)}, got {self.animation_format!r}",
        )
        if self.animations:
            video_suffix(self.animation_format)  # mp4 without an encoder fails here, before any output
        require(self.num_threads >= 0, f"--num-threads must be >= 0, got {self.num_threads}")
        check_env_choice(self.env)
        self.validate_simulator_flags()

    def resolved_out_dir(self) -> Path:
        return Path(self.out_dir) if self.out_dir else Path(self.rl_checkpoint).resolve().parent / "compare"


def check_pair(config: CompareConfig, rl_checkpoint: dict[str, Any]) -> str:
    """The RL run must have been trained from this SFT checkpoint (sha256), unless allowed."""
    sft_sha = file_sha256(config.sft_checkpoint)
    if rl_checkpoint["sft_sha256"] != sft_sha and not config.allow_mismatch:
        raise UserError(
            f"{config.rl_checkpoint} was trained from another SFT checkpoint "
            f"({rl_checkpoint.get('sft_checkpoint', '?')}, sha256 {rl_checkpoint['sft_sha256'][:12]}...) "
            f"than {config.sft_checkpoint} (sha256 {sft_sha[:12]}...); "
            "pass --allow-mismatch to compare anyway"
        )
    return sft_sha


def drive(env: Any, policy_fn: Any, config: CompareConfig) -> ClosedLoopResult:
    return run_closed_loop(
        env,
        policy_fn,
        seed=config.seed,
        num_episodes=config.episodes,
        record_trajectories=config.plot_episodes,
    )


def _read_run_metrics(rl_checkpoint: Path) -> tuple[list[dict], list[dict]]:
    """The RL run's ``train_metrics.json`` and ``eval_metrics.json`` when they sit beside it."""
    records = []
    for name in ("train_metrics.json", "eval_metrics.json"):
        path = rl_checkpoint.parent / name
        try:
            records.append(json.loads(path.read_text()))
        except (OSError, json.JSONDecodeError):
            records.append([])
    return records[0], records[1]


def make_plots(
    out_dir: Path,
    config: CompareConfig,
    rows: list,
    sft: ClosedLoopResult,
    rl: ClosedLoopResult,
    env: BatchedWaypointEnv,
) -> dict[str, Path]:
    plots_dir = out_dir / "plots"
    plots = {
        "Metrics with 95% intervals of the paired difference": plot_metric_bars(rows, plots_dir / "bars.png"),
        "ADE per episode": plot_ade_distribution(
            [e["ade"] for e in sft.episodes],
            [e["ade"] for e in rl.episodes],
            plots_dir / "ade_distribution.png",
        ),
    }
    train, evals = _read_run_metrics(Path(config.rl_checkpoint))
    if train or evals:
        plots["Training curves of the RL run"] = plot_training_curves(
            train, evals, plots_dir / "training_curves.png"
        )
    if sft.trajectories:
        route_xy = env.route_xy_for_seeds([t["scenario_seed"] for t in sft.trajectories])
        routes = None if route_xy is None else list(route_xy.cpu().numpy())
        plots["Episodes from above (SFT vs RL)"] = plot_episodes(
            sft.trajectories, rl.trajectories, plots_dir / "episodes.png", route_xy=routes
        )
    return plots


def make_animations(
    out_dir: Path,
    config: CompareConfig,
    options: EnvOptions,
    device: torch.device,
    sft_model: torch.nn.Module,
    policy: PPOPolicy,
    sft_episodes: list[dict[str, Any]],
) -> dict[str, Path]:
    """``--animations`` SFT | RL videos of the worst SFT scenarios, driven again with recording in
    a one-world environment of their own (a world is cheapest alone); caption -> path."""
    if config.animations == 0:
        return {}
    env = make_env(config.env, 1, device, options=options)
    try:
        return animate_worst_scenarios(
            env,
            lambda obs: sft_model(obs.bev, obs.state),
            lambda obs: policy.deterministic_waypoints(obs.bev, obs.state),
            sft_episodes,
            out_dir / "animations",
            count=config.animations,
            video_format=config.animation_format,
        )
    finally:
        env.close()


def compare(config: CompareConfig) -> dict[str, Any]:
    """Run the comparison and write the report; returns paths and the rows."""
    config.validate()
    set_cpu_threads(config.num_threads)
    device = resolve_device(config.device)
    rl_checkpoint = load_rl_checkpoint(config.rl_checkpoint)
    recorded_sft_model = rl_checkpoint["config"].get("sft_model")
    # read and checked before it is hashed; a state_dict's architecture defaults to the RL run's
    sft_source = read_sft(
        config.sft_checkpoint, config.sft_model, device, default_sft_model=recorded_sft_model
    )
    sft_sha = check_pair(config, rl_checkpoint)
    difficulty = config.difficulty
    if difficulty is None:
        difficulty = rl_checkpoint["config"].get("difficulty")
    # the RL run's reward, so that episode returns are the ones it trained on
    trained = rl_checkpoint["config"]
    options = dataclasses.replace(
        config.env_options(difficulty),
        reward=trained.get("reward", "shaped"),
        collision_penalty=trained.get("collision_penalty"),
        off_road_penalty=trained.get("off_road_penalty"),
    )
    env = make_env(
        config.env,
        min(config.episodes, default_worlds(config.env, config.worlds, MAX_WORLDS, "--worlds", "driving")),
        device,
        options=options,
    )
    try:
        sft_model = sft_source.for_env(env.spec)  # the model's shapes against the environment's
        policy = trained_policy(rl_checkpoint, sft_model)  # freezes sft_model, which then drives as SFT too
        out_dir = ensure_writable_dir(config.resolved_out_dir())
        with torch.inference_mode():
            sft = drive(env, lambda obs: sft_model(obs.bev, obs.state), config)
            # read before RL plays the same seeds (the env keeps one report per seed)
            sft_collisions = collisions_closed_by(env.collision_reports(), sft.episodes)
            rl = drive(env, lambda obs: policy.deterministic_waypoints(obs.bev, obs.state), config)
            rl_collisions = collisions_closed_by(env.collision_reports(), rl.episodes)
        add_shared_window_errors((sft.episodes, sft.step_errors), (rl.episodes, rl.step_errors))
        rows = compare_paired(sft.episodes, rl.episodes, num_resamples=config.bootstrap_resamples, seed=0)
        plots = make_plots(out_dir, config, rows, sft, rl, env)
    finally:
        env.close()
    metadata = {
        "sft_checkpoint": config.sft_checkpoint,
        "sft_sha256": sft_sha,
        "sft_model": sft_source.sft_model,
        "rl_checkpoint": config.rl_checkpoint,
        "rl_iterations": rl_checkpoint.get("iteration"),
        "rl_selected_iteration": rl_checkpoint.get("selected_iteration"),
        "env": config.env,
        "difficulty": difficulty,
        "episodes": config.episodes,
        "first_scenario_seed": config.seed,
        "seed_split": split_of(config.seed),
        "device": str(device),
        "sft_wall_time_s": sft.wall_time_s,
        "rl_wall_time_s": rl.wall_time_s,
    }
    if sft_collisions is not None and rl_collisions is not None:
        metadata["sft_collisions_closed_by"] = sft_collisions
        metadata["rl_collisions_closed_by"] = rl_collisions
    report = functools.partial(
        write_report,
        out_dir,
        rows,
        summarise(sft.episodes),
        summarise(rl.episodes),
        sft.episodes,
        rl.episodes,
        metadata,
        plots,
    )
    json_path, md_path = report()  # first without videos: an encoder failure cannot cost the report
    animations = make_animations(out_dir, config, options, device, sft_model, policy, sft.episodes)
    if animations:
        report(animations)
    return {"rows": rows, "compare_json": json_path, "compare_md": md_path, "metadata": metadata}


def provenance(metadata: dict[str, Any]) -> str:
    """Which scenarios and which RL policy the numbers come from, in one line."""
    selected, last = metadata.get("rl_selected_iteration"), metadata.get("rl_iterations")
    policy = f"the RL checkpoint holds iteration {selected} of {last}" if selected is not None else ""
    if selected == 0:
        policy += " (the SFT policy itself: no evaluated iteration was better without being worse)"
    first_seed = metadata["first_scenario_seed"]
    scenarios = f"{metadata['episodes']} {metadata['seed_split']} scenarios from seed {first_seed}"
    return f"{scenarios}; {policy}" if policy else scenarios


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = parse_config(
        CompareConfig,
        argv,
        prog="python -m eval.compare_sft_vs_rl",
        description="Paired closed-loop comparison of an SFT model and its RL refinement.",
    )
    result = compare(config)
    print(format_table(result["rows"]))
    print(f"\n{provenance(result['metadata'])}")
    collisions = collisions_line(result["metadata"])
    if collisions:
        print(collisions)
    print(f"report: {result['compare_md']}\nnumbers: {result['compare_json']}", file=sys.stdout)
    return result


def collisions_line(metadata: dict[str, Any]) -> str:
    """Who was moving into whom in each policy's collisions, in one line ("" when the env does not tell)."""
    if "sft_collisions_closed_by" not in metadata:
        return ""
    parts = []
    for policy in ("sft", "rl"):
        counts = metadata[f"{policy}_collisions_closed_by"]
        described = ", ".join(f"{count} {who}" for who, count in counts.items() if count)
        parts.append(f"{policy.upper()} {sum(counts.values())} ({described or 'none'})")
    return "collisions by who closed the gap: " + "; ".join(parts)


cli = console_script(main)  # the console script; `python -m` stays the documented form

if __name__ == "__main__":
    main()
