"""End-to-end smoke test of the residual PPO pipeline, seconds on a laptop CPU.

    python -m training.rl.test_ppo_delta_smoke [--sft-checkpoint model.pt] [--work-dir DIR]

Trains a tiny SFT model when none is given, runs a few PPO iterations, and checks the files a
run leaves and the invariants of the method (frozen SFT, iteration 0 drives like SFT, safe
checkpoints). Prints a short summary; exits 1 on any failed check, 2 on bad input.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from eval.closed_loop import run_closed_loop
from eval.metrics import summarise
from training.common.errors import exit_on_user_error
from training.envs.registry import make_env
from training.rl.checkpoint import load_rl_checkpoint
from training.rl.config import PPOConfig
from training.rl.evaluation import EVAL_METRICS
from training.rl.policy import PPOPolicy
from training.rl.trainer import train_ppo
from training.sft import load_sft_model

TRAIN_KEYS = (
    "iteration",
    "env_steps",
    "policy_loss",
    "value_loss",
    "entropy",
    "clip_fraction",
    "approx_kl",
    "explained_variance",
    "episode_return",
    "steps_per_s",
)
EVAL_KEYS = ("iteration", *EVAL_METRICS)


class SmokeFailure(AssertionError):
    """A check of the smoke test failed."""


def check(condition: bool, message: str) -> None:
    if not condition:
        raise SmokeFailure(message)


def make_tiny_sft(out_dir: Path) -> Path:
    """A small behaviour-cloned model trained in seconds."""
    from training.sft.train_waypoint_bc_torch_v0 import SFTTrainConfig, train_sft

    config = SFTTrainConfig(
        out_dir=str(out_dir),
        num_episodes=8,
        val_episodes=4,
        episodes_per_batch=8,
        epochs=1,
        batch_size=64,
        device="cpu",
        seed=0,
    )
    return Path(train_sft(config, show_progress=False)["model_path"])


def smoke_config(sft_checkpoint: Path, out_dir: Path) -> PPOConfig:
    return PPOConfig(
        sft_checkpoint=str(sft_checkpoint),
        out_dir=str(out_dir),
        num_iterations=3,
        num_envs=4,
        rollout_steps=8,
        batch_size=16,
        update_epochs=2,
        eval_every=1,
        eval_episodes=4,
        save_every=2,
        device="cpu",
        progress=False,
        critic_warmup_iterations=1,
    )


def check_run_files(out_dir: Path, config: PPOConfig) -> dict[str, Any]:
    """Every file of the documented run layout exists and parses; return the metrics."""
    iterations = list(range(1, config.num_iterations + 1))
    saves = [
        f"checkpoint_iter_{i}.pt" for i in iterations if config.save_every and i % config.save_every == 0
    ]
    for name in ("config.json", "train_metrics.json", "eval_metrics.json", "final.pt", *saves):
        check((out_dir / name).is_file(), f"missing {name} in {out_dir}")
    check(any(out_dir.glob("events.out.tfevents.*")), "no TensorBoard events file")
    saved = json.loads((out_dir / "config.json").read_text())
    check(saved["num_iterations"] == config.num_iterations, "config.json does not hold the run's settings")
    check(len(saved.get("sft_sha256", "")) == 64, "config.json lacks the SFT checkpoint's sha256")
    train = json.loads((out_dir / "train_metrics.json").read_text())
    evals = json.loads((out_dir / "eval_metrics.json").read_text())
    check([r["iteration"] for r in train] == iterations, "train_metrics.json must hold each iteration once")
    evaluated = [0] + [
        i for i in iterations if (config.eval_every and i % config.eval_every == 0) or i == iterations[-1]
    ]
    check([r["iteration"] for r in evals] == evaluated, f"eval_metrics.json must hold iterations {evaluated}")
    for record in train:
        missing = [k for k in TRAIN_KEYS if k not in record]
        check(not missing, f"train record lacks {missing}")
        check(
            all(math.isfinite(record[k]) for k in TRAIN_KEYS if k != "episode_return"),
            "non-finite train metric",
        )
    for record in evals:
        missing = [k for k in EVAL_KEYS if k not in record]
        check(not missing, f"eval record lacks {missing}")
    for name in ("final.pt", *saves):
        checkpoint = load_rl_checkpoint(out_dir / name)  # weights_only=True inside
        check(checkpoint["sft_sha256"] == saved["sft_sha256"], f"{name} does not record the SFT sha256")
    return {"train": train, "eval": evals}


def check_invariants(sft_path: Path, config: PPOConfig, trained_policy: torch.nn.Module, evals: list) -> None:
    """Frozen SFT, zero-initialised residual, and an iteration-0 evaluation equal to SFT's own."""
    reference = load_sft_model(sft_path)
    for (name, before), after in zip(
        reference.state_dict().items(), trained_policy.sft_model.state_dict().values(), strict=True
    ):
        check(torch.equal(before, after.cpu()), f"SFT parameter {name} changed during RL")
    check(not trained_policy.sft_model.training, "SFT model left eval mode")

    fresh = PPOPolicy(load_sft_model(sft_path), config.policy_settings())
    env = make_env("toy", config.eval_episodes, "cpu", config.difficulty)
    obs = env.reset(seed=config.eval_seed)
    with torch.no_grad():
        check(
            torch.equal(fresh.deterministic_waypoints(obs.bev, obs.state), reference(obs.bev, obs.state)),
            "at initialisation the policy's plan differs from the SFT plan",
        )
    sft_only = summarise(
        run_closed_loop(
            env,
            lambda obs: reference(obs.bev, obs.state),
            seed=config.eval_seed,
            num_episodes=config.eval_episodes,
        ).episodes
    )
    check(abs(sft_only["ade"] - evals[0]["ade"]) < 1e-6, "iteration-0 evaluation is not the SFT model's")


def run_smoke(work_dir: Path, sft_checkpoint: Path | None = None) -> dict[str, Any]:
    started = time.perf_counter()
    sft_path = sft_checkpoint or make_tiny_sft(work_dir / "sft")
    config = smoke_config(sft_path, work_dir / "rl")
    result = train_ppo(config)
    metrics = check_run_files(Path(config.out_dir), config)
    check_invariants(sft_path, config, result["policy"], metrics["eval"])
    return {
        "wall_time_s": time.perf_counter() - started,
        "iterations": len(metrics["train"]),
        "env_steps": metrics["train"][-1]["env_steps"],
        "ade_sft": metrics["eval"][0]["ade"],
        "ade_final": metrics["eval"][-1]["ade"],
        "out_dir": config.out_dir,
    }


@exit_on_user_error
def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.rl.test_ppo_delta_smoke", description=__doc__)
    parser.add_argument(
        "--sft-checkpoint", type=Path, default=None, help="SFT model.pt (default: train a tiny one)"
    )
    parser.add_argument(
        "--work-dir", type=Path, default=None, help="where to write (default: a temporary folder)"
    )
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory(prefix="ppo-smoke-") as tmp:
        work_dir = args.work_dir or Path(tmp)
        try:
            summary = run_smoke(work_dir, args.sft_checkpoint)
        except SmokeFailure as failure:
            print(f"SMOKE TEST FAILED: {failure}", file=sys.stderr)
            return 1
    print(
        f"smoke test passed in {summary['wall_time_s']:.1f}s: {summary['iterations']} iterations, "
        f"{summary['env_steps']} env steps, "
        f"ADE SFT {summary['ade_sft']:.3f} m -> RL {summary['ade_final']:.3f} m"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
