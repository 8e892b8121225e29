"""Pictures of the toy world: BEV rasters in colour and PNG strips of an episode with the plans.

``bev_to_rgb`` colours a BEV raster; ``save_episode_strip`` draws a few frames side by side with
the expert's and a model's waypoints; ``record_episode_strip`` plays one episode and saves its
strip (``record_episode_animation``: as a video). From the command line::

    python -m training.envs.toy.viz --out out/toy_episode.png [--seed 0] [--sft-checkpoint model.pt]

With ``--sft-checkpoint`` the SFT model drives and its waypoints are drawn next to the expert's;
without it the expert drives; with ``--rl-checkpoint`` too, the RL policy refining that model drives.
An ``--out`` ending in ``.mp4`` or ``.gif`` writes the episode as an animation instead (every
step: the BEV, the expert's plan, the SFT plan, the RL's final plan, how it ended), drawn by
:mod:`eval.animation` as the comparison's are.
"""

from __future__ import annotations

import dataclasses
import io
import math
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from training.common.cli import config_field, parse_config, require
from training.common.errors import UserError, exit_on_user_error
from training.common.io import atomic_write_bytes
from training.envs.protocol import Observation
from training.envs.toy.config import BEV_CHANNELS, ToyWorldConfig

if TYPE_CHECKING:
    from matplotlib.axes import Axes

# Colours (RGB 0..255) of the BEV layers, drawn in this order over the background.
BACKGROUND_RGB = (24, 28, 24)
DRIVABLE_RGB = (105, 105, 105)
ROUTE_RGB = (240, 210, 60)
OBSTACLE_RGB = (60, 110, 235)
VEHICLE_RGB = (225, 45, 45)
EXPERT_COLOUR = "#32e07a"
MODEL_COLOUR = "#ff4fd8"
EGO_COLOUR = "white"

PolicyFn = Callable[[Observation], torch.Tensor]  # obs of one world -> waypoints [1, K, 2]


def bev_to_rgb(bev: np.ndarray | torch.Tensor) -> np.ndarray:
    """Colour a BEV raster uint8 ``[C, H, W]`` (channels ``BEV_CHANNELS``) as RGB uint8 ``[H, W, 3]``.

    Drivable area grey, route centre line yellow (blended by its anti-aliasing weight), parked
    obstacles blue and oncoming vehicles red, on a dark background.
    """
    if isinstance(bev, torch.Tensor):
        bev = bev.detach().cpu().numpy()
    bev = np.asarray(bev)
    if bev.ndim != 3 or bev.shape[0] != len(BEV_CHANNELS):
        raise ValueError(f"bev must be [{len(BEV_CHANNELS)}, H, W], got {list(bev.shape)}")
    drivable, route, vehicles, obstacles = (bev[i].astype(np.float32) / 255.0 for i in range(4))
    height, width = bev.shape[1:]
    rgb = np.empty((height, width, 3), dtype=np.float32)
    rgb[:] = BACKGROUND_RGB
    for layer, colour in (
        (drivable, DRIVABLE_RGB),
        (route, ROUTE_RGB),
        (obstacles, OBSTACLE_RGB),
        (vehicles, VEHICLE_RGB),
    ):
        alpha = layer[..., None]
        rgb = rgb * (1.0 - alpha) + np.asarray(colour, dtype=np.float32) * alpha
    return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)


def ego_to_pixel(points_ego_m: np.ndarray, cfg: ToyWorldConfig) -> tuple[np.ndarray, np.ndarray]:
    """Continuous (row, col) of ego-frame points ``[..., 2]`` (metres), the renderer's convention.

    Pixel ``(i, j)`` spans ``[i, i+1) x [j, j+1)``: ``row = ego_row - x / res``,
    ``col = W / 2 - y / res``.
    """
    points = np.asarray(points_ego_m, dtype=np.float64)
    res = cfg.bev_resolution_m
    return cfg.bev_ego_row - points[..., 0] / res, cfg.bev_size_px / 2 - points[..., 1] / res


def _as_numpy(array: np.ndarray | torch.Tensor) -> np.ndarray:
    if isinstance(array, torch.Tensor):
        return array.detach().cpu().numpy()
    return np.asarray(array)


