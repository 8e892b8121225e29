"""A success-gated difficulty curriculum: start easy, climb to the target level.

Episodes are judged in consecutive windows of at least ``min_episodes`` training episodes
(whole rollouts): when a window's goal rate reaches ``threshold`` the level rises by one, and
either way the next window starts empty. So a level is judged on recent driving only, never on
the failures of the policy it started as, and a new level is judged only on episodes that began
after it was set (up to those already under way when it changed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any


def curriculum_levels(start: float, step: float, target: float) -> list[float]:
    """Difficulties ``start, start + step, ...`` capped at and ending with ``target``."""
    count = max(1, math.ceil((target - start) / step - 1e-9) + 1)
    return [min(target, start + i * step) for i in range(count)]


@dataclass
class Curriculum:
    levels: list[float]
    threshold: float
    min_episodes: int
    level: int = 0
    episodes: int = 0
    successes: int = 0

    @property
    def difficulty(self) -> float:
        return self.levels[self.level]

    @property
    def at_top(self) -> bool:
        return self.level == len(self.levels) - 1

    def record(self, episodes: int, successes: int) -> bool:
        """Count one rollout's finished episodes; returns True when the level rose."""
        if self.at_top:
            return False
        self.episodes += episodes
        self.successes += successes
        if self.episodes < self.min_episodes:
            return False
        passed = self.successes >= self.threshold * self.episodes
        self.episodes = self.successes = 0  # the next window starts empty
        if passed:
            self.level += 1
        return passed

    def state_dict(self) -> dict[str, Any]:
        return {"level": self.level, "episodes": self.episodes, "successes": self.successes}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.level = int(state["level"])
        self.episodes = int(state["episodes"])
        self.successes = int(state["successes"])
