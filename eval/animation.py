"""Animations of episodes: the BEV, the plans and how the episode ended, as MP4 or GIF.

The comparison calls :func:`animate_worst_scenarios`: the scenarios whose SFT episode went worst
are driven again, one world at a time, by SFT and by RL, and each becomes one video of two
panels side by side (SFT | RL), each showing the observed BEV with the expert's plan, the SFT
plan and (under RL) the final plan, a step counter and, on the frame after the last step, the
outcome (a red border where the episode ended in a collision or off the road).
``python -m training.envs.toy.viz --out episode.mp4`` writes the same for one policy through
:func:`animate_episode`.

Only the environment protocol is used (observations' BEV, the plans, ``info.episode``), so the
same code draws MetaDrive and CARLA episodes, which share the toy world's BEV layout. Videos are
MP4 (H.264) where the ffmpeg binary of ``imageio-ffmpeg`` is installed, GIF (Pillow) otherwise.
"""

from __future__ import annotations

import io
import math
import tempfile
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from training.common.errors import UserError
from training.common.io import atomic_write_bytes
from training.envs.protocol import BatchedWaypointEnv, EnvSpec, EpisodeStats, Observation
from training.envs.toy.config import BEV_CHANNELS, ToyWorldConfig
from training.envs.toy.viz import EGO_COLOUR, EXPERT_COLOUR, MODEL_COLOUR, bev_to_rgb, ego_to_pixel

PlanFn = Callable[[Observation], torch.Tensor]  # observation batch -> waypoints [N, K, 2], metres

VIDEO_FORMATS = ("auto", "mp4", "gif")
VIDEO_SUFFIXES = (".mp4", ".gif")
PANEL_SCALE = 4  # screen pixels per BEV pixel (64 px BEV -> 256 px panel)
PLAYBACK_SPEED = 2.0  # simulated seconds per second of video
MP4_QUALITY = 7  # imageio-ffmpeg's 0..10 scale
SFT_PLAN_COLOUR = MODEL_COLOUR
FINAL_PLAN_COLOUR = "#ff9d1c"
INFRACTION_COLOUR = "#ff3030"
GOAL_COLOUR = "#32e07a"
TEXT_COLOUR = "#f0f0f0"
FRAME_BACKGROUND = "#101210"
MARGIN_PX = 8
LINE_PX = 18  # height of one line of text
FONT_PX = 13
BORDER_PX = 4  # the red border of an infraction frame
INFRACTIONS = ("collision", "off-road")
OUTCOME_COLOURS = {
    "collision": INFRACTION_COLOUR,
    "off-road": INFRACTION_COLOUR,
    "goal": GOAL_COLOUR,
    "time limit": TEXT_COLOUR,
}
NO_MP4_ENCODER = (
    "MP4 needs the ffmpeg binary of imageio-ffmpeg (pip install imageio-ffmpeg); a .gif needs none"
)


# ---------------------------------------------------------------------- the comparison's entry
def animate_worst_scenarios(
    env: BatchedWaypointEnv,
    sft_fn: PlanFn,
    rl_fn: PlanFn,
    sft_episodes: Sequence[Mapping[str, Any]],
    out_dir: Path,
    count: int,
    video_format: str = "auto",
) -> dict[str, Path]:
    """One SFT | RL video per scenario for the ``count`` worst SFT episodes; caption -> path.

    The scenarios are driven again (world 0 of ``env.reset(seed)``) with recording, so the
    comparison itself keeps no frames. Files are ``out_dir/seed_<S>.mp4`` (or ``.gif``). Where the
    environment's BEV is not the toy world's layout, one line says so and nothing is written.
    """
    if count < 1:
        return {}
    if reason := undrawable(env.spec):
        print(f"animations skipped: {reason}")
        return {}
    suffix = video_suffix(video_format)
    # every environment's BEV has the toy world's layout (0.5 m per pixel, rear axle at row 58)
    geometry = ToyWorldConfig(num_envs=1, bev_size_px=env.spec.bev_shape[-1])
    fps = PLAYBACK_SPEED / env.spec.policy_dt
    videos: dict[str, Path] = {}
    for seed in worst_first(sft_episodes, count):
        sft = record_episode(env, sft_fn, seed, label="SFT")
        rl = record_episode(env, rl_fn, seed, reference_fn=sft_fn, label="RL")
        frames = render_frames([sft, rl], geometry, env.spec.policy_dt)
        path = write_video(out_dir / f"seed_{seed}{suffix}", frames, fps)
        videos[f"scenario {seed}: SFT {sft.summary()}; RL {rl.summary()}"] = path
    return videos