def _draw_plan(ax: Axes, waypoints: np.ndarray, cfg: ToyWorldConfig, colour: str, label: str) -> None:
    """A plan ``[K, 2]`` as a polyline from the ego's rear axle through its waypoints."""
    points = np.concatenate([np.zeros((1, 2)), np.asarray(waypoints, dtype=np.float64).reshape(-1, 2)])
    points = points[np.isfinite(points).all(axis=1)]
    row, col = ego_to_pixel(points, cfg)
    ax.plot(col, row, "-", color=colour, linewidth=1.0, alpha=0.8)
    ax.plot(col[1:], row[1:], "o", color=colour, markersize=2.5, label=label)


def _draw_ego(ax: Axes, cfg: ToyWorldConfig) -> None:
    """The ego's outline (rear axle at ``bev_ego_row``, facing up)."""
    from matplotlib.patches import Rectangle

    res = cfg.bev_resolution_m
    front = cfg.length_m - cfg.rear_overhang_m
    col0 = cfg.bev_size_px / 2 - cfg.width_m / 2 / res
    row0 = cfg.bev_ego_row - front / res
    ax.add_patch(
        Rectangle((col0, row0), cfg.width_m / res, cfg.length_m / res, fill=False, color=EGO_COLOUR, lw=0.8)
    )


