"""RL's gain across SFT quality: SFT models from weak to strong, each refined with the documented PPO
command and compared with it on the test scenarios, over several seeds.

    python -m benchmarks.sft_sweep [--sizes 50 100 200 400 800 1600] [--noisy 200] [--seeds 0 1 2] \\
        [--out-root out/sft_sweep] [--jobs 2]

Each cell (SFT variant x seed) runs the three documented commands: the SFT trainer with
``--num-episodes N`` and epochs scaled so that every size gets about the same number of gradient
steps (``epochs_for``), the README's PPO command, and ``compare_sft_vs_rl`` with its defaults (100
test-range scenarios). ``--noisy N`` adds a variant trained on N demonstrations recorded with
``--expert-noise`` (the expert executes a perturbed plan, the labels stay clean). A cell whose
``compare.json`` exists is reused, so an interrupted sweep continues where it stopped.

Writes ``sweep.json``, ``sweep.md`` (a table: per variant the mean over seeds of SFT and RL, the mean
paired difference with the range of its per-seed 95% intervals, and how many seeds were
significantly better or worse) and ``sweep.png`` (SFT and RL against the SFT's size) under
``--out-root``.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

PPO_COMMAND = ["--env", "toy", "--num-iterations", "100", "--batch-size", "64", "--lr", "3e-4"]
# metric -> (label, lower is better)
METRICS: dict[str, tuple[str, bool]] = {
    "ade": ("ADE (m)", True),
    "failure_rate": ("collision + off-road", True),
    "route_completion": ("route completion", False),
    "mean_abs_jerk": ("mean abs jerk (m/s^3)", True),
}
EPISODE_EPOCH_BUDGET = 6400  # demonstration episodes x epochs: about the same gradient steps per size
MIN_EPOCHS, MAX_EPOCHS = 4, 64
DEFAULT_EXPERT_NOISE_M = 0.3


def epochs_for(num_episodes: int) -> int:
    """Epochs for ``num_episodes`` demonstrations: ``EPISODE_EPOCH_BUDGET / N``, within bounds."""
    return max(MIN_EPOCHS, min(MAX_EPOCHS, round(EPISODE_EPOCH_BUDGET / num_episodes)))


@dataclass(frozen=True)
class Variant:
    """One SFT model recipe: demonstrations, epochs and the expert's noise while recording.

    ``epochs`` None scales them with the size (``epochs_for``, trained to convergence); a fixed
    number stops earlier, as the SFT trainer's defaults do (``TRAINER_DEFAULT``).
    """

    num_episodes: int
    expert_noise_m: float = 0.0
    epochs: int | None = None

    @property
    def num_epochs(self) -> int:
        return self.epochs if self.epochs is not None else epochs_for(self.num_episodes)

    @property
    def name(self) -> str:
        epochs = f"_epochs{self.epochs}" if self.epochs is not None else ""
        noise = f"_noise{self.expert_noise_m:g}" if self.expert_noise_m else ""
        return f"sft{self.num_episodes}{epochs}{noise}"

    def sft_flags(self) -> list[str]:
        flags = ["--num-episodes", str(self.num_episodes), "--epochs", str(self.num_epochs)]
        return flags + (["--expert-noise", str(self.expert_noise_m)] if self.expert_noise_m else [])


DEMO_DEFAULT = Variant(20)  # what `make demo` trains (training.demo.TOY_DEMO_SFT): 20 demos, converged
TRAINER_DEFAULT = Variant(200, epochs=4)  # the SFT trainer's defaults: stops before convergence


def run_cell(variant: Variant, seed: int, root: Path, device: str, reward: str = "shaped") -> dict[str, Any]:
    """SFT, PPO and the comparison for one variant and seed (reused when already done)."""
    from eval.compare_sft_vs_rl import main as compare_main
    from training.rl.train_ppo_delta_waypoint import main as ppo_main
    from training.sft.train_waypoint_bc_torch_v0 import main as sft_main

    cell = root / variant.name / f"seed{seed}"
    sft_dir, rl_dir = cell / "sft", cell / "rl"
    compare_json = rl_dir / "compare" / "compare.json"
    timings: dict[str, float] = {}
    if not compare_json.is_file():
        common = ["--device", device, "--seed", str(seed), "--overwrite"]
        started = time.perf_counter()
        sft_main(["--out-dir", str(sft_dir), *variant.sft_flags(), *common])
        timings["sft_s"] = time.perf_counter() - started
        started = time.perf_counter()
        sft_model = str(sft_dir / "model.pt")
        ppo_flags = [*PPO_COMMAND, "--reward", reward, "--no-progress", *common]
        ppo_main(["--sft-checkpoint", sft_model, "--out-dir", str(rl_dir), *ppo_flags])
        timings["rl_s"] = time.perf_counter() - started
        started = time.perf_counter()
        rl_model = str(rl_dir / "final.pt")
        # the numbers only: no videos of each of the sweep's dozens of cells
        compare_main(
            [
                "--sft-checkpoint",
                sft_model,
                "--rl-checkpoint",
                rl_model,
                "--device",
                device,
                "--animations",
                "0",
            ]
        )
        timings["compare_s"] = time.perf_counter() - started
        cell.mkdir(parents=True, exist_ok=True)
        (cell / "timings.json").write_text(json.dumps(timings))
    return collect_cell(variant, seed, cell)


def collect_cell(variant: Variant, seed: int, cell: Path) -> dict[str, Any]:
    """The cell's numbers from the files its three commands left."""
    report = json.loads((cell / "rl" / "compare" / "compare.json").read_text())
    rows = {row["metric"]: row for row in report["rows"]}
    sft_metrics = json.loads((cell / "sft" / "metrics.json").read_text())
    rl_config = json.loads((cell / "rl" / "config.json").read_text())
    timings_path = cell / "timings.json"
    return {
        "variant": variant.name,
        "num_episodes": variant.num_episodes,
        "expert_noise_m": variant.expert_noise_m,
        "epochs": variant.num_epochs,
        "seed": seed,
        "reward": rl_config["reward"],
        "sft_open_loop_val_ade": _final_val_ade(sft_metrics),
        "selected_iteration": report["metadata"].get("rl_selected_iteration"),
        "first_scenario_seed": report["metadata"]["first_scenario_seed"],
        "episodes": report["metadata"]["episodes"],
        "metrics": {
            key: {
                name: rows[key][name]
                for name in ("sft", "rl", "difference", "ci_low", "ci_high", "improved", "worsened")
            }
            for key in METRICS
        },
        "timings": json.loads(timings_path.read_text()) if timings_path.is_file() else {},
    }


