"""Which policy final.pt holds: the safest evaluated policy that is not worse than SFT."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

import training.rl.trainer as trainer_module
from training.rl.selection import PolicySelection, not_worse, ranks_above
from training.rl.test_ppo_delta_smoke import smoke_config
from training.rl.trainer import train_ppo

SFT = {"failure_rate": 0.20, "route_completion": 0.80, "ade": 0.40, "mean_abs_jerk": 1.0}


def _record(**changes: float) -> dict[str, float]:
    return {**SFT, **changes}


@pytest.mark.parametrize(
    ("changes", "admissible"),
    [
        ({}, True),
        ({"failure_rate": 0.0, "ade": 0.3, "mean_abs_jerk": 0.9, "route_completion": 0.95}, True),
        ({"failure_rate": 0.22}, False),
        ({"route_completion": 0.79}, False),
        ({"ade": 0.41}, False),
        ({"mean_abs_jerk": 1.04}, True),  # within the 5% tolerance on jerk
        ({"mean_abs_jerk": 1.06}, False),
        ({"ade": float("nan")}, False),
    ],
)
def test_a_candidate_must_not_be_worse_than_sft_on_any_guarded_metric(changes, admissible) -> None:
    assert not_worse(_record(**changes), SFT) is admissible


def test_ade_is_guarded_over_the_steps_both_policies_drove() -> None:
    """Driving further raises the whole-episode ADE; the guard holds the candidate's ADE over the
    steps SFT also drove (``ade_shared``) against SFT's over the same steps (``sft_ade_shared``)."""
    sft = {**SFT, "ade_shared": 0.40, "sft_ade_shared": 0.40}
    further = {**sft, "failure_rate": 0.1, "ade": 0.60, "ade_shared": 0.38, "sft_ade_shared": 0.39}
    assert not_worse(further, sft)
    assert not not_worse({**further, "ade_shared": 0.395}, sft)  # against SFT's 0.39 on its windows
    # a record without SFT's shared value (a resumed older run) is guarded on the whole-episode ADE
    assert not not_worse({key: v for key, v in further.items() if key != "sft_ade_shared"}, sft)
    mix = {**sft, "toy/ade": 0.3, "toy/ade_shared": 0.3, "toy/sft_ade_shared": 0.3}
    assert not not_worse({**further, "toy/ade": 0.3, "toy/ade_shared": 0.31, "toy/sft_ade_shared": 0.3}, mix)
    assert not_worse({**further, "toy/ade": 0.5, "toy/ade_shared": 0.29, "toy/sft_ade_shared": 0.3}, mix)


def test_in_a_mix_a_candidate_must_not_be_worse_in_any_environment() -> None:
    """Means that improve can hide one environment that got worse: each environment is guarded."""
    sft = {**SFT, "toy/failure_rate": 0.4, "metadrive/failure_rate": 0.0, "metadrive/ade": 2.4}
    better_on_average = {**sft, "failure_rate": 0.1, "toy/failure_rate": 0.1, "metadrive/ade": 2.8}
    assert not not_worse(better_on_average, sft)
    assert not_worse({**better_on_average, "metadrive/ade": 2.4}, sft)
    assert not not_worse({**better_on_average, "metadrive/ade": 2.4, "metadrive/failure_rate": 0.05}, sft)


def test_ranking_puts_safety_first_then_route_completion_then_ade() -> None:
    safer = _record(failure_rate=0.0, ade=0.39)
    more_accurate = _record(failure_rate=0.02, ade=0.20)
    assert ranks_above(safer, more_accurate) and not ranks_above(more_accurate, safer)
    further = _record(route_completion=0.9, ade=0.39)
    assert ranks_above(further, _record(route_completion=0.85, ade=0.2))
    # route completions closer than the resolution tie, and ADE decides, wherever they fall
    for near, far in ((0.902, 0.9), (0.8951, 0.8949), (0.8949, 0.8951)):
        assert ranks_above(_record(route_completion=near, ade=0.2), _record(route_completion=far, ade=0.39))
        assert not ranks_above(
            _record(route_completion=near, ade=0.39), _record(route_completion=far, ade=0.2)
        )
    assert not ranks_above(SFT, SFT)  # a tie is not a rank above


def test_selection_keeps_sft_until_a_candidate_is_admissible_and_better() -> None:
    heads = {"w": torch.zeros(1)}
    selection = PolicySelection.start(SFT, heads, {})
    assert not selection.consider(10, _record(failure_rate=0.0, mean_abs_jerk=1.2), {"w": torch.ones(1)})
    assert selection.iteration == 0 and torch.equal(selection.heads["w"], torch.zeros(1))
    assert selection.consider(20, _record(failure_rate=0.1, ade=0.35), {"w": torch.full((1,), 2.0)})
    assert not selection.consider(
        30, _record(failure_rate=0.1, ade=0.35), {"w": torch.full((1,), 3.0)}
    )  # a tie
    assert selection.iteration == 20 and selection.heads["w"].item() == 2.0
    restored = PolicySelection.from_state_dict(selection.state_dict())
    assert restored.iteration == 20 and restored.record == selection.record


