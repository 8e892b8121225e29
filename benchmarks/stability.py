"""What the stable fine-tuning options buy on the toy world: KL to SFT, progressive exploration, curriculum.

Each variant is the README's PPO command plus its extra flags, on the same SFT model and seed;
each is then compared with the SFT model on the same 100 development scenarios (this benchmark
chooses defaults, so it never reads the test range).

    python -m benchmarks.stability --sft-checkpoint out/sft_waypoint_bc_torch_v0/model.pt \\
        --out-root out/stability --variants no_kl kl_adaptive_0.4 [--json out/stability.json]

Variants run one after another (each about 4-7 min on one CPU core); ``--list`` shows them.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from eval.compare_sft_vs_rl import main as compare_main
from training.common.errors import exit_on_user_error
from training.common.seeds import DEV_SEED_START
from training.rl.train_ppo_delta_waypoint import main as ppo_main

PPO_COMMAND = ["--env", "toy", "--num-iterations", "100", "--batch-size", "64", "--lr", "3e-4"]
VARIANTS: dict[str, list[str]] = {
    "no_kl": ["--kl-coef", "0"],
    "kl_adaptive_0.4": ["--kl-coef", "1.0", "--kl-target", "0.4"],  # the default
    "kl_adaptive_0.2": ["--kl-coef", "1.0", "--kl-target", "0.2"],  # the default until 2026-12-03
    "kl_adaptive_0.05": ["--kl-coef", "1.0", "--kl-target", "0.05"],
    "kl_fixed_1": ["--kl-coef", "1.0", "--kl-target", "none"],
    "kl_fixed_10": ["--kl-coef", "10.0", "--kl-target", "none"],
    "explore_warmup_20": ["--kl-coef", "0", "--exploration-warmup-iterations", "20"],
    "explore_warmup_20_bound": ["--kl-coef", "0", "--exploration-warmup-iterations", "20", "--warmup-bound"],
    "hard_from_start": ["--kl-coef", "0", "--difficulty", "1.0"],
    "curriculum": ["--kl-coef", "0", "--difficulty", "1.0", "--curriculum", "--curriculum-start", "0.5"],
}
KEYS = ("ade", "fde", "route_completion", "collision_rate", "off_road_rate", "mean_abs_jerk")


def run_variant(name: str, sft: Path, root: Path, seed: int) -> dict:
    out_dir = root / name
    started = time.perf_counter()
    run_flags = ["--seed", str(seed), "--overwrite", "--no-progress"]
    ppo_main(
        ["--sft-checkpoint", str(sft), "--out-dir", str(out_dir), *PPO_COMMAND, *VARIANTS[name], *run_flags]
    )
    wall = time.perf_counter() - started
    # a benchmark that chooses defaults reads the development scenarios, never the test range
    rl = str(out_dir / "final.pt")
    compare_argv = ["--sft-checkpoint", str(sft), "--rl-checkpoint", rl, "--seed", str(DEV_SEED_START)]
    compare_main([*compare_argv, "--animations", "0"])  # the numbers only
    return collect_row(name, out_dir, wall)


def collect_row(name: str, out_dir: Path, wall: float | None = None) -> dict:
    """The variant's row from the files its run and comparison left in ``out_dir``."""
    report = json.loads((out_dir / "compare" / "compare.json").read_text())
    train = json.loads((out_dir / "train_metrics.json").read_text())
    last = train[-1]
    return {
        "variant": name,
        "flags": VARIANTS[name],
        "sft": {k: report["sft"][k] for k in KEYS},
        "rl": {k: report["rl"][k] for k in KEYS},
        "final_kl_to_sft": last["kl_to_sft"],
        "final_delta_norm_m": last["delta_norm"],
        "max_kl_to_sft": max(r["kl_to_sft"] for r in train),
        "final_kl_coef": last["kl_coef"],
        "final_curriculum_level": last["curriculum_level"],
        "iteration_reaching_top_level": next(
            (r["iteration"] for r in train if r["difficulty"] == train[-1]["difficulty"]), None
        ),
        "compare_difficulty": report.get("difficulty"),
        "rl_wall_time_s": wall,
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| variant | ADE SFT -> RL (m) | collision | off-road | route compl. | jerk | KL to SFT "
        "| delta (m) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        sft, rl = row["sft"], row["rl"]
        lines.append(
            f"| {row['variant']} | {sft['ade']:.3f} -> {rl['ade']:.3f} | "
            f"{sft['collision_rate']:.2f} -> {rl['collision_rate']:.2f} | "
            f"{sft['off_road_rate']:.2f} -> {rl['off_road_rate']:.2f} | "
            f"{sft['route_completion']:.2f} -> {rl['route_completion']:.2f} | "
            f"{sft['mean_abs_jerk']:.2f} -> {rl['mean_abs_jerk']:.2f} | "
            f"{row['final_kl_to_sft']:.2f} | {row['final_delta_norm_m']:.3f} |"
        )
    return "\n".join(lines)


@exit_on_user_error
def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.stability", description=__doc__)
    parser.add_argument("--sft-checkpoint", type=Path, required=False)
    parser.add_argument("--out-root", type=Path, default=Path("out/stability"))
    parser.add_argument(
        "--variants", nargs="+", default=["no_kl", "kl_adaptive_0.4"], choices=sorted(VARIANTS)
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--list", action="store_true", help="print the variants and their flags")
    parser.add_argument(
        "--collect-only", action="store_true", help="only tabulate variants already run in --out-root"
    )
    args = parser.parse_args(argv)
    if args.list:
        for name, flags in VARIANTS.items():
            print(f"{name}: {' '.join(flags) or '(the README command)'}")
        return []
    if args.sft_checkpoint is None and not args.collect_only:
        parser.error("--sft-checkpoint is required")
    if args.collect_only:
        rows = [collect_row(name, args.out_root / name) for name in args.variants]
    else:
        rows = [run_variant(name, args.sft_checkpoint, args.out_root, args.seed) for name in args.variants]
    print(markdown(rows))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    main()
