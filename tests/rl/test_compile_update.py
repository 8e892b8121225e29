"""``--compile-update``: each minibatch's whole step (one process), or its loss (torchrun), compiled.

The compiled step must take the eager step (to rounding): the same loss, gradients, clip, NaN
guard and Adam, in torch.optim.Adam's own state; take every value that changes during a run (the
adaptive KL coefficient, the exploration schedule, the learning rate) as an input rather than
compile it in; and be refused where it has never run.
"""

from __future__ import annotations

import json
from pathlib import Path
from unittest import mock

import pytest
import torch

from tests.cli_helpers import assert_one_line_error, run_cli
from tests.rl.test_ppo_update import SETTINGS, _bandit_buffer, _flat_params
from tests.rl.test_trainer_cli import TINY
from training.common.errors import UserError
from training.rl import train_ppo_delta_waypoint
from training.rl.config import PPOConfig
from training.rl.distributed import DistContext
from training.rl.minibatch import (
    CompiledSteps,
    EagerSteps,
    LossTerms,
    MinibatchStds,
    UpdateSettings,
    compiled_minibatch_loss,
    minibatch_loss,
    minibatch_steps,
)
from training.rl.policy import Exploration, PPOPolicy
from training.rl.trainer import ppo_update


@pytest.fixture(autouse=True)
def fresh_compile_cache() -> None:
    """Each test starts from no graph: other tests' graphs (other head sizes, other loss terms)
    count towards torch's recompile limit, past which the loss would quietly run eagerly."""
    torch._dynamo.reset()


def _terms(critic_only: bool) -> LossTerms:
    return LossTerms(
        clip_epsilon=0.2,
        value_coef=0.5,
        entropy_coef=0.01,
        normalize_advantages=True,
        value_clip=0.2,
        residual_l2_coef=0.1,
        kl_penalty=True,
        critic_only=critic_only,
    )


def _loss_and_gradients(policy: PPOPolicy, loss_fn, batch, kl_coef, terms) -> tuple[dict, list]:
    stds = MinibatchStds(policy.std(), policy.std(), policy.reference_std())
    policy.zero_grad(set_to_none=True)
    loss, stats = loss_fn(policy, batch, stds, kl_coef, terms)
    loss.backward()
    grads = [None if p.grad is None else p.grad.clone() for p in policy.trainable_parameters()]
    return {"loss": loss.detach(), **stats}, grads


@pytest.mark.parametrize("critic_only", [False, True])
def test_the_compiled_loss_and_its_gradients_are_the_eager_ones(policy: PPOPolicy, critic_only: bool) -> None:
    with torch.no_grad():
        policy.delta_head.net[-1].bias.fill_(0.1)  # a residual: the L2 and KL terms are not 0
        policy.log_std.add_(0.3)  # and the std has moved from the reference's
    batch = next(_bandit_buffer(policy).minibatches(32, torch.Generator().manual_seed(0)))
    terms = _terms(critic_only)
    eager, eager_grads = _loss_and_gradients(policy, minibatch_loss, batch, 0.5, terms)
    compiled, compiled_grads = _loss_and_gradients(
        policy, compiled_minibatch_loss(), batch, torch.tensor(0.5), terms
    )
    assert eager.keys() == compiled.keys()
    for name in eager:
        torch.testing.assert_close(compiled[name], eager[name], rtol=1e-5, atol=1e-6, msg=name)
    # No gradient at all (not zeros) for the actor in the warm-up: Adam must skip it, not count a step.
    actor_grads = compiled_grads[: len(list(policy.delta_head.parameters()))] + compiled_grads[-1:]
    assert all(g is None for g in actor_grads) == critic_only
    assert [g is None for g in compiled_grads] == [g is None for g in eager_grads]
    for got, expected in zip(compiled_grads, eager_grads, strict=True):
        if expected is not None:
            torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-6)


def _adam_state(optimizer: torch.optim.Optimizer) -> list[dict[str, torch.Tensor]]:
    return [
        {k: v.clone() for k, v in optimizer.state[p].items()} for p in optimizer.param_groups[0]["params"]
    ]


