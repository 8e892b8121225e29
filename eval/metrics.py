"""Metrics of a driving policy and the paired comparison of two policies.

Per-episode records (dicts, see :func:`eval.closed_loop.run_closed_loop`) are the unit of
comparison: both policies drive exactly the same scenarios (same scenario seeds), so the
difference between them is estimated per scenario and its uncertainty with a paired bootstrap.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import numpy as np
import torch

ArrayT = TypeVar("ArrayT", torch.Tensor, np.ndarray)

# At most this many bootstrap draws (resamples x episodes) are held in memory at once.
_BOOTSTRAP_BLOCK_ELEMENTS = 4_000_000


def displacement_errors(pred: ArrayT, expert: ArrayT) -> tuple[ArrayT, ArrayT]:
    """Average and final displacement error of waypoint plans, in metres.

    Args:
        pred: predicted waypoints ``[N, K, 2]`` (metres, any common frame).
        expert: expert waypoints ``[N, K, 2]`` in the same frame.

    Returns:
        ``(ade, fde)``, each ``[N]``: the mean over the K waypoints of the L2 distance, and the
        L2 distance at the last waypoint. Same type (torch or numpy) and device as the inputs.
    """
    if tuple(pred.shape) != tuple(expert.shape) or pred.ndim != 3 or pred.shape[-1] != 2:
        raise ValueError(
            f"expected pred and expert of equal shape [N, K, 2], got {tuple(pred.shape)} "
            f"and {tuple(expert.shape)}"
        )
    if isinstance(pred, torch.Tensor):
        dist = torch.linalg.vector_norm(pred - expert, dim=-1)  # [N, K]
        return dist.mean(dim=-1), dist[:, -1]
    dist_np = np.linalg.norm(np.asarray(pred, dtype=np.float64) - np.asarray(expert), axis=-1)
    return dist_np.mean(axis=-1), dist_np[:, -1]


def paired_bootstrap_ci(
    a: np.ndarray,
    b: np.ndarray,
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float, float]:
    """Mean of the paired difference ``b - a`` and its percentile bootstrap interval.

    Episode indices are resampled with replacement (the pairs stay together), ``num_resamples``
    times; the interval is the central ``confidence`` share of the resampled means. Pairs with a
    non-finite value on either side are left out. Deterministic for a given ``seed``.

    Returns:
        ``(mean_diff, low, high)``; all NaN when no finite pair is left.
    """
    a = np.asarray(a, dtype=np.float64).reshape(-1)
    b = np.asarray(b, dtype=np.float64).reshape(-1)
    if a.shape != b.shape:
        raise ValueError(f"paired samples differ in length: {a.shape[0]} vs {b.shape[0]}")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must lie in (0, 1), got {confidence}")
    if num_resamples < 1:
        raise ValueError(f"num_resamples must be positive, got {num_resamples}")
    diff = b - a
    diff = diff[np.isfinite(diff)]
    n = diff.shape[0]
    if n == 0:
        return math.nan, math.nan, math.nan
    mean_diff = float(diff.mean())
    rng = np.random.default_rng(seed)
    means = np.empty(num_resamples, dtype=np.float64)
    block = max(1, _BOOTSTRAP_BLOCK_ELEMENTS // n)
    for start in range(0, num_resamples, block):
        stop = min(start + block, num_resamples)
        index = rng.integers(0, n, size=(stop - start, n))
        means[start:stop] = diff[index].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    low, high = np.quantile(means, [alpha, 1.0 - alpha])
    # Guard against rounding putting the mean of identical values a hair outside its interval.
    return mean_diff, float(min(low, mean_diff)), float(max(high, mean_diff))


@dataclass(frozen=True)
class MetricSpec:
    """One compared metric: its name in summaries, the per-episode key it averages, its unit."""

    name: str  # name in summaries and comparison rows, e.g. "collision_rate"
    key: str  # key in per-episode records, e.g. "collision" (0/1)
    unit: str  # "m", "m/s^3", "" for dimensionless
    lower_is_better: bool
    label: str  # human-readable name for tables and plots
    # measured only for two policies on the same scenarios (``add_shared_window_errors``): left out
    # of summaries and comparisons whose episodes do not carry it
    paired_only: bool = False

    @property
    def label_with_unit(self) -> str:
        return f"{self.label} [{self.unit}]" if self.unit else self.label


METRICS: tuple[MetricSpec, ...] = (
    MetricSpec("ade", "ade", "m", True, "ADE"),
    MetricSpec("fde", "fde", "m", True, "FDE"),
    MetricSpec("ade_shared", "ade_shared", "m", True, "ADE, steps both drive", paired_only=True),
    MetricSpec("fde_shared", "fde_shared", "m", True, "FDE, steps both drive", paired_only=True),
    MetricSpec("episode_return", "episode_return", "", False, "Episode return"),
    MetricSpec("route_completion", "route_completion", "", False, "Route completion"),
    MetricSpec("goal_rate", "goal_reached", "", False, "Goal rate"),
    MetricSpec("collision_rate", "collision", "", True, "Collision rate"),
    MetricSpec("off_road_rate", "off_road", "", True, "Off-road rate"),
    MetricSpec("failure_rate", "failure", "", True, "Collision or off-road rate"),
    MetricSpec("mean_abs_lateral_m", "mean_abs_lateral_m", "m", True, "Mean |lateral offset|"),
    MetricSpec("mean_abs_jerk", "mean_abs_jerk", "m/s^3", True, "Mean |jerk|"),
    MetricSpec("mean_abs_steer_rate", "mean_abs_steer_rate", "rad/s", True, "Mean |steer rate|"),
)
METRICS_BY_NAME: dict[str, MetricSpec] = {spec.name: spec for spec in METRICS}


def _column(episodes: Sequence[Mapping[str, Any]], key: str) -> np.ndarray:
    """The values of ``key`` over episodes as float64 (missing -> NaN, bools -> 0/1)."""
    values = [episode.get(key, math.nan) for episode in episodes]
    return np.asarray([math.nan if v is None else float(v) for v in values], dtype=np.float64)


def _measured(metrics: Sequence[MetricSpec], episodes: Sequence[Mapping[str, Any]]) -> list[MetricSpec]:
    """``metrics`` less the paired-only ones that no episode carries."""
    return [spec for spec in metrics if not spec.paired_only or any(spec.key in e for e in episodes)]


def _mean(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else math.nan


def summarise(
    episodes: Sequence[Mapping[str, Any]], metrics: Sequence[MetricSpec] = METRICS
) -> dict[str, float]:
    """Means over episodes of every metric, under the metric names (``collision_rate``, ...).

    Non-finite values (e.g. the ADE of an episode whose every action was NaN) are left out of
    the mean. Also reports ``num_episodes`` and the mean episode ``length`` (policy steps).
    """
    measured = _measured(metrics, episodes)
    summary: dict[str, float] = {spec.name: _mean(_column(episodes, spec.key)) for spec in measured}
    summary["length"] = _mean(_column(episodes, "length"))
    summary["num_episodes"] = float(len(episodes))
    return summary


def _pair_episodes(
    sft_eps: Sequence[Mapping[str, Any]], rl_eps: Sequence[Mapping[str, Any]]
) -> tuple[list[Mapping[str, Any]], list[Mapping[str, Any]]]:
    """Match episodes by ``scenario_seed`` (or by position when records carry no seed)."""
    if len(sft_eps) != len(rl_eps):
        raise ValueError(f"paired comparison needs equal episode counts: {len(sft_eps)} vs {len(rl_eps)}")
    if not all("scenario_seed" in e for e in (*sft_eps, *rl_eps)):
        return list(sft_eps), list(rl_eps)
    rl_by_seed = {int(e["scenario_seed"]): e for e in rl_eps}
    sft_seeds = [int(e["scenario_seed"]) for e in sft_eps]
    if len(rl_by_seed) != len(rl_eps) or set(sft_seeds) != set(rl_by_seed):
        raise ValueError("SFT and RL episodes were not played on the same scenario seeds")
    return list(sft_eps), [rl_by_seed[s] for s in sft_seeds]


def compare_paired(
    sft_eps: Sequence[Mapping[str, Any]],
    rl_eps: Sequence[Mapping[str, Any]],
    metrics: Sequence[MetricSpec] = METRICS,
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Paired comparison of RL against SFT, one row per metric.

    Episodes are paired by ``scenario_seed``. Each row holds ``metric``, ``label``, ``unit``,
    ``lower_is_better``, ``sft`` and ``rl`` (means), ``difference`` (mean of RL - SFT over pairs),
    ``relative_change`` (difference / |sft|, NaN when sft is 0), ``ci_low``/``ci_high`` (paired
    bootstrap interval of the difference), ``confidence``, ``num_pairs``, ``significant`` (the
    interval excludes 0) and ``improved`` / ``worsened`` (significant, in the better / worse
    direction).
    """
    sft_paired, rl_paired = _pair_episodes(sft_eps, rl_eps)
    rows: list[dict[str, Any]] = []
    for spec in _measured(metrics, [*sft_paired, *rl_paired]):
        sft_values = _column(sft_paired, spec.key)
        rl_values = _column(rl_paired, spec.key)
        diff, low, high = paired_bootstrap_ci(sft_values, rl_values, num_resamples, confidence, seed)
        sft_mean, rl_mean = _mean(sft_values), _mean(rl_values)
        relative = diff / abs(sft_mean) if math.isfinite(sft_mean) and sft_mean != 0 else math.nan
        significant = bool(math.isfinite(low) and (low > 0.0 or high < 0.0))
        better = (diff < 0.0) if spec.lower_is_better else (diff > 0.0)
        rows.append(
            {
                "metric": spec.name,
                "label": spec.label,
                "unit": spec.unit,
                "lower_is_better": spec.lower_is_better,
                "sft": sft_mean,
                "rl": rl_mean,
                "difference": diff,
                "relative_change": relative,
                "ci_low": low,
                "ci_high": high,
                "confidence": confidence,
                "num_pairs": int(np.sum(np.isfinite(rl_values - sft_values))),
                "significant": significant,
                "improved": significant and better,
                "worsened": significant and not better,
            }
        )
    return rows


