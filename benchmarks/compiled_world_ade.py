"""Does an SFT model trained on the eager toy world see the same world when the step is compiled?

    python -m benchmarks.compiled_world_ade --sft-checkpoint out/sft_waypoint_bc_torch_v0/model.pt
        [--worlds 250] [--steps 300] [--seed 1000000]

The expert drives ``--worlds`` worlds for ``--steps`` steps from scenario ``--seed``, once in the eager
world and once with ``--compile-world``'s compiled step; at every step the SFT model predicts
waypoints from the observation, and its open-loop ADE against the expert's plan is averaged. Prints
one JSON object: each world's ADE, episodes and clean finishes, and the relative ADE change.
"""

from __future__ import annotations

import argparse
import json
from typing import Any

import torch

from eval.metrics import displacement_errors
from training.common.device import set_cpu_threads
from training.common.errors import exit_on_user_error
from training.envs.toy import ToyWaypointEnv, ToyWorldConfig
from training.sft.model import WaypointModel, load_sft_model


@torch.no_grad()
def open_loop_ade(model: WaypointModel, env: ToyWaypointEnv, steps: int, seed: int) -> dict[str, Any]:
    """Mean ADE (m) of ``model`` against the expert while the expert drives, and the episodes' ends."""
    obs = env.reset(seed=seed)
    ade_sum, episodes, clean = 0.0, 0, 0
    for _ in range(steps):
        expert = env.expert_waypoints()
        ade, _ = displacement_errors(model(obs.bev, obs.state), expert)
        ade_sum += float(ade.mean())
        result = env.step(expert)
        ended = result.info.episode
        episodes += int(ended.done.sum())
        clean += int((ended.done & ended.goal_reached).sum())
        obs = result.obs
    return {"ade_m": ade_sum / steps, "episodes": episodes, "finished_clean": clean}


@exit_on_user_error
def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--sft-checkpoint", required=True)
    parser.add_argument("--worlds", type=int, default=250)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--seed", type=int, default=1_000_000)
    args = parser.parse_args(argv)
    set_cpu_threads(1)
    model = load_sft_model(args.sft_checkpoint).eval()
    config = ToyWorldConfig(num_envs=args.worlds)
    report = {
        name: open_loop_ade(model, ToyWaypointEnv(config, compile_step=compiled), args.steps, args.seed)
        for name, compiled in (("eager", False), ("compiled", True))
    }
    report["ade_change"] = report["compiled"]["ade_m"] / report["eager"]["ade_m"] - 1
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
