"""RL checkpoints: the trained heads, the optimiser, RNG and world state, and the SFT link.

An RL checkpoint does not repeat the SFT weights; it records the SFT checkpoint's path and
sha256, so a comparison can refuse a mismatched pair. Everything is tensors and plain data
(``weights_only=True`` loads it).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from training.common.errors import UserError
from training.common.io import load_checkpoint, save_checkpoint
from training.rl.policy import PolicySettings, PPOPolicy, SFTModel
from training.sft.model import load_sft_model

RL_CHECKPOINT_KIND = "ppo_delta_waypoint"
RL_FORMAT_VERSION = 1


def save_rl_checkpoint(
    path: str | Path, heads: dict[str, torch.Tensor], run: dict[str, Any], **state: Any
) -> None:
    """Write an RL checkpoint atomically.

    Args:
        heads: the policy's trained part (``PPOPolicy.heads_state_dict()``).
        run: ``config`` (the PPOConfig dict, ``sft_model`` included), ``sft_checkpoint`` (path) and
            ``sft_sha256`` (of that file, whatever its form).
        state: resumable state: ``iteration``, ``env_steps``, ``optimizer``, ``rng`` ...
    """
    checkpoint = {
        "kind": RL_CHECKPOINT_KIND,
        "format_version": RL_FORMAT_VERSION,
        "heads": {k: v.detach().cpu() for k, v in heads.items()},
        **run,
        **state,
    }
    save_checkpoint(path, checkpoint)


def load_rl_checkpoint(path: str | Path) -> dict[str, Any]:
    """Load and check an RL checkpoint (``weights_only=True``); ``UserError`` when it is not one."""
    checkpoint = load_checkpoint(path, expected_kind=RL_CHECKPOINT_KIND)
    for key in ("format_version", "heads", "config", "sft_sha256"):
        if key not in checkpoint:
            raise UserError(f"RL checkpoint {path} is malformed: missing {key}")
    if checkpoint["format_version"] != RL_FORMAT_VERSION:
        raise UserError(f"RL checkpoint {path} has format_version {checkpoint['format_version']!r}")
    return checkpoint


def trained_policy(checkpoint: dict[str, Any], sft_model: SFTModel) -> PPOPolicy:
    """The policy an RL checkpoint describes, on ``sft_model``'s device, in eval mode.

    ``sft_model`` must be the model the run refined (compare ``checkpoint["sft_sha256"]``). The
    policy's settings are read from the run's configuration the checkpoint stores.
    """
    device = next(sft_model.parameters()).device
    policy = PPOPolicy(sft_model, PolicySettings.from_config(checkpoint["config"])).to(device)
    policy.load_heads_state_dict(checkpoint["heads"])  # load_state_dict copies across devices
    return policy.eval()


def load_rl_policy(
    rl_path: str | Path, sft_path: str | Path, device: torch.device | str = "cpu"
) -> tuple[PPOPolicy, dict[str, Any]]:
    """Rebuild the trained policy from an RL checkpoint and the project's SFT ``model.pt`` it refines
    (a model of another architecture: ``training.sft.external.read_sft`` and ``trained_policy``)."""
    checkpoint = load_rl_checkpoint(rl_path)
    return trained_policy(checkpoint, load_sft_model(sft_path, device)), checkpoint