def shared_window_means(first: np.ndarray, second: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-column means of two per-step series ``[T1, C]`` and ``[T2, C]`` over their first
    ``min(T1, T2)`` steps; non-finite steps are left out (a column with none finite: NaN)."""
    steps = min(len(first), len(second))
    return _column_means(first[:steps]), _column_means(second[:steps])


def _column_means(series: np.ndarray) -> np.ndarray:
    return np.array([_mean(column) for column in series.T])


def mean_shared_window(first: Sequence[np.ndarray], second: Sequence[np.ndarray]) -> tuple[float, float]:
    """Means over episodes of two policies' per-step series (one ``[T]`` array per episode, the
    episodes of both in the same scenario order), each episode's taken over the steps both drove."""
    if len(first) != len(second):
        raise ValueError(f"{len(first)} episodes against {len(second)}")
    pairs = [shared_window_means(a[:, None], b[:, None]) for a, b in zip(first, second, strict=True)]
    return _mean(np.array([a[0] for a, _ in pairs])), _mean(np.array([b[0] for _, b in pairs]))


def add_shared_window_errors(
    first: tuple[Sequence[dict[str, Any]], Sequence[np.ndarray]],
    second: tuple[Sequence[dict[str, Any]], Sequence[np.ndarray]],
) -> None:
    """Give every episode of two policies on the same scenarios ``ade_shared`` and ``fde_shared``:
    its mean ADE and FDE over the first steps that both policies drove in that scenario.

    Each argument is ``(episodes, step_errors)`` as :func:`eval.closed_loop.run_closed_loop`
    returns them (per-step ``[T, 2]`` ADE and FDE). Why: an episode's ADE averages over the states
    its policy reached, and states later in a route (junctions, traffic) are harder to plan in, so
    a policy that drives further before failing scores a higher whole-episode ADE with plans that
    are no worse. Over the shared steps both policies are judged on the same stretch of time of
    the same scenario. Episodes are paired by ``scenario_seed``; the records are updated in place.
    """
    (first_eps, first_steps), (second_eps, second_steps) = first, second
    second_by_seed = {
        int(e["scenario_seed"]): (e, steps) for e, steps in zip(second_eps, second_steps, strict=True)
    }
    first_seeds = {int(e["scenario_seed"]) for e in first_eps}
    if first_seeds != set(second_by_seed) or len(first_eps) != len(first_steps):
        raise ValueError("shared-window errors need both policies' episodes on the same scenario seeds")
    for episode, steps in zip(first_eps, first_steps, strict=True):
        other, other_steps = second_by_seed[int(episode["scenario_seed"])]
        mine, theirs = shared_window_means(steps, other_steps)
        for record, means in ((episode, mine), (other, theirs)):
            record["ade_shared"], record["fde_shared"] = float(means[0]), float(means[1])
