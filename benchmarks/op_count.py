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


def count_step_ops(env: ToyWaypointEnv, plan: torch.Tensor) -> tuple[int, bool]:
    """Top-level aten ops of one ``env.step(plan)``, and whether that step refilled the scenario bank."""
    bank = env.scenario_bank_start()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        env.step(plan)
    return _top_level_aten_ops(prof.events()), env.scenario_bank_start() is not bank


def world_ops_per_step(
    num_envs: int, device: str = "cpu", steps: int = _STEPS, seed: int = 0, *, compile_step: bool = False
) -> dict[str, float]:
    """Top-level aten ops of each of ``steps`` world steps under the expert's plans plus noise
    (so some worlds crash and every world autoresets): the largest and the mean, and the largest
    among steps that refilled the scenario bank (``refill_max``, 0 when none did) and among those
    that did not (``step_max``).

    ``compile_step``: the world step as one compiled graph (``--compile-world``); its first step,
    which compiles, is taken before counting."""
    env = ToyWaypointEnv(ToyWorldConfig(num_envs=num_envs), device=device, compile_step=compile_step)
    env.reset(seed=seed)
    generator = torch.Generator(device=env.device).manual_seed(seed)
    if compile_step:
        env.step(env.expert_waypoints())
    counts, refilled = [], []
    for _ in range(steps):
        noise = torch.randn(num_envs, env.spec.num_waypoints, 2, generator=generator, device=env.device)
        plan = env.expert_waypoints() + 0.5 * noise
        ops, refill = count_step_ops(env, plan)
        counts.append(ops)
        refilled.append(refill)
    return {
        "max": max(counts),
        "mean": sum(counts) / len(counts),
        "min": min(counts),
        "step_max": max((c for c, r in zip(counts, refilled, strict=True) if not r), default=0),
        "refill_max": max((c for c, r in zip(counts, refilled, strict=True) if r), default=0),
        "refills": sum(refilled),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--num-envs", default="8,1024", help="comma-separated world counts")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--compile-world", action="store_true", help="the step as one compiled graph")
    args = parser.parse_args()
    sizes = [int(part) for part in args.num_envs.split(",")]
    counts = {str(n): world_ops_per_step(n, args.device, compile_step=args.compile_world) for n in sizes}
    print(json.dumps(counts))


if __name__ == "__main__":
    main()
