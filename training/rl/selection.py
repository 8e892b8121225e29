"""Which evaluated policy a run hands back in ``final.pt``.

RL can make a good SFT model worse: the stochastic policy learns to survive its own exploration
noise, and the deterministic plan it yields drives less precisely or less smoothly than the plan
it started from. So a run keeps, among the policies its development evaluation has scored
(iteration 0, which is exactly the SFT policy, included), the one a user should deploy:

1. **admissible**: not worse than SFT (iteration 0) on any of the safety and quality metrics
   (collision + off-road rate, route completion, ADE, jerk), measured on the same development
   scenarios, in every environment of a mix; jerk, the noisiest of them, within ``GUARD_TOLERANCE``
   (5%) of SFT's. ADE is compared over the steps both policies drove in each scenario
   (``ade_shared`` against ``sft_ade_shared``, see ``evaluation.py``): a policy that stays on the road
   longer meets junctions and traffic that SFT never reached, and its whole-episode ADE rises with
   plans that are no worse;
2. among those, the **safest** (fewest collisions and off-road exits), then the one that
   completes most of the route (compared at ``ROUTE_COMPLETION_RESOLUTION``), then the lowest ADE.

Iteration 0 is always admissible, so the worst a run can hand back is its SFT model unchanged.
The last iteration's policy stays in ``checkpoint_iter_N.pt``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from typing import Any

from torch import Tensor

# metric -> True when lower is better; a candidate must not be worse than SFT on any of them
GUARDED_METRICS: dict[str, bool] = {
    "failure_rate": True,
    "route_completion": False,
    "ade_shared": True,
    "mean_abs_jerk": True,
}
# Guarded metrics measured on windows that depend on the candidate: the candidate's record brings
# SFT's value under this prefix (``sft_ade_shared``). A record without it (a run resumed from a
# checkpoint older than the shared window) is guarded on the whole-episode metric instead.
SFT_PREFIX = "sft_"
WHOLE_EPISODE: dict[str, str] = {"ade_shared": "ade"}
# Relative slack per guarded metric (0: none). Mean |jerk| over 50 development episodes moves by a
# few percent between evaluations of the same quality (measured: 0.95-1.10 for policies within
# 1 cm of ADE), so a strict bound rejected the best policies on noise alone.
GUARD_TOLERANCE: dict[str, float] = {"mean_abs_jerk": 0.05}
# Route completions closer than this are a tie when ranking (ADE then decides).
ROUTE_COMPLETION_RESOLUTION = 0.01


def not_worse(candidate: Mapping[str, float], baseline: Mapping[str, float]) -> bool:
    """True when ``candidate`` is at least as good as ``baseline`` on every guarded metric (within
    its ``GUARD_TOLERANCE``): the means and, for a mix of environments, each environment's own
    (``<env>/<metric>``), so that gains in one environment never buy losses in another."""
    for key, metric in _guarded_keys(baseline):
        value, reference = _guarded_values(key, metric, candidate, baseline)
        difference = value - reference
        if math.isnan(difference):  # NaN: nothing to go on, refuse
            return False
        worse_by = difference if GUARDED_METRICS[metric] else -difference
        if worse_by > GUARD_TOLERANCE.get(metric, 0.0) * abs(reference):
            return False
    return True


def _guarded_keys(record: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(key, metric)`` of every guarded metric in an evaluation record (or its whole-episode
    stand-in), for the means and each environment of a mix (``<env>/<metric>``)."""
    envs = dict.fromkeys(key.rpartition("/")[0] for key in record if "/" in key)
    prefixes = ["", *(f"{env}/" for env in envs)]
    return [
        (f"{prefix}{metric}", metric)
        for prefix in prefixes
        for metric in GUARDED_METRICS
        if f"{prefix}{metric}" in record or f"{prefix}{WHOLE_EPISODE.get(metric, metric)}" in record
    ]


def _guarded_values(
    key: str, metric: str, candidate: Mapping[str, Any], baseline: Mapping[str, Any]
) -> tuple[float, float]:
    """The candidate's value of a guarded metric and SFT's value to hold it against."""
    if metric not in WHOLE_EPISODE:
        return candidate[key], baseline[key]
    prefix = key[: len(key) - len(metric)]
    sft_key = f"{prefix}{SFT_PREFIX}{metric}"
    if key in candidate and sft_key in candidate:
        return candidate[key], candidate[sft_key]
    whole = f"{prefix}{WHOLE_EPISODE[metric]}"
    return candidate[whole], baseline[whole]


def ranks_above(candidate: Mapping[str, float], incumbent: Mapping[str, float]) -> bool:
    """True when ``candidate`` ranks strictly above ``incumbent``: fewer collisions and off-road
    exits, or as few and more of the route (by at least ``ROUTE_COMPLETION_RESOLUTION``; closer
    is a tie), or both of those tied and a lower ADE."""
    if candidate["failure_rate"] != incumbent["failure_rate"]:
        return candidate["failure_rate"] < incumbent["failure_rate"]
    further = candidate["route_completion"] - incumbent["route_completion"]
    if abs(further) >= ROUTE_COMPLETION_RESOLUTION:
        return further > 0
    return candidate["ade"] < incumbent["ade"]


# Measured durations, which differ between runs of the same command: kept in eval_metrics.json,
# left out of the records that checkpoints store, so that a run's final.pt is the same bytes every time.
TIMING_KEYS = ("wall_time_s", "steps_per_s")


def without_timings(record: Mapping[str, Any]) -> dict[str, Any]:
    return {key: value for key, value in record.items() if key not in TIMING_KEYS}


@dataclasses.dataclass
class PolicySelection:
    """The best admissible policy seen so far: its iteration, evaluation record and heads."""

    baseline: dict[str, Any]  # the evaluation of iteration 0 (the SFT policy)
    iteration: int
    record: dict[str, Any]
    heads: dict[str, Tensor]
    # the SFT policy's per-step ADE in each development episode, per environment: what later
    # evaluations measure their shared-window ADE against (empty in checkpoints that predate it)
    sft_step_ade: dict[str, list[Tensor]] = dataclasses.field(default_factory=dict)

    @classmethod
    def start(
        cls, baseline: dict[str, Any], heads: dict[str, Tensor], sft_step_ade: dict[str, list[Tensor]]
    ) -> PolicySelection:
        """Iteration 0 (the SFT policy, zero residual) is the first candidate."""
        baseline = without_timings(baseline)
        return cls(baseline, 0, dict(baseline), heads, sft_step_ade)

    def consider(self, iteration: int, record: dict[str, Any], heads: dict[str, Tensor]) -> bool:
        """Keep the candidate if it is admissible and ranks strictly better; returns whether it was kept.

        A later candidate that only ties the incumbent is not kept (the earlier policy is the
        closer one to SFT).
        """
        if not not_worse(record, self.baseline) or not ranks_above(record, self.record):
            return False
        self.iteration, self.record, self.heads = iteration, without_timings(record), heads
        return True

    def state_dict(self) -> dict[str, Any]:
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)}

    @classmethod
    def from_state_dict(cls, state: Mapping[str, Any]) -> PolicySelection:
        return cls(
            **{field.name: state[field.name] for field in dataclasses.fields(cls) if field.name in state}
        )