def worst_first(episodes: Sequence[Mapping[str, Any]], count: int) -> list[int]:
    """Scenario seeds of the ``count`` worst episodes: failures first, then the least route
    completed, then the highest ADE (a non-finite ADE counts as the highest)."""

    def badness(episode: Mapping[str, Any]) -> tuple[int, float, float]:
        ade = float(episode["ade"])
        return (
            -int(episode["failure"]),
            float(episode["route_completion"]),
            -ade if math.isfinite(ade) else -math.inf,
        )

    return [int(e["scenario_seed"]) for e in sorted(episodes, key=badness)[:count]]


def undrawable(spec: EnvSpec) -> str | None:
    """Why episodes of an environment with ``spec`` cannot be drawn, or ``None`` if they can."""
    height, width = spec.bev_shape[1:]
    if tuple(spec.bev_channels) != BEV_CHANNELS:
        return f"the BEV channels {list(spec.bev_channels)} are not the toy world's {list(BEV_CHANNELS)}"
    if height != width or height <= ToyWorldConfig().bev_ego_row:
        return f"the BEV is {height}x{width} px, not the toy world's square layout"
    return None


# ---------------------------------------------------------------------- recording
@dataclass
class EpisodeRecording:
    """One world's episode, kept for drawing. T = policy steps.

    ``bev`` uint8 ``[T + 1, C, H, W]``: the T observations the policy acted on, then the
    episode's final observation (after the collision, off-road exit, goal or time limit).
    ``expert_plans``, ``driven_plans`` (what the world tracked; ``None`` when the expert drove) and
    ``reference_plans`` (the SFT plan under a residual policy, else ``None``): ``[T, K, 2]`` metres,
    ego frame. ``stats``: the episode's statistics (see :func:`episode_stats`).
    """

    label: str
    scenario_seed: int
    bev: np.ndarray
    expert_plans: np.ndarray
    driven_plans: np.ndarray | None
    reference_plans: np.ndarray | None
    stats: dict[str, float | bool | int]

    @property
    def length(self) -> int:
        return int(self.expert_plans.shape[0])

    @property
    def outcome(self) -> str:
        """``collision``, ``off-road``, ``goal`` or ``time limit``."""
        if self.stats["collision"]:
            return "collision"
        if self.stats["off_road"]:
            return "off-road"
        return "goal" if self.stats["goal_reached"] else "time limit"

    def summary(self) -> str:
        route = 100 * float(self.stats["route_completion"])
        return f"{self.outcome} after {self.length} steps, route {route:.0f}%"


