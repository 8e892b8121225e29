"""How many aten ops one toy-world step issues, counted with ``torch.profiler``.

Each top-level aten op (one not called by another aten op, views included) is at least one
kernel launch on a GPU, so this count, not the FLOPs, bounds an eager world step at small
batches: ``python -m benchmarks.op_count --num-envs 8,1024``.
"""

from __future__ import annotations

import argparse
import json

import torch
from torch.profiler import ProfilerActivity, profile

from training.envs.toy import ToyWaypointEnv, ToyWorldConfig

_STEPS = 60  # more than an episode (50 steps), so every world autoresets at least once


def _top_level_aten_ops(events: list) -> int:
    def inside_aten(event: object) -> bool:
        parent = event.cpu_parent
        while parent is not None:
            if parent.name.startswith("aten::"):
                return True
            parent = parent.cpu_parent
        return False

    return sum(1 for e in events if e.name.startswith("aten::") and not inside_aten(e))


def world_ops_per_step(
    num_envs: int, device: str = "cpu", steps: int = _STEPS, seed: int = 0
) -> dict[str, float]:
    """Top-level aten ops of each of ``steps`` world steps under the expert's plans plus noise
    (so some worlds crash and every world autoresets): the largest and the mean."""
    env = ToyWaypointEnv(ToyWorldConfig(num_envs=num_envs), device=device)
    env.reset(seed=seed)
    generator = torch.Generator(device=env.device).manual_seed(seed)
    counts = []
    for _ in range(steps):
        noise = torch.randn(num_envs, env.spec.num_waypoints, 2, generator=generator, device=env.device)
        plan = env.expert_waypoints() + 0.5 * noise
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            env.step(plan)
        counts.append(_top_level_aten_ops(prof.events()))
    return {"max": max(counts), "mean": sum(counts) / len(counts), "min": min(counts)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-envs", default="8,1024", help="comma-separated world counts")
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    sizes = [int(part) for part in args.num_envs.split(",")]
    print(json.dumps({str(n): world_ops_per_step(n, args.device) for n in sizes}))


if __name__ == "__main__":
    main()