def _final_val_ade(metrics: dict[str, Any]) -> float | None:
    """The SFT trainer's held-out open-loop ADE (m) at the end of training."""
    value = metrics.get("final", {}).get("val_ade_m")
    return None if value is None else float(value)


def summarise(cells: list[dict[str, Any]], variants: list[Variant]) -> list[dict[str, Any]]:
    """Per variant: mean over seeds of SFT, RL and the paired difference; interval range; counts."""
    summary = []
    for variant in variants:
        mine = [c for c in cells if c["variant"] == variant.name]
        if not mine:
            continue
        entry: dict[str, Any] = {
            "variant": variant.name,
            "num_episodes": variant.num_episodes,
            "expert_noise_m": variant.expert_noise_m,
            "epochs": variant.num_epochs,
            "seeds": [c["seed"] for c in mine],
            "selected_iterations": [c["selected_iteration"] for c in mine],
        }
        for key in METRICS:
            values = [c["metrics"][key] for c in mine]
            entry[key] = {
                "sft": statistics.fmean(v["sft"] for v in values),
                "rl": statistics.fmean(v["rl"] for v in values),
                "sft_range": [min(v["sft"] for v in values), max(v["sft"] for v in values)],
                "rl_range": [min(v["rl"] for v in values), max(v["rl"] for v in values)],
                "difference": statistics.fmean(v["difference"] for v in values),
                "ci_low_min": min(v["ci_low"] for v in values),
                "ci_high_max": max(v["ci_high"] for v in values),
                "seeds_improved": sum(bool(v["improved"]) for v in values),
                "seeds_worsened": sum(bool(v["worsened"]) for v in values),
            }
        summary.append(entry)
    return summary


