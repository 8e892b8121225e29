"""The toy world's op budget: how many aten ops one step issues, so the count cannot creep back.

Each top-level aten op is at least one kernel launch on a GPU, whatever the number of worlds.
The budget is the count reached so far with a margin (1,357 at most over 60 steps with
autoresets, from 4,080 before the step was restructured); the goal is 150 (docs/benchmarks.md).
"""

from __future__ import annotations

import pytest

from benchmarks.op_count import world_ops_per_step

WORLD_OPS_BUDGET = 1_380


@pytest.mark.parametrize(("num_envs", "steps"), [(8, 60), (1024, 8)])
def test_a_world_step_stays_within_the_op_budget(num_envs: int, steps: int) -> None:
    counts = world_ops_per_step(num_envs, steps=steps)
    assert counts["max"] > counts["min"], "no step with an autoreset was counted"
    assert counts["max"] <= WORLD_OPS_BUDGET, f"{counts['max']} aten ops in one world step"