def _scripted_evaluations(monkeypatch: pytest.MonkeyPatch, script: dict[int, dict[str, float]]) -> None:
    """Replace the development evaluation by scripted records per iteration."""

    def evaluate(policy, envs, config, iteration, env_steps, sft_step_ade=None):
        return {"iteration": iteration, "env_steps": env_steps, **script[iteration]}, {}

    monkeypatch.setattr(trainer_module, "evaluate", evaluate)


def _config(tiny_run, out_dir: Path, **overrides):
    """Three iterations, each evaluated and saved."""
    base = smoke_config(tiny_run["sft"], out_dir)
    return dataclasses.replace(
        base, num_iterations=3, eval_every=1, save_every=1, critic_warmup_iterations=0, **overrides
    )


def _run(tiny_run, out_dir: Path, **overrides):
    train_ppo(_config(tiny_run, out_dir, **overrides))
    return {
        name: torch.load(out_dir / name, weights_only=True) for name in ("final.pt", "checkpoint_iter_3.pt")
    }


def test_final_pt_holds_the_selected_iteration_and_the_last_stays_resumable(
    tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _scripted_evaluations(
        monkeypatch,
        {0: SFT, 1: _record(failure_rate=0.3), 2: _record(failure_rate=0.1), 3: _record(ade=0.5)},
    )
    saved = _run(tiny_run, tmp_path)
    final, last = saved["final.pt"], saved["checkpoint_iter_3.pt"]
    chosen = torch.load(tmp_path / "checkpoint_iter_2.pt", weights_only=True)
    assert final["selected_iteration"] == 2 and final["selected_eval"]["failure_rate"] == 0.1
    for name, tensor in final["heads"].items():
        assert torch.equal(tensor, chosen["heads"][name]), name
    assert any(not torch.equal(final["heads"][n], last["heads"][n]) for n in final["heads"])
    assert last["iteration"] == 3
    evals = json.loads((tmp_path / "eval_metrics.json").read_text())
    assert [r["selected_iteration"] for r in evals[1:]] == [0, 2, 2]


def test_when_rl_never_helps_final_pt_is_the_sft_policy(
    tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _scripted_evaluations(
        monkeypatch, {0: SFT, 1: _record(ade=0.45), 2: _record(mean_abs_jerk=2), 3: _record(ade=1)}
    )
    final = _run(tiny_run, tmp_path)["final.pt"]
    assert final["selected_iteration"] == 0
    delta_head_out = [n for n in final["heads"] if n.startswith("delta_head.net.") and n.split(".")[2] == "4"]
    assert delta_head_out and all(not final["heads"][n].any() for n in delta_head_out)  # zero residual


def test_without_selection_final_pt_is_the_last_iteration(
    tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _scripted_evaluations(
        monkeypatch, {0: SFT, 1: _record(), 2: _record(failure_rate=0.0), 3: _record(ade=1)}
    )
    result = train_ppo(_config(tiny_run, tmp_path, select_policy=False))
    saved = {
        name: torch.load(tmp_path / name, weights_only=True) for name in ("final.pt", "checkpoint_iter_3.pt")
    }
    assert saved["final.pt"]["selected_iteration"] == 3
    for name, tensor in saved["final.pt"]["heads"].items():
        assert torch.equal(tensor, saved["checkpoint_iter_3.pt"]["heads"][name])
    # what the command line prints as "final.pt (iteration N)": the last iteration, its evaluation
    assert result["selected_iteration"] == 3 and result["selected"]["ade"] == 1


def test_a_run_killed_between_its_last_checkpoint_and_final_pt_writes_final_pt_on_resume(
    tiny_run, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _scripted_evaluations(
        monkeypatch, {0: SFT, 1: _record(), 2: _record(failure_rate=0.1), 3: _record(ade=1)}
    )
    saved = _run(tiny_run, tmp_path)
    (tmp_path / "final.pt").unlink()  # as if killed right after checkpoint_iter_3.pt
    train_ppo(_config(tiny_run, tmp_path, resume=True))
    final = torch.load(tmp_path / "final.pt", weights_only=True)
    assert final["selected_iteration"] == saved["final.pt"]["selected_iteration"] == 2
    for name, tensor in saved["final.pt"]["heads"].items():
        assert torch.equal(final["heads"][name], tensor)


def test_a_run_measures_shared_window_ade_against_its_sft_episodes(tiny_run) -> None:
    """Iteration 0 is the SFT policy: over its own episodes the shared window is the whole episode.
    The checkpoint keeps SFT's per-step ADE, one series per development episode, for a resume."""
    rl_dir = tiny_run["rl_dir"]
    evals = json.loads((rl_dir / "eval_metrics.json").read_text())
    assert evals[0]["ade_shared"] == evals[0]["sft_ade_shared"] == pytest.approx(evals[0]["ade"], rel=1e-5)
    assert all("ade_shared" in record and "sft_ade_shared" in record for record in evals)
    config = json.loads((rl_dir / "config.json").read_text())
    selection = torch.load(rl_dir / "checkpoint_iter_2.pt", weights_only=True)["selection"]
    (series,) = selection["sft_step_ade"].values()
    assert len(series) == config["eval_episodes"]
    assert all(s.dtype == torch.float32 and s.ndim == 1 and len(s) >= 1 for s in series)
