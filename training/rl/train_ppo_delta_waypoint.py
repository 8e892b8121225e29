"""Residual PPO on a frozen SFT waypoint model.

    python -m training.rl.train_ppo_delta_waypoint --sft-checkpoint out/sft_waypoint_bc_torch_v0/model.pt \\
        --out-dir out/rl_delta_ppo_v0 --env toy --num-iterations 100 --batch-size 64 --lr 3e-4
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from typing import Any

from training.common.cli import console_script, parse_config
from training.common.errors import exit_on_user_error
from training.rl.config import PPOConfig
from training.rl.trainer import train_ppo


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    config = parse_config(
        PPOConfig,
        argv,
        prog="python -m training.rl.train_ppo_delta_waypoint",
        description="Train a bounded residual on a frozen SFT waypoint model with PPO.",
    )
    result = train_ppo(config)
    if "baseline" not in result:  # a distributed run's other ranks: rank 0 reports
        return result
    lines = [
        _summary("SFT baseline", result["baseline"]),
        _summary(f"RL iteration {result['final']['iteration']}", result["final"]),
        _summary(f"final.pt (iteration {result['selected_iteration']})", result["selected"]),
        f"run written to {result['out_dir']} (final.pt, train_metrics.json, eval_metrics.json)",
    ]
    print("\n".join(lines), file=sys.stdout)
    return result


def _summary(label: str, record: dict[str, Any]) -> str:
    """One line of development-evaluation numbers."""
    return (
        f"{label + ':':<30} ADE {record['ade']:.3f} m, route completion {record['route_completion']:.3f}, "
        f"collision {record['collision_rate']:.3f}, off-road {record['off_road_rate']:.3f}, "
        f"jerk {record['mean_abs_jerk']:.3f} m/s^3"
    )


cli = console_script(main)  # the console script; `python -m` stays the documented form

if __name__ == "__main__":
    main()