def save_episode_strip(
    path: str | Path,
    frames: Sequence[np.ndarray | torch.Tensor],
    expert_waypoints: Sequence[np.ndarray | torch.Tensor],
    model_waypoints: Sequence[np.ndarray | torch.Tensor] | None,
    cfg: ToyWorldConfig,
    every: int = 1,
    max_frames: int = 10,
    title: str | None = None,
) -> Path:
    """Write a PNG strip, one panel per frame, with the plans drawn on the coloured BEV.

    Args:
        path: the PNG to write (atomically; parent folders are created).
        frames: BEV rasters uint8 ``[C, H, W]``, one per policy step.
        expert_waypoints: the expert's plan ``[K, 2]`` (metres, ego frame) for each frame.
        model_waypoints: the model's plan ``[K, 2]`` for each frame, or ``None``.
        cfg: the world's settings (BEV resolution and ego row place the waypoints).
        every: draw every ``every``-th frame, starting with the first.
        max_frames: at most this many panels.
        title: optional heading over the strip.

    Raises:
        ValueError: no frames, lists of different lengths, ``every`` or ``max_frames`` below 1.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    if len(frames) == 0:
        raise ValueError("no frames to draw")
    if len(expert_waypoints) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(expert_waypoints)} expert plans")
    if model_waypoints is not None and len(model_waypoints) != len(frames):
        raise ValueError(f"{len(frames)} frames but {len(model_waypoints)} model plans")
    if every < 1 or max_frames < 1:
        raise ValueError("every and max_frames must be >= 1")
    picks = list(range(0, len(frames), every))[:max_frames]

    size = cfg.bev_size_px
    fig = Figure(figsize=(2.2 * len(picks), 2.6 if title else 2.4), dpi=100)
    axes = fig.subplots(1, len(picks), squeeze=False)[0]
    for panel, (ax, index) in enumerate(zip(axes, picks, strict=True)):
        rgb = bev_to_rgb(frames[index])
        # extent: pixel (i, j) covers [i, i+1) x [j, j+1), so continuous (row, col) plot in place.
        ax.imshow(rgb, extent=(0, rgb.shape[1], rgb.shape[0], 0), interpolation="nearest")
        _draw_ego(ax, cfg)
        _draw_plan(ax, _as_numpy(expert_waypoints[index]), cfg, EXPERT_COLOUR, "expert")
        if model_waypoints is not None:
            _draw_plan(ax, _as_numpy(model_waypoints[index]), cfg, MODEL_COLOUR, "model")
        ax.set_xlim(0, size)
        ax.set_ylim(size, 0)
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_title(f"step {index}", fontsize=8)
        if panel == 0:
            ax.legend(loc="lower left", fontsize=6, framealpha=0.6, handletextpad=0.2, borderpad=0.2)
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write_bytes(path, buffer.getvalue())
    return Path(path)


def record_episode_strip(
    path: str | Path,
    policy_fn: PolicyFn | None = None,
    seed: int = 0,
    difficulty: float = 0.5,
    device: str | torch.device = "cpu",
    max_frames: int = 10,
    config: ToyWorldConfig | None = None,
) -> dict[str, float | bool | int]:
    """Play one episode of the toy world and save its strip to ``path``.

    Args:
        policy_fn: ``policy_fn(obs) -> waypoints [1, K, 2]`` (metres, ego frame) for an
            ``Observation`` of one world; ``None`` lets the expert drive (and no model plan is drawn).
        seed: the scenario seed.
        difficulty: the world's difficulty (0..1).
        device: where the world runs.
        max_frames: panels in the strip, spread evenly over the episode.
        config: the world's settings (``num_envs`` and ``difficulty`` are overridden).

    Returns:
        The episode's statistics: return, length, route completion, collision, off-road, goal.
    """
    from training.envs.toy.world import ToyWaypointEnv

    cfg = dataclasses.replace(config or ToyWorldConfig(), num_envs=1, difficulty=difficulty)
    env = ToyWaypointEnv(cfg, device=device)
    obs = env.reset(seed=seed)
    expert = env.expert_waypoints()
    frames, expert_plans, model_plans = [], [], []
    with torch.inference_mode():
        while True:
            action = expert if policy_fn is None else policy_fn(obs)
            frames.append(obs.bev[0].cpu().numpy())
            expert_plans.append(expert[0].cpu().numpy())
            model_plans.append(action[0].detach().cpu().numpy())
            obs, _, _, _, info = env.step(action)
            expert = info.expert_waypoints
            if bool(info.episode.done[0]):
                break
    episode = info.episode
    stats: dict[str, float | bool | int] = {
        "episode_return": float(episode.episode_return[0]),
        "episode_length": int(episode.length[0]),
        "route_completion": float(episode.route_completion[0]),
        "collision": bool(episode.collision[0]),
        "off_road": bool(episode.off_road[0]),
        "goal_reached": bool(episode.goal_reached[0]),
    }
    outcome = (
        "goal"
        if stats["goal_reached"]
        else "collision"
        if stats["collision"]
        else ("off-road" if stats["off_road"] else "time limit")
    )
    title = (
        f"seed {seed}, difficulty {difficulty:g}: {outcome} after {stats['episode_length']} steps, "
        f"route {100 * float(stats['route_completion']):.0f}%, return {stats['episode_return']:.1f}"
    )
    every = max(1, math.ceil(len(frames) / max_frames))
    save_episode_strip(
        path,
        frames,
        expert_plans,
        None if policy_fn is None else model_plans,
        cfg,
        every=every,
        max_frames=max_frames,
        title=title,
    )
    return stats


def record_episode_animation(
    path: str | Path,
    policy_fn: PolicyFn | None = None,
    reference_fn: PolicyFn | None = None,
    seed: int = 0,
    difficulty: float = 0.5,
    device: str | torch.device = "cpu",
    config: ToyWorldConfig | None = None,
) -> dict[str, float | bool | int]:
    """Play one episode of the toy world and save it as an animation (``.mp4`` or ``.gif``).

    ``policy_fn`` drives as in :func:`record_episode_strip` (``None``: the expert); the plan of
    ``reference_fn`` (the SFT model under an RL policy) is drawn too. Returns the episode's statistics.
    """
    from eval.animation import animate_episode  # lazily: eval.animation draws with this module
    from training.envs.toy.world import ToyWaypointEnv

    cfg = dataclasses.replace(config or ToyWorldConfig(), num_envs=1, difficulty=difficulty)
    driver = "expert" if policy_fn is None else ("RL" if reference_fn is not None else "SFT")
    label = f"{driver} driving, difficulty {difficulty:g}"
    env = ToyWaypointEnv(cfg, device=device)
    return animate_episode(path, env, policy_fn, seed, cfg, reference_fn=reference_fn, label=label)


# ---------------------------------------------------------------------- command line
@dataclasses.dataclass
class VizConfig:
    """Settings of ``python -m training.envs.toy.viz``."""

    out: str = config_field(
        dataclasses.MISSING, "PNG file to write the episode strip to, or .mp4/.gif for an animation"
    )
    seed: int = config_field(0, "scenario seed of the episode")
    difficulty: float = config_field(0.5, "toy world difficulty, 0..1")
    sft_checkpoint: str | None = config_field(
        None,
        "SFT model (model.pt, a torch.export or TorchScript file, or with --sft-model a state_dict): it "
        "drives and its waypoints are drawn (default: the expert drives)",
    )
    sft_model: str | None = config_field(
        None,
        "your own SFT architecture: FACTORY() in MODULE returns the nn.Module and --sft-checkpoint is its "
        "state_dict (default: the RL run's --sft-model)",
        metavar="MODULE:FACTORY",
    )
    rl_checkpoint: str | None = config_field(
        None, "RL checkpoint (final.pt) refining --sft-checkpoint: it drives and its final plan is drawn"
    )
    device: str = config_field("cpu", "torch device of the world and the model (cpu, cuda)")
    max_frames: int = config_field(10, "panels in the strip")

    def validate(self) -> None:
        require(bool(self.out), "--out must name the PNG file to write")
        require(0.0 <= self.difficulty <= 1.0, f"--difficulty must be in [0, 1], got {self.difficulty}")
        require(self.max_frames >= 1, f"--max-frames must be >= 1, got {self.max_frames}")
        require(self.seed >= 0, f"--seed must be >= 0, got {self.seed}")
        require(
            self.rl_checkpoint is None or self.sft_checkpoint is not None,
            "--rl-checkpoint needs the --sft-checkpoint it refines",
        )
        require(
            self.sft_model is None or self.sft_checkpoint is not None, "--sft-model needs --sft-checkpoint"
        )


def _resolve_device(name: str) -> torch.device:
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise UserError(f"--device {name!r} is not a torch device ({err})") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name} asked for but CUDA is not available")
    return device


def _sft_model(config: VizConfig, device: torch.device, cfg: ToyWorldConfig) -> torch.nn.Module:
    """The SFT model of ``--sft-checkpoint`` (any form the three commands read), checked against
    the toy world's observation and action shapes; frozen."""
    from training.envs.toy.config import shared_layout_spec
    from training.sft.external import read_sft  # lazily: the SFT package is optional for this tool

    recorded = None
    if config.rl_checkpoint is not None:  # a state_dict's architecture defaults to the RL run's
        from training.rl.checkpoint import load_rl_checkpoint

        recorded = load_rl_checkpoint(config.rl_checkpoint)["config"].get("sft_model")
    spec = shared_layout_spec(
        cfg.bev_size_px, cfg.num_waypoints, cfg.waypoint_dt, cfg.policy_dt, cfg.max_episode_steps
    )
    source = read_sft(config.sft_checkpoint, config.sft_model, device, default_sft_model=recorded)
    return source.for_env(spec).requires_grad_(False)