UPDATE_CASES = {
    "actor and critic": {},
    "critic warm-up": {"critic_only": True},
    # the trainer's fused Adam, a scaled exploration and learning rate, a clip that binds
    "trainer's Adam, clipped": {
        "fused": True,
        "scale": 0.5,
        "lr": 3e-3,
        "max_grad_norm": 0.02,
        "clip_binds": True,
    },
    "no clip": {"max_grad_norm": None},
}


@pytest.mark.parametrize("case", UPDATE_CASES.values(), ids=UPDATE_CASES.keys())
def test_a_compiled_update_moves_the_policy_as_the_eager_one_does(policy: PPOPolicy, case: dict) -> None:
    buffer = _bandit_buffer(policy)
    initial = policy.heads_state_dict()
    policy.exploration = Exploration(case.get("scale", 1.0), case.get("scale", 1.0))
    settings = {**SETTINGS, "max_grad_norm": case.get("max_grad_norm", SETTINGS["max_grad_norm"])}
    results = []
    for compile_loss in (False, True):
        policy.load_heads_state_dict(initial)
        params = policy.trainable_parameters()
        optimizer = torch.optim.Adam(params, lr=case.get("lr", 1e-3), fused=case.get("fused"))
        stats = ppo_update(
            policy, optimizer, buffer, kl_coef=0.3, residual_l2_coef=0.1, compile_loss=compile_loss,
            critic_only=case.get("critic_only", False), generator=torch.Generator().manual_seed(7),
            **settings,
        )  # fmt: skip
        results.append((stats, _flat_params(policy), _adam_state(optimizer)))
    (eager_stats, eager_params, eager_adam), (compiled_stats, compiled_params, compiled_adam) = results
    assert not torch.equal(eager_params, _flat_params_of(initial, policy))  # the update did move it
    if case.get("clip_binds"):
        assert eager_stats["grad_norm"] > 5 * settings["max_grad_norm"]
    torch.testing.assert_close(compiled_params, eager_params, rtol=1e-4, atol=1e-6)
    assert compiled_stats.keys() == eager_stats.keys()
    for name, value in eager_stats.items():
        assert compiled_stats[name] == pytest.approx(value, rel=1e-4, abs=1e-6), name
    # Adam's state is torch's own, in torch's layout: the warm-up creates none for the actor
    for eager_state, compiled_state in zip(eager_adam, compiled_adam, strict=True):
        assert eager_state.keys() == compiled_state.keys()
        for key, value in eager_state.items():
            assert compiled_state[key].dtype == value.dtype and compiled_state[key].shape == value.shape
            torch.testing.assert_close(compiled_state[key], value, rtol=1e-4, atol=1e-6)
    actor_states = eager_adam[: len(list(policy.delta_head.parameters()))] + eager_adam[-1:]
    assert all(not state for state in actor_states) == case.get("critic_only", False)


def test_an_eager_update_carries_on_from_a_compiled_one(policy: PPOPolicy) -> None:
    """The compiled step keeps Adam's moments and step count where torch.optim.Adam keeps them."""
    buffer = _bandit_buffer(policy)
    initial = policy.heads_state_dict()
    finals = []
    for first in (False, True):
        policy.load_heads_state_dict(initial)
        optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-3)
        for compile_loss in (first, False):
            generator = torch.Generator().manual_seed(3)
            ppo_update(policy, optimizer, buffer, compile_loss=compile_loss, generator=generator, **SETTINGS)
        assert all(float(optimizer.state[p]["step"]) == 32 for p in policy.trainable_parameters())
        finals.append(_flat_params(policy))
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-4, atol=1e-6)


