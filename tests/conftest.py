"""Shared test set-up: one CPU thread, and one tiny SFT + RL run that several test files read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny SFT model and a 2-iteration RL run on it (about 15 s on one CPU core)."""
    import dataclasses

    from training.rl.test_ppo_delta_smoke import make_tiny_sft, smoke_config
    from training.rl.trainer import train_ppo

    root = tmp_path_factory.mktemp("tiny_run")
    sft = make_tiny_sft(root / "sft")
    config = dataclasses.replace(
        smoke_config(sft, root / "rl"),
        num_iterations=2,
        save_every=1,
        critic_warmup_iterations=0,
        select_policy=False,  # final.pt is the trained residual, whatever the tiny evaluation says
    )
    train_ppo(config)
    return {"sft": sft, "rl_dir": root / "rl", "root": root}


@pytest.fixture
def compiled_step_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Counts the minibatches that ``--compile-update`` stepped: ``"step"`` for each compiled whole
    step (one process), ``"loss"`` for each loss compiled alone (torchrun)."""
    from training.rl import minibatch

    calls: list[str] = []

    def counting(kind: str, compiled):
        def call(*args):
            calls.append(kind)
            return compiled()(*args)

        return lambda: call

    monkeypatch.setattr(
        minibatch, "compiled_minibatch_step", counting("step", minibatch.compiled_minibatch_step)
    )
    monkeypatch.setattr(
        minibatch, "compiled_minibatch_loss", counting("loss", minibatch.compiled_minibatch_loss)
    )
    return calls