def record_episode(
    env: BatchedWaypointEnv,
    drive_fn: PlanFn | None,
    seed: int,
    reference_fn: PlanFn | None = None,
    label: str = "",
) -> EpisodeRecording:
    """Drive world 0 of ``env.reset(seed)`` (scenario ``seed``) to the end of its episode.

    ``drive_fn`` plans for world 0 alone (``None``: the expert drives); the other worlds, which
    never affect world 0, follow their expert. ``reference_fn``'s plan is recorded, not driven.
    """
    obs = env.reset(seed=seed)
    expert = env.expert_waypoints()
    bevs, experts, driven, references = [], [], [], []
    with torch.inference_mode():
        for _ in range(env.spec.max_episode_steps):
            first = obs.index(slice(0, 1))
            action = expert.clone()
            if drive_fn is not None:
                action[0] = drive_fn(first)[0]
                driven.append(action[0].float().cpu().numpy())
            if reference_fn is not None:
                references.append(reference_fn(first)[0].float().cpu().numpy())
            bevs.append(first.bev[0].cpu().numpy())
            experts.append(expert[0].float().cpu().numpy())
            obs, _reward, _terminated, _truncated, info = env.step(action)
            expert = info.expert_waypoints
            if bool(info.episode.done[0]):
                bevs.append(info.final_observation.bev[0].cpu().numpy())
                break
        else:
            raise RuntimeError(f"scenario {seed} did not end within {env.spec.max_episode_steps} steps")
    return EpisodeRecording(
        label=label,
        scenario_seed=seed,
        bev=np.stack(bevs),
        expert_plans=np.stack(experts),
        driven_plans=np.stack(driven) if driven else None,
        reference_plans=np.stack(references) if references else None,
        stats=episode_stats(info.episode, 0),
    )


def episode_stats(episode: EpisodeStats, index: int) -> dict[str, float | bool | int]:
    """World ``index``'s finished episode as plain numbers: return, length, route, end flags."""
    return {
        "episode_return": float(episode.episode_return[index]),
        "episode_length": int(episode.length[index]),
        "route_completion": float(episode.route_completion[index]),
        "collision": bool(episode.collision[index]),
        "off_road": bool(episode.off_road[index]),
        "goal_reached": bool(episode.goal_reached[index]),
    }


# ---------------------------------------------------------------------- one policy (viz CLI)
def animate_episode(
    path: str | Path,
    env: BatchedWaypointEnv,
    drive_fn: PlanFn | None,
    seed: int,
    geometry: ToyWorldConfig,
    reference_fn: PlanFn | None = None,
    label: str = "",
) -> dict[str, float | bool | int]:
    """Drive scenario ``seed`` with one policy and write its one-panel video to ``path``
    (``.mp4`` or ``.gif``); returns the episode's statistics."""
    recording = record_episode(env, drive_fn, seed, reference_fn=reference_fn, label=label)
    frames = render_frames([recording], geometry, env.spec.policy_dt)
    write_video(path, frames, PLAYBACK_SPEED / env.spec.policy_dt)
    return recording.stats


# ---------------------------------------------------------------------- drawing
def render_frames(
    recordings: Sequence[EpisodeRecording], geometry: ToyWorldConfig, policy_dt: float
) -> list[np.ndarray]:
    """Frames RGB uint8 ``[H, W, 3]`` (H and W multiples of 16), one panel per recording.

    Frame ``t`` shows every panel's observation ``t``; one frame more than the longest episode
    shows the final observations. A shorter episode holds its final frame meanwhile.
    """
    font = _font()
    num_frames = max(r.length for r in recordings) + 1
    return [_frame(recordings, t, num_frames, geometry, policy_dt, font) for t in range(num_frames)]