def _driving(model: torch.nn.Module) -> PolicyFn:
    """``policy_fn`` driving with the plan of the SFT ``model``."""
    return lambda obs: model(obs.bev, obs.state)


def _rl_policy(rl_checkpoint: str, sft_checkpoint: str, sft_model: torch.nn.Module) -> PolicyFn:
    """``policy_fn`` driving with the deterministic plan of the RL policy saved at ``rl_checkpoint``,
    which must have been trained from ``sft_checkpoint`` (read as ``sft_model``)."""
    from training.common.io import file_sha256
    from training.rl.checkpoint import load_rl_checkpoint, trained_policy

    checkpoint = load_rl_checkpoint(rl_checkpoint)
    if checkpoint["sft_sha256"] != file_sha256(sft_checkpoint):
        raise UserError(f"{rl_checkpoint} was trained from another SFT checkpoint than {sft_checkpoint}")
    policy = trained_policy(checkpoint, sft_model)

    def plan(obs: Observation) -> torch.Tensor:
        return policy.deterministic_waypoints(obs.bev, obs.state)

    return plan


def _is_video(path: str) -> bool:
    from eval.animation import VIDEO_SUFFIXES  # lazily: eval.animation draws with this module

    return Path(path).suffix.lower() in VIDEO_SUFFIXES


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> int:
    config = parse_config(
        VizConfig, argv, prog="python -m training.envs.toy.viz", description=__doc__.splitlines()[0]
    )
    device = _resolve_device(config.device)
    world_cfg = ToyWorldConfig(num_envs=1, difficulty=config.difficulty)
    policy = reference = None
    if config.sft_checkpoint is not None:
        sft_model = _sft_model(config, device, world_cfg)
        policy = _driving(sft_model)
    if config.rl_checkpoint is not None:  # RL drives; the SFT plan it refines is drawn beside its own
        reference, policy = policy, _rl_policy(config.rl_checkpoint, config.sft_checkpoint, sft_model)
    try:
        if _is_video(config.out):
            stats = record_episode_animation(
                config.out, policy, reference, config.seed, config.difficulty, device, world_cfg
            )
        else:
            stats = record_episode_strip(
                config.out,
                policy,
                seed=config.seed,
                difficulty=config.difficulty,
                device=device,
                max_frames=config.max_frames,
                config=world_cfg,
            )
    except OSError as err:
        raise UserError(f"cannot write {config.out} ({err.strerror or err})") from None
    summary = ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in stats.items())
    print(f"wrote {config.out} ({summary})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
