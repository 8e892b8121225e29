"""The demo's pipeline (``make demo``: its SFT model, then the documented PPO command, then the
comparison) for several seeds, with mean and spread of the headline numbers.

    python -m benchmarks.pipeline_seeds --seeds 0 1 2 --out-root out/seeds [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
from pathlib import Path

import torch

from training.demo import run_pipeline

KEYS = (
    "ade",
    "fde",
    "route_completion",
    "collision_rate",
    "off_road_rate",
    "episode_return",
    "mean_abs_jerk",
)


def run_seed(seed: int, root: Path, device: str) -> dict:
    result = run_pipeline(root / f"seed{seed}", device, seed, progress=False)
    report = json.loads(Path(result["compare_json"]).read_text())
    return {
        "seed": seed,
        "sft": {k: report["sft"][k] for k in KEYS},
        "rl": {k: report["rl"][k] for k in KEYS},
        "wall_time_s": result["timings"],
    }


def summarise(runs: list[dict]) -> dict:
    out = {}
    for policy in ("sft", "rl"):
        out[policy] = {}
        for key in KEYS:
            values = [r[policy][key] for r in runs]
            out[policy][key] = {"mean": statistics.fmean(values), "min": min(values), "max": max(values)}
    ade_change = [(r["rl"]["ade"] - r["sft"]["ade"]) / r["sft"]["ade"] for r in runs]
    out["ade_relative_change"] = {
        "mean": statistics.fmean(ade_change),
        "min": min(ade_change),
        "max": max(ade_change),
    }
    out["rl_wall_time_s"] = {"mean": statistics.fmean(r["wall_time_s"]["rl"] for r in runs)}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out-root", type=Path, default=Path("out/seeds"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None, help="write all numbers here")
    args = parser.parse_args()
    runs = [run_seed(seed, args.out_root, args.device) for seed in args.seeds]
    result = {
        "runs": runs,
        "summary": summarise(runs),
        "machine": {
            "platform": platform.platform(),
            "cpu_threads": torch.get_num_threads(),
            "torch": torch.__version__,
        },
    }
    text = json.dumps(result, indent=2)
    if args.json:
        args.json.write_text(text + "\n")
    print(text)


if __name__ == "__main__":
    main()
