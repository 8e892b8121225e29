"""The whole job on the toy world: SFT, then residual PPO, then the paired comparison.

    python -m training.demo [--out-root out] [--device cpu]

This is what ``make demo`` runs. Each stage is the documented command with its defaults, so the
numbers it prints are the ones README reports; the demo owns ``--out-root`` and replaces a
previous demo there.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import torch

from eval.compare_sft_vs_rl import main as compare_main
from training.common.cli import console_script
from training.common.errors import exit_on_user_error
from training.rl.train_ppo_delta_waypoint import main as ppo_main
from training.sft.train_waypoint_bc_torch_v0 import main as sft_main


def _stage(title: str) -> float:
    print(f"\n=== {title} ===", flush=True)
    return time.perf_counter()


def run_pipeline(root: Path, device: str, seed: int, progress: bool = True) -> dict:
    """SFT with its defaults, then the documented PPO command, then the comparison.

    Returns the comparison's result (``compare_md``, ``compare_json``, ``rows``) and the
    wall time of each stage in seconds under ``timings``.
    """
    sft_dir, rl_dir = root / "sft_waypoint_bc_torch_v0", root / "rl_delta_ppo_v0"
    common = ["--device", device, "--seed", str(seed), "--overwrite"]
    timings = {}

    t = _stage("1/3 behaviour cloning (SFT) on expert demonstrations")
    sft_main(["--out-dir", str(sft_dir), *common])
    timings["sft"] = time.perf_counter() - t

    t = _stage("2/3 residual PPO on the frozen SFT model")
    ppo_flags = ["--env", "toy", "--num-iterations", "100", "--batch-size", "64", "--lr", "3e-4"]
    ppo_flags += [] if progress else ["--no-progress"]
    ppo_main(["--sft-checkpoint", str(sft_dir / "model.pt"), "--out-dir", str(rl_dir), *ppo_flags, *common])
    timings["rl"] = time.perf_counter() - t

    t = _stage("3/3 paired closed-loop comparison on held-out scenarios")
    result = compare_main(
        [
            "--sft-checkpoint",
            str(sft_dir / "model.pt"),
            "--rl-checkpoint",
            str(rl_dir / "final.pt"),
            "--device",
            device,
        ]
    )
    timings["compare"] = time.perf_counter() - t
    return {**result, "timings": timings}


@exit_on_user_error
def main(argv: Sequence[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(prog="python -m training.demo", description=__doc__)
    parser.add_argument("--out-root", default="out", help="folder for the three stages' outputs")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or auto")
    parser.add_argument("--seed", type=int, default=0, help="run seed of the SFT and RL stages")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = run_pipeline(Path(args.out_root), args.device, args.seed)
    timings = result["timings"]
    total = time.perf_counter() - started
    print(
        f"\ndemo finished in {total / 60:.1f} min (SFT {timings['sft']:.0f}s, RL {timings['rl']:.0f}s, "
        f"compare {timings['compare']:.0f}s) on {torch.get_num_threads()} CPU thread(s)"
    )
    print(f"report: {result['compare_md']}")
    return Path(result["compare_md"])


cli = console_script(main)  # the console script; `python -m` stays the documented form

if __name__ == "__main__":
    main()