def test_the_compiled_step_is_for_one_process_and_a_plain_adam(policy: PPOPolicy) -> None:
    """Under torchrun the gradients are averaged between backward and step: the loss alone is
    compiled. An optimizer that is not a plain Adam takes its own step."""
    buffer = _bandit_buffer(policy)
    params = policy.trainable_parameters()
    update = UpdateSettings(_terms(False), kl_coef=0.0, max_grad_norm=1.0, kl_stop=None)

    def steps(optimizer: torch.optim.Optimizer, ctx: DistContext, compile_update: bool = True):
        return minibatch_steps(
            policy, optimizer, buffer.flat(), update, ctx=ctx, compile_update=compile_update
        )

    one, two = DistContext(), DistContext(rank=0, world_size=2)
    assert isinstance(steps(torch.optim.Adam(params), one), CompiledSteps)
    assert isinstance(steps(torch.optim.Adam(params), one, compile_update=False), EagerSteps)
    torchrun = steps(torch.optim.Adam(params), two)
    assert isinstance(torchrun, EagerSteps) and torchrun.loss_of_minibatch is compiled_minibatch_loss()
    for other in (
        torch.optim.Adam(params, weight_decay=0.1),
        torch.optim.Adam(params, amsgrad=True),
        torch.optim.AdamW(params),
        torch.optim.SGD(params, lr=0.1),
        torch.optim.Adam(params[:-1]),
    ):
        assert isinstance(steps(other, one), EagerSteps), other


def _flat_params_of(state: dict[str, torch.Tensor], policy: PPOPolicy) -> torch.Tensor:
    saved = policy.heads_state_dict()
    policy.load_heads_state_dict(state)
    flat = _flat_params(policy)
    policy.load_heads_state_dict(saved)
    return flat


def test_a_new_kl_coefficient_exploration_scale_or_learning_rate_needs_no_new_graph(
    policy: PPOPolicy,
) -> None:
    buffer = _bandit_buffer(policy)
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=1e-3)
    settings = {**SETTINGS, "update_epochs": 1}
    ppo_update(policy, optimizer, buffer, kl_coef=0.3, compile_loss=True, **settings)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for kl_coef, scale, lr in ((0.6, 1.0, 5e-4), (0.15, 0.5, 2e-4), (0.3, 0.25, 1e-4)):
            policy.exploration = Exploration(scale, scale)
            optimizer.param_groups[0]["lr"] = lr  # annealed
            before = _flat_params(policy)
            stats = ppo_update(policy, optimizer, buffer, kl_coef=kl_coef, compile_loss=True, **settings)
            assert stats["minibatch_updates"] > 0
            assert not torch.equal(_flat_params(policy), before)


def test_a_run_with_a_compiled_update_trains_and_saves(
    tiny_run: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    compiled_step_calls: list[str],
) -> None:
    out = tmp_path / "run"
    argv = ["--sft-checkpoint", str(tiny_run["sft"]), "--out-dir", str(out), *TINY, "--compile-update"]
    code, _, err = run_cli(train_ppo_delta_waypoint.main, argv, capsys)
    assert code == 0, err
    records = json.loads((out / "train_metrics.json").read_text())
    # every minibatch of the run was one compiled step (an early stop takes one more, not applied)
    expected = sum(r["minibatch_updates"] + r["skipped_updates"] + r["early_stopped"] for r in records)
    assert compiled_step_calls == ["step"] * int(expected) and expected > 0
    assert json.loads((out / "config.json").read_text())["compile_update"] is True
    assert [row["iteration"] for row in records] == [1, 2]
    assert all(row["minibatch_updates"] > 0 for row in records)
    assert (out / "final.pt").exists()


def test_compile_update_is_refused_off_the_cpu() -> None:
    config = PPOConfig(
        sft_checkpoint="model.pt", num_envs=2, batch_size=64, compile_update=True, device="cuda"
    )
    with (
        mock.patch("torch.cuda.is_available", return_value=True),
        pytest.raises(UserError, match=r"--compile-update: .*CPU only"),
    ):
        config.validate()
    PPOConfig(
        sft_checkpoint="model.pt", num_envs=2, batch_size=64, compile_update=True, device="cpu"
    ).validate()


def test_without_a_cpp_compiler_either_compile_flag_is_one_line(
    tiny_run: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from torch._inductor import config as inductor_config

    base = ["--sft-checkpoint", str(tiny_run["sft"]), "--out-dir", str(tmp_path / "run"), *TINY]
    with inductor_config.patch({"cpp.cxx": (None, "no-such-compiler-here")}):
        for flag in ("--compile-update", "--compile-world"):
            code, _, err = run_cli(train_ppo_delta_waypoint.main, [*base, flag], capsys)
            assert_one_line_error(code, err, f"{flag}: torch.compile needs a C++ compiler")
            assert "no-such-compiler-here" in err
    assert not (tmp_path / "run").exists()  # refused before anything was written
