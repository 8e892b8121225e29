"""The README's default pipeline (SFT defaults, then the documented PPO command, then the
comparison) for several seeds, with mean and spread of the headline numbers.

    python -m benchmarks.pipeline_seeds --seeds 0 1 2 --out-root out/seeds [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from eval.compare_sft_vs_rl import main as compare_main
from training.rl.train_ppo_delta_waypoint import main as ppo_main
from training.sft.train_waypoint_bc_torch_v0 import main as sft_main

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
    sft_dir, rl_dir = root / f"seed{seed}" / "sft", root / f"seed{seed}" / "rl"
    common = ["--device", device, "--seed", str(seed), "--overwrite"]
    t0 = time.perf_counter()
    sft_main(["--out-dir", str(sft_dir), *common])
    t1 = time.perf_counter()
    ppo_main(
        [
            "--sft-checkpoint",
            str(sft_dir / "model.pt"),
            "--out-dir",
            str(rl_dir),
            "--env",
            "toy",
            "--num-iterations",
            "100",
            "--batch-size",
            "64",
            "--lr",
            "3e-4",
            "--no-progress",
            *common,
        ]
    )
    t2 = time.perf_counter()
    compare_main(
        [
            "--sft-checkpoint",
            str(sft_dir / "model.pt"),
            "--rl-checkpoint",
            str(rl_dir / "final.pt"),
            "--device",
            device,
        ]
    )
    t3 = time.perf_counter()
    report = json.loads((rl_dir / "compare" / "compare.json").read_text())
    return {
        "seed": seed,
        "sft": {k: report["sft"][k] for k in KEYS},
        "rl": {k: report["rl"][k] for k in KEYS},
        "wall_time_s": {"sft": t1 - t0, "rl": t2 - t1, "compare": t3 - t2},
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
