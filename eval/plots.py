"""Figures of a comparison: metric bars, ADE distribution, training curves, episodes from above.

Every function writes one PNG atomically (rendered into memory, then
:func:`training.common.io.atomic_write_bytes`) and closes its figure. Matplotlib uses the
non-interactive Agg backend, so plotting works without a display.
"""

from __future__ import annotations

import io
import math
import numbers
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.figure import Figure

from training.common.io import atomic_write_bytes

SFT_COLOR = "tab:blue"
RL_COLOR = "tab:orange"
EXPERT_COLOR = "0.55"
FIGURE_DPI = 110
GRID_COLUMNS = 4  # panels per row in multi-panel figures

# Panels of the training-curve figure: (title, candidate keys); a key also matches "group/key".
TRAIN_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("episode return", ("episode_return", "episodic_return", "mean_episode_return")),
    ("policy loss", ("policy_loss", "pg_loss")),
    ("value loss", ("value_loss", "v_loss")),
    ("approx KL", ("approx_kl",)),
    ("clip fraction", ("clip_fraction", "clipfrac")),
    ("entropy", ("entropy", "entropy_loss")),
)
TRAIN_X_KEYS = ("env_steps", "global_step", "total_env_steps")
EVAL_PANELS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("eval ADE [m]", ("ade",)),
    ("eval route completion", ("route_completion",)),
)
EVAL_X_KEYS = ("iteration", "iter")


def _save(fig: Figure, path: str | Path) -> Path:
    """Render ``fig`` to PNG bytes, write them atomically to ``path`` and close the figure."""
    path = Path(path)
    buffer = io.BytesIO()
    try:
        fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, buffer.getvalue())
    return path


def _finite(x: Any) -> bool:
    return x is not None and isinstance(x, numbers.Real) and math.isfinite(float(x))


def _fmt(x: Any) -> str:
    return f"{x:.3g}" if _finite(x) else "n/a"