def _frame(
    recordings: Sequence[EpisodeRecording],
    t: int,
    num_frames: int,
    geometry: ToyWorldConfig,
    policy_dt: float,
    font: Any,
) -> np.ndarray:
    side = geometry.bev_size_px * PANEL_SCALE
    width = _multiple_of_16(len(recordings) * (side + MARGIN_PX) + MARGIN_PX)
    height = _multiple_of_16(4 * LINE_PX + side + 2 * MARGIN_PX)
    image = Image.new("RGB", (width, height), FRAME_BACKGROUND)
    draw = ImageDraw.Draw(image)
    seed = recordings[0].scenario_seed
    header = f"scenario {seed}   step {t}/{num_frames - 1}   t = {t * policy_dt:.1f} s"
    draw.text((MARGIN_PX, MARGIN_PX // 2), header, fill=TEXT_COLOUR, font=font)
    top = MARGIN_PX // 2 + 2 * LINE_PX
    for index, recording in enumerate(recordings):
        left = MARGIN_PX + index * (side + MARGIN_PX)
        _draw_panel(image, draw, recording, min(t, recording.length), (left, top), geometry, font)
    _draw_legend(draw, recordings, (MARGIN_PX, top + side + LINE_PX + MARGIN_PX // 2), font)
    return np.asarray(image)


def _draw_panel(
    image: Image.Image,
    draw: ImageDraw.ImageDraw,
    recording: EpisodeRecording,
    t: int,
    origin: tuple[int, int],
    geometry: ToyWorldConfig,
    font: Any,
) -> None:
    """Observation ``t`` of ``recording`` with its plans; at ``t == length`` the final one.

    The panel is drawn on an image of its own, so that a wild plan stays inside it.
    """
    left, top = origin
    side = geometry.bev_size_px * PANEL_SCALE
    panel = Image.fromarray(bev_to_rgb(recording.bev[t])).resize((side, side), Image.Resampling.NEAREST)
    panel_draw = ImageDraw.Draw(panel)
    _draw_ego(panel_draw, geometry)
    if t < recording.length:
        for plans, colour, _ in _plan_layers(recording):
            _draw_plan(panel_draw, plans[t], geometry, colour)
    elif recording.outcome in INFRACTIONS:
        panel_draw.rectangle((0, 0, side - 1, side - 1), outline=INFRACTION_COLOUR, width=BORDER_PX)
    image.paste(panel, (left, top))
    draw.text((left, top - LINE_PX), recording.label, fill=TEXT_COLOUR, font=font)
    if t == recording.length:
        colour = OUTCOME_COLOURS[recording.outcome]
        draw.text((left, top + side + 2), recording.summary(), fill=colour, font=font)


def _plan_layers(recording: EpisodeRecording) -> list[tuple[np.ndarray, str, str]]:
    """(plans ``[T, K, 2]``, colour, legend label) drawn on a panel, back to front."""
    layers = [(recording.expert_plans, EXPERT_COLOUR, "expert plan")]
    if recording.reference_plans is not None:
        layers.append((recording.reference_plans, SFT_PLAN_COLOUR, "SFT plan"))
        if recording.driven_plans is not None:
            layers.append((recording.driven_plans, FINAL_PLAN_COLOUR, "final plan"))
    elif recording.driven_plans is not None:
        layers.append((recording.driven_plans, SFT_PLAN_COLOUR, "SFT plan"))
    return layers


def _to_panel(points_ego_m: np.ndarray, geometry: ToyWorldConfig) -> list[tuple[float, float]]:
    """Panel pixels (x, y) of ego-frame points ``[M, 2]`` (metres)."""
    row, col = ego_to_pixel(points_ego_m, geometry)
    return [(c * PANEL_SCALE, r * PANEL_SCALE) for r, c in zip(row, col, strict=True)]


def _draw_plan(draw: ImageDraw.ImageDraw, plan: np.ndarray, geometry: ToyWorldConfig, colour: str) -> None:
    """A plan ``[K, 2]`` as a polyline from the ego's rear axle through its waypoints (dots)."""
    points = np.concatenate([np.zeros((1, 2)), np.asarray(plan, dtype=np.float64).reshape(-1, 2)])
    points = points[np.isfinite(points).all(axis=1)]
    pixels = _to_panel(points, geometry)
    draw.line(pixels, fill=colour, width=2)
    radius = PANEL_SCALE * 0.6
    for x, y in pixels[1:]:
        draw.ellipse((x - radius, y - radius, x + radius, y + radius), fill=colour)


def _draw_ego(draw: ImageDraw.ImageDraw, geometry: ToyWorldConfig) -> None:
    """The ego's outline (rear axle at the origin of the ego frame, facing up)."""
    front = geometry.length_m - geometry.rear_overhang_m
    corners = np.array(
        [[front, geometry.width_m / 2], [-geometry.rear_overhang_m, -geometry.width_m / 2]], dtype=np.float64
    )
    (x0, y0), (x1, y1) = _to_panel(corners, geometry)
    draw.rectangle((x0, y0, x1, y1), outline=EGO_COLOUR, width=1)


def _draw_legend(
    draw: ImageDraw.ImageDraw, recordings: Sequence[EpisodeRecording], origin: tuple[int, int], font: Any
) -> None:
    entries = {label: colour for r in recordings for _, colour, label in _plan_layers(r)}
    x, y = origin
    for label, colour in entries.items():
        draw.rectangle((x, y + 4, x + 10, y + 14), fill=colour)
        draw.text((x + 14, y), label, fill=TEXT_COLOUR, font=font)
        x += 24 + int(draw.textlength(label, font=font))


def _font() -> Any:
    try:
        return ImageFont.load_default(size=FONT_PX)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def _multiple_of_16(pixels: int) -> int:
    """H.264 encodes blocks of 16 pixels; other sizes would be rescaled."""
    return 16 * math.ceil(pixels / 16)


# ---------------------------------------------------------------------- video files
def mp4_encoder() -> str | None:
    """The ffmpeg binary that writes MP4 (from the ``imageio-ffmpeg`` wheel), or ``None``."""
    try:
        import imageio_ffmpeg

        return imageio_ffmpeg.get_ffmpeg_exe()
    except (ImportError, RuntimeError):
        return None


def video_suffix(video_format: str) -> str:
    """``.mp4`` or ``.gif`` for ``auto`` (MP4 where an encoder is installed), ``mp4`` or ``gif``.

    Raises:
        UserError: an unknown format, or ``mp4`` without an encoder.
    """
    if video_format not in VIDEO_FORMATS:
        raise UserError(f"video format must be one of {', '.join(VIDEO_FORMATS)}, got {video_format!r}")
    if video_format == "gif":
        return ".gif"
    if mp4_encoder() is not None:
        return ".mp4"
    if video_format == "auto":
        return ".gif"
    raise UserError(NO_MP4_ENCODER)


def write_video(path: str | Path, frames: Sequence[np.ndarray], fps: float) -> Path:
    """Write RGB uint8 frames ``[H, W, 3]`` (all the same size) to ``path`` atomically.

    The suffix chooses the format: ``.mp4`` (H.264, needs :func:`mp4_encoder`) or ``.gif``.
    """
    path = Path(path)
    if not frames:
        raise ValueError("no frames to write")
    suffix = path.suffix.lower()
    if suffix == ".mp4":
        data = _encode_mp4(frames, fps)
    elif suffix == ".gif":
        data = _encode_gif(frames, fps)
    else:
        raise ValueError(f"{path}: a video file ends in {' or '.join(VIDEO_SUFFIXES)}")
    atomic_write_bytes(path, data)
    return path


def _encode_mp4(frames: Sequence[np.ndarray], fps: float) -> bytes:
    if mp4_encoder() is None:
        raise UserError(NO_MP4_ENCODER)
    import imageio_ffmpeg

    height, width = frames[0].shape[:2]
    with tempfile.TemporaryDirectory() as folder:
        file = Path(folder) / "video.mp4"
        writer = imageio_ffmpeg.write_frames(
            str(file),
            (width, height),
            fps=fps,
            codec="libx264",
            quality=MP4_QUALITY,
            ffmpeg_log_level="error",
            output_params=["-movflags", "+faststart"],  # playable while it downloads
        )
        writer.send(None)  # start ffmpeg
        for frame in frames:
            writer.send(np.ascontiguousarray(frame, dtype=np.uint8))
        writer.close()
        return file.read_bytes()


def _encode_gif(frames: Sequence[np.ndarray], fps: float) -> bytes:
    images = [Image.fromarray(np.asarray(frame, dtype=np.uint8)) for frame in frames]
    buffer = io.BytesIO()
    images[0].save(
        buffer,
        format="GIF",
        save_all=True,
        append_images=images[1:],
        duration=round(1000 / fps),
        loop=0,
        optimize=False,
    )
    return buffer.getvalue()
