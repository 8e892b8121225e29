"""How often the toy world's expert, driving its own waypoints, finishes an episode cleanly.

    python -m benchmarks.expert_success [--episodes 1000] [--difficulty 0.5] [--device cpu]

Uses the deterministic closed-loop evaluator on held-out scenario seeds; prints one JSON object.
"""

from __future__ import annotations

import argparse
import json

import torch

from eval.closed_loop import run_closed_loop
from eval.metrics import summarise
from training.common.device import resolve_device, set_cpu_threads
from training.common.seeds import DEV_SEED_START
from training.envs.registry import make_env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--difficulty", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=DEV_SEED_START)
    args = parser.parse_args()
    set_cpu_threads(1)
    env = make_env("toy", min(args.episodes, 250), resolve_device(args.device), args.difficulty)
    # The expert's plan for the observation is held by the env; the evaluator asks the policy for
    # waypoints right after the env produced them, so the policy can read them back from the env.
    result = run_closed_loop(
        env, lambda obs: env.expert_waypoints(), seed=args.seed, num_episodes=args.episodes
    )
    eps = result.episodes
    clean = sum(1 for e in eps if not e["collision"] and not e["off_road"] and e["goal_reached"])
    summary = summarise(eps)
    print(
        json.dumps(
            {
                "episodes": len(eps),
                "difficulty": args.difficulty,
                "finished_clean_rate": clean / len(eps),
                "collision_rate": summary["collision_rate"],
                "off_road_rate": summary["off_road_rate"],
                "route_completion": summary["route_completion"],
                "mean_abs_lateral_m": summary["mean_abs_lateral_m"],
                "ade_m": summary["ade"],
                "wall_time_s": result.wall_time_s,
                "torch": torch.__version__,
            },
            indent=2,
        )
    )


if __name__ == "__main__":
    main()