def _grid(num_panels: int, panel_size: tuple[float, float] = (3.4, 2.8)) -> tuple[Figure, list[Any]]:
    cols = max(1, min(GRID_COLUMNS, num_panels))
    rows = max(1, math.ceil(num_panels / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(panel_size[0] * cols, panel_size[1] * rows), squeeze=False)
    flat = list(axes.ravel())
    for ax in flat[num_panels:]:
        ax.set_visible(False)
    return fig, flat[:num_panels]


def plot_metric_bars(rows: Sequence[Mapping[str, Any]], path: str | Path) -> Path:
    """SFT and RL means per metric, one panel each, from :func:`eval.metrics.compare_paired` rows.

    The RL bar's error bar is the paired bootstrap interval of the difference, placed on top of
    the SFT mean (``sft + ci_low .. sft + ci_high``): where it does not reach the SFT bar's top,
    the difference is significant. Each panel's title says the unit and the better direction.
    """
    fig, axes = _grid(max(1, len(rows)))
    for ax, row in zip(axes, rows, strict=False):
        sft, rl = row.get("sft"), row.get("rl")
        heights = [sft if _finite(sft) else 0.0, rl if _finite(rl) else 0.0]
        ax.bar([0, 1], heights, color=[SFT_COLOR, RL_COLOR], width=0.6)
        low, high = row.get("ci_low"), row.get("ci_high")
        if _finite(sft) and _finite(low) and _finite(high) and _finite(rl):
            err = np.array([[max(rl - (sft + low), 0.0)], [max(sft + high - rl, 0.0)]])
            ax.errorbar([1], [rl], yerr=err, fmt="none", ecolor="black", capsize=5, linewidth=1.2)
        ax.axhline(heights[0], color=SFT_COLOR, linestyle=":", linewidth=1)
        ax.set_xticks([0, 1], ["SFT", "RL"])
        unit = row.get("unit") or ""
        label = row.get("label") or row.get("metric", "?")
        direction = "lower is better" if row.get("lower_is_better", True) else "higher is better"
        ax.set_title(f"{label}" + (f" [{unit}]" if unit else "") + f"\n({direction})", fontsize=9)
        marker = " *" if row.get("significant") else ""
        ax.set_xlabel(
            f"Δ = {_fmt(row.get('difference'))}  CI [{_fmt(low)}, {_fmt(high)}]{marker}", fontsize=8
        )
        ax.tick_params(labelsize=8)
        ax.grid(axis="y", alpha=0.3)
    fig.suptitle("SFT vs RL (error bar: 95% paired bootstrap CI of RL - SFT; * = excludes 0)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def plot_ade_distribution(sft_ade: Sequence[float], rl_ade: Sequence[float], path: str | Path) -> Path:
    """Per-episode ADE of both policies: overlaid histograms and a paired scatter (RL vs SFT)."""
    sft = np.asarray(sft_ade, dtype=np.float64)
    rl = np.asarray(rl_ade, dtype=np.float64)
    fig, (hist_ax, pair_ax) = plt.subplots(1, 2, figsize=(10, 4))
    finite_all = np.concatenate([sft[np.isfinite(sft)], rl[np.isfinite(rl)]])
    if finite_all.size:
        lo, hi = float(finite_all.min()), float(finite_all.max())
        bins = np.linspace(lo, hi if hi > lo else lo + 1e-6, 25)
        hist_ax.hist(sft[np.isfinite(sft)], bins=bins, alpha=0.55, color=SFT_COLOR, label="SFT")
        hist_ax.hist(rl[np.isfinite(rl)], bins=bins, alpha=0.55, color=RL_COLOR, label="RL")
        hist_ax.legend()
    hist_ax.set_xlabel("per-episode ADE [m]")
    hist_ax.set_ylabel("episodes")
    hist_ax.set_title("ADE distribution")
    if sft.shape == rl.shape and sft.size:
        both = np.isfinite(sft) & np.isfinite(rl)
        pair_ax.scatter(sft[both], rl[both], s=14, alpha=0.7, color=RL_COLOR)
        if both.any():
            lo = float(min(sft[both].min(), rl[both].min()))
            hi = float(max(sft[both].max(), rl[both].max()))
            pair_ax.plot([lo, hi], [lo, hi], color="black", linewidth=1, linestyle="--", label="equal")
            pair_ax.legend()
    pair_ax.set_xlabel("SFT ADE [m]")
    pair_ax.set_ylabel("RL ADE [m]")
    pair_ax.set_title("paired by scenario (below the line: RL closer to expert)")
    for ax in (hist_ax, pair_ax):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    return _save(fig, path)


def _lookup(record: Mapping[str, Any], candidates: Sequence[str]) -> Any:
    """The value of the first candidate key in ``record``, also matching grouped ``"x/key"`` names."""
    for name in candidates:
        if name in record:
            return record[name]
    for name in candidates:
        for key, value in record.items():
            if key.endswith("/" + name):
                return value
    return None


def _series(
    records: Sequence[Mapping[str, Any]], keys: Sequence[str], x_keys: Sequence[str]
) -> tuple[list[float], list[float], str]:
    xs: list[float] = []
    ys: list[float] = []
    x_name = next((k for k in x_keys if any(_lookup(r, [k]) is not None for r in records)), "record")
    for index, record in enumerate(records):
        y = _lookup(record, keys)
        x = _lookup(record, [x_name]) if x_name != "record" else index
        if _finite(y) and _finite(x):
            xs.append(float(x))
            ys.append(float(y))
    return xs, ys, x_name


def plot_training_curves(
    train_metrics: Sequence[Mapping[str, Any]], eval_metrics: Sequence[Mapping[str, Any]], path: str | Path
) -> Path:
    """PPO training curves vs environment steps and evaluation metrics vs iteration.

    Keys are looked up by name or as the last part of a grouped name (``losses/value_loss``);
    a panel whose key is missing says so instead of failing.
    """
    panels = [(title, keys, train_metrics, TRAIN_X_KEYS) for title, keys in TRAIN_PANELS]
    panels += [(title, keys, eval_metrics, EVAL_X_KEYS) for title, keys in EVAL_PANELS]
    fig, axes = _grid(len(panels))
    for ax, (title, keys, records, x_keys) in zip(axes, panels, strict=True):
        xs, ys, x_name = _series(records, keys, x_keys)
        if xs:
            ax.plot(xs, ys, marker="o" if len(xs) < 30 else None, markersize=3, linewidth=1.2)
        else:
            ax.text(0.5, 0.5, "not recorded", ha="center", va="center", transform=ax.transAxes, color="0.5")
        ax.set_title(title, fontsize=9)
        ax.set_xlabel(x_name.replace("_", " "), fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
    fig.suptitle("RL training", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)


def _draw_plans(ax: Any, plans: np.ndarray, indices: np.ndarray, **style: Any) -> None:
    for t in indices:
        plan = plans[t]
        if np.isfinite(plan).all():
            ax.plot(plan[:, 0], plan[:, 1], **style)


def plot_episodes(
    trajectories_sft: Sequence[Mapping[str, Any]],
    trajectories_rl: Sequence[Mapping[str, Any]],
    path: str | Path,
    route_xy: np.ndarray | Sequence[np.ndarray] | None = None,
    max_episodes: int = 4,
    plans_per_episode: int = 5,
) -> Path:
    """A few episodes seen from above: both driven paths, some of their plans, the expert's faintly.

    Args:
        trajectories_sft, trajectories_rl: trajectories from
            :func:`eval.closed_loop.run_closed_loop`, paired by position (same scenarios).
        route_xy: optional route centre line, metres, world frame: one ``[M, 2]`` array for all
            episodes or one per episode (a trajectory's own ``"route_xy"`` entry also works).
        max_episodes: panels drawn at most.
        plans_per_episode: plans drawn per policy, evenly spread over the episode.
    """
    count = max(1, min(max_episodes, len(trajectories_sft), len(trajectories_rl)))
    fig, axes = _grid(count, panel_size=(4.2, 4.2))
    for index, ax in enumerate(axes):
        if index >= min(len(trajectories_sft), len(trajectories_rl)):
            ax.text(0.5, 0.5, "no trajectories", ha="center", va="center", transform=ax.transAxes)
            continue
        sft, rl = trajectories_sft[index], trajectories_rl[index]
        route = sft.get("route_xy")
        if route is None and route_xy is not None:
            route = route_xy if isinstance(route_xy, np.ndarray) else route_xy[index]
        if route is not None:
            route = np.asarray(route, dtype=np.float64)
            ax.plot(route[:, 0], route[:, 1], color="0.8", linewidth=6, solid_capstyle="round", zorder=0)
        for traj, color, name in ((sft, SFT_COLOR, "SFT"), (rl, RL_COLOR, "RL")):
            pose = np.asarray(traj["ego_pose"], dtype=np.float64)
            length = pose.shape[0]
            picks = np.unique(np.linspace(0, max(length - 1, 0), plans_per_episode).astype(int))
            _draw_plans(
                ax,
                np.asarray(traj["expert_waypoints_world"]),
                picks,
                color=EXPERT_COLOR,
                alpha=0.35,
                linewidth=1,
                linestyle="--",
            )
            _draw_plans(
                ax,
                np.asarray(traj["policy_waypoints_world"]),
                picks,
                color=color,
                alpha=0.6,
                linewidth=1,
                marker=".",
                markersize=3,
            )
            ax.plot(pose[:, 0], pose[:, 1], color=color, linewidth=2, label=f"{name} path")
        ax.plot([], [], color=EXPERT_COLOR, linestyle="--", label="expert plans")
        ax.set_aspect("equal", adjustable="datalim")
        ax.set_title(f"scenario {sft.get('scenario_seed', index)}", fontsize=9)
        ax.set_xlabel("x [m]", fontsize=8)
        ax.set_ylabel("y [m]", fontsize=8)
        ax.tick_params(labelsize=8)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    fig.suptitle("Episodes from above (world frame)", fontsize=10)
    fig.tight_layout()
    return _save(fig, path)