def markdown(summary: list[dict[str, Any]]) -> str:
    header = "| SFT variant | seeds | " + " | ".join(label for label, _ in METRICS.values()) + " |"
    lines = [header, "| --- | --- |" + " --- |" * len(METRICS)]
    for entry in summary:
        cells = []
        for key in METRICS:
            m = entry[key]
            verdict = f"{m['seeds_improved']} better, {m['seeds_worsened']} worse"
            cells.append(
                f"{m['sft']:.3f} -> **{m['rl']:.3f}** ({m['difference']:+.3f}; "
                f"CI [{m['ci_low_min']:+.3f}, {m['ci_high_max']:+.3f}]; {verdict})"
            )
        lines.append(f"| {entry['variant']} | {len(entry['seeds'])} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def cells_markdown(cells: list[dict[str, Any]]) -> str:
    """One row per cell: SFT -> RL per metric, the RL/SFT ADE ratio and the selected iteration."""
    header = "| SFT variant | seed | SFT val ADE (m) | " + " | ".join(label for label, _ in METRICS.values())
    lines = [header + " | RL / SFT ADE | selected iteration |", "|" + " --- |" * (len(METRICS) + 5)]
    for cell in cells:
        m = cell["metrics"]
        values = []
        for key in METRICS:
            mark = " (better)" if m[key]["improved"] else " (worse)" if m[key]["worsened"] else ""
            values.append(f"{m[key]['sft']:.3f} -> {m[key]['rl']:.3f}{mark}")
        ratio = m["ade"]["rl"] / m["ade"]["sft"]
        val_ade = cell.get("sft_open_loop_val_ade")
        lines.append(
            f"| {cell['variant']} | {cell['seed']} | {val_ade:.3f} | "
            + " | ".join(values)
            + f" | {ratio:.2f} | {cell['selected_iteration']} |"
        )
    return "\n".join(lines)


def plot_groups(
    summary: list[dict[str, Any]],
) -> tuple[list[dict[str, Any]], list[tuple[dict[str, Any], str]]]:
    """The plot's line (converged models on clean demonstrations, by size) and its marked points
    (entry, marker): noisy demonstrations ``*``, the demo's model ``s`` (on the line too), models
    stopped before convergence ``D`` (``P`` with noisy demonstrations)."""
    converged = [e for e in summary if e["epochs"] == epochs_for(e["num_episodes"])]
    line = sorted((e for e in converged if not e["expert_noise_m"]), key=lambda e: e["num_episodes"])
    marked = [(e, "*") for e in converged if e["expert_noise_m"]]
    marked += [(e, "s") for e in summary if e["variant"] == DEMO_DEFAULT.name]
    early = [e for e in summary if e not in converged]
    marked += [(e, "P" if e["expert_noise_m"] else "D") for e in early]
    return line, marked


def plot(summary: list[dict[str, Any]], path: Path) -> Path:
    """SFT and RL (mean over seeds, bars: min to max over seeds) against the SFT's demonstrations."""
    from eval.plots import RL_COLOR, SFT_COLOR, _grid, _save

    fig, axes = _grid(len(METRICS), panel_size=(3.6, 3.0))
    clean, marked = plot_groups(summary)
    for ax, (key, (label, _)) in zip(axes, METRICS.items(), strict=False):
        x = [e["num_episodes"] for e in clean]
        for side, color in (("sft", SFT_COLOR), ("rl", RL_COLOR)):
            mean = [e[key][side] for e in clean]
            low = [max(0.0, e[key][side] - e[key][f"{side}_range"][0]) for e in clean]
            high = [max(0.0, e[key][f"{side}_range"][1] - e[key][side]) for e in clean]
            ax.errorbar(x, mean, yerr=[low, high], color=color, marker="o", capsize=3, label=side.upper())
            for entry, marker in marked:
                ax.plot(entry["num_episodes"], entry[key][side], marker=marker, markersize=9, color=color)
        ax.set_xscale("log")
        ax.set_xlabel("SFT demonstration episodes")
        ax.set_title(label, fontsize=9)
        ax.grid(alpha=0.3)
    from matplotlib.lines import Line2D

    handles, _ = axes[0].get_legend_handles_labels()
    handles += [
        Line2D([], [], color="0.4", marker=marker, linestyle="none", label=label)
        for marker, label in (
            ("*", "noisy demos"),
            ("s", "demo's SFT"),
            ("D", "stopped early (SFT trainer's defaults)"),
            ("P", "stopped early, noisy demos"),
        )
    ]
    fig.legend(handles=handles, loc="upper center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0, 1, 0.9))
    return _save(fig, path)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.sft_sweep", description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="*", default=[50, 100, 200, 400, 800, 1600])
    parser.add_argument("--noisy", type=int, nargs="*", default=[200], help="sizes also run with noisy demos")
    parser.add_argument("--expert-noise", type=float, default=DEFAULT_EXPERT_NOISE_M, help="metres")
    parser.add_argument(
        "--no-demo-default",
        action="store_true",
        help="leave out the demo's SFT (20 demos) and the SFT trainer's defaults (200 demos, 4 epochs)",
    )
    parser.add_argument(
        "--noisy-trainer-default",
        action="store_true",
        help="also the SFT trainer's defaults on noisy demonstrations",
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out-root", type=Path, default=Path("out/sft_sweep"))
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--reward", default="shaped", help="the PPO runs' --reward (shaped or progress)")
    parser.add_argument("--jobs", type=int, default=2, help="cells run at once (one CPU thread each)")
    args = parser.parse_args(argv)
    variants = [] if args.no_demo_default else [DEMO_DEFAULT, TRAINER_DEFAULT]
    variants += [Variant(n) for n in args.sizes] + [Variant(n, args.expert_noise) for n in args.noisy]
    if args.noisy_trainer_default:
        variants.append(Variant(TRAINER_DEFAULT.num_episodes, args.expert_noise, TRAINER_DEFAULT.epochs))
    variants = list(dict.fromkeys(variants))  # --sizes 20 is the demo's SFT again: run it once
    tasks = [(v, s) for v in variants for s in args.seeds]
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(run_cell, v, s, args.out_root, args.device, args.reward) for v, s in tasks]
        cells = [future.result() for future in futures]
    summary = summarise(cells, variants)
    result = {
        "cells": cells,
        "summary": summary,
        "ppo_command": [*PPO_COMMAND, "--reward", args.reward],
        "machine": {
            "platform": platform.platform(),
            "processor": platform.processor(),
            "torch": torch.__version__,
        },
    }
    args.out_root.mkdir(parents=True, exist_ok=True)
    (args.out_root / "sweep.json").write_text(json.dumps(result, indent=2))
    (args.out_root / "sweep.md").write_text(markdown(summary) + "\n\n" + cells_markdown(cells) + "\n")
    plot(summary, args.out_root / "sweep.png")
    print(markdown(summary))
    return result


if __name__ == "__main__":
    main()
