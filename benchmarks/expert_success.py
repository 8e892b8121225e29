"""How often the expert, driving its own waypoints, finishes an episode cleanly.

    python -m benchmarks.expert_success [--env toy] [--episodes 1000] [--difficulty 0.5] [--seed S]
        [--compile-world]
    python -m benchmarks.expert_success --env metadrive --episodes 100 [--workers 2] [--seed S]

Uses the deterministic closed-loop evaluator on held-out scenario seeds ``seed .. seed + episodes - 1``
(default: the start of the development range); prints one JSON object. ``--env metadrive`` runs
``--workers`` MetaDrive worlds in parallel (one process each) and lists every episode that did not
reach its destination cleanly under ``unfinished`` (seed, outcome, route completion, length), with,
for a collision, what the ego touched and which of the two was moving into the other (``collision``;
see ``training/envs/metadrive/collisions.py``); ``collisions_closed_by`` counts them.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from eval.closed_loop import collisions_closed_by, run_closed_loop
from eval.metrics import summarise
from training.common.device import resolve_device, set_cpu_threads
from training.common.errors import exit_on_user_error
from training.common.seeds import DEV_SEED_START
from training.envs.options import EnvOptions
from training.envs.registry import check_compile_world, make_env

TOY_MAX_WORLDS = 250  # the toy world runs this many episodes at once


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--env", choices=("toy", "metadrive"), default="toy")
    parser.add_argument("--episodes", type=int, default=1000)
    parser.add_argument("--difficulty", type=float, default=0.5)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seed", type=int, default=DEV_SEED_START)
    parser.add_argument(
        "--workers", type=int, default=2, help="--env metadrive: worlds (processes) in parallel"
    )
    parser.add_argument(
        "--compile-world", action="store_true", help="--env toy: each world step one compiled graph"
    )
    args = parser.parse_args(argv)
    if args.compile_world:
        check_compile_world([args.env], resolve_device(args.device), args.device)
    set_cpu_threads(1)
    worlds = min(args.episodes, TOY_MAX_WORLDS if args.env == "toy" else max(args.workers, 1))
    options = EnvOptions(difficulty=args.difficulty, compile_world=args.compile_world)
    env = make_env(args.env, worlds, resolve_device(args.device), options=options)
    try:
        # The expert's plan for the observation is held by the env; the evaluator asks the policy for
        # waypoints right after the env produced them, so the policy can read them back from the env.
        result = run_closed_loop(
            env, lambda obs: env.expert_waypoints(), seed=args.seed, num_episodes=args.episodes
        )
        collisions = env.collision_reports()
    finally:
        env.close()
    eps = result.episodes
    clean = sum(1 for e in eps if not e["collision"] and not e["off_road"] and e["goal_reached"])
    summary = summarise(eps)
    report: dict[str, Any] = {
        "env": args.env,
        "episodes": len(eps),
        "difficulty": args.difficulty,
        "seed": args.seed,
        "compile_world": args.compile_world,
        "finished_clean_rate": clean / len(eps),
        "collision_rate": summary["collision_rate"],
        "off_road_rate": summary["off_road_rate"],
        "route_completion": summary["route_completion"],
        "mean_abs_lateral_m": summary["mean_abs_lateral_m"],
        "ade_m": summary["ade"],
        "wall_time_s": result.wall_time_s,
        "torch": torch.__version__,
    }
    if args.env != "toy":
        report["time_limit_rate"] = sum(1 for e in eps if _outcome(e) == "time limit") / len(eps)
        report["unfinished"] = [_unfinished(e, collisions) for e in eps if _outcome(e) != "goal"]
    if collisions is not None:
        report["collisions_closed_by"] = collisions_closed_by(collisions, eps)
    print(json.dumps(report, indent=2))


def _outcome(episode: dict[str, Any]) -> str:
    if episode["collision"]:
        return "collision"
    if episode["off_road"]:
        return "off road"
    return "goal" if episode["goal_reached"] else "time limit"


def _unfinished(episode: dict[str, Any], collisions: dict[int, dict[str, Any]] | None) -> dict[str, Any]:
    entry = {
        "scenario_seed": episode["scenario_seed"],
        "outcome": _outcome(episode),
        "route_completion": round(episode["route_completion"], 3),
        "length": episode["length"],
    }
    if collisions is not None and episode["collision"]:
        entry["collision"] = collisions.get(episode["scenario_seed"])
    return entry


if __name__ == "__main__":
    main()
