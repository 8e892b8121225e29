"""A run killed with SIGKILL at any moment and resumed ends exactly where an uninterrupted run does."""

from __future__ import annotations

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import assert_one_line_error, run_cli
from training.common.errors import UserError
from training.rl.config import PPOConfig
from training.rl.selection import without_timings
from training.rl.train_ppo_delta_waypoint import main as ppo_main
from training.rl.trainer import train_ppo

SETTINGS = {
    "num_iterations": 5,
    "num_envs": 4,
    "rollout_steps": 8,
    "batch_size": 16,
    "update_epochs": 2,
    "eval_every": 2,
    "eval_episodes": 4,
    "save_every": 1,
    "device": "cpu",
    "critic_warmup_iterations": 1,
}


def _flags(sft: Path, out_dir: Path) -> list[str]:
    flags = ["--sft-checkpoint", str(sft), "--out-dir", str(out_dir), "--no-progress"]
    for key, value in SETTINGS.items():
        flags += ["--" + key.replace("_", "-"), str(value)]
    return flags


def _heads(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["heads"]


def _assert_same_heads(a: Path, b: Path) -> None:
    heads_a, heads_b = _heads(a), _heads(b)
    assert heads_a.keys() == heads_b.keys()
    for name in heads_a:
        assert torch.equal(heads_a[name], heads_b[name]), name


def _assert_clean_metrics(out_dir: Path) -> None:
    train = json.loads((out_dir / "train_metrics.json").read_text())
    evals = json.loads((out_dir / "eval_metrics.json").read_text())
    assert [r["iteration"] for r in train] == list(range(1, SETTINGS["num_iterations"] + 1))
    assert [r["iteration"] for r in evals] == [0, 2, 4, 5]


def _records(path: Path) -> list[dict]:
    return [without_timings(record) for record in json.loads(path.read_text())]


def _assert_same_run(reference: Path, out_dir: Path) -> None:
    """The resumed run is the uninterrupted one: the last iteration's heads, optimizer and KL
    coefficient, every iteration's training and evaluation numbers, and ``final.pt``. (``final.pt``
    alone may hold iteration 0, the SFT policy, which any run of these settings hands back.)"""
    last = f"checkpoint_iter_{SETTINGS['num_iterations']}.pt"
    _assert_same_heads(reference / last, out_dir / last)
    saved_a, saved_b = (torch.load(d / last, weights_only=True) for d in (reference, out_dir))
    assert saved_a["kl_coef"] == saved_b["kl_coef"]
    for a, b in zip(
        saved_a["optimizer"]["state"].values(), saved_b["optimizer"]["state"].values(), strict=True
    ):
        assert all(torch.equal(a[key], b[key]) for key in a)
    for name in ("train_metrics.json", "eval_metrics.json"):
        assert _records(reference / name) == _records(out_dir / name), name
    _assert_same_heads(reference / "final.pt", out_dir / "final.pt")
    _assert_clean_metrics(out_dir)


def test_the_reference_run_trains(reference: Path) -> None:
    """Control for the resume tests: the last heads differ from the first iteration's (the first
    iteration trains the critic only), so equal heads after a resume mean something."""
    first = _heads(reference / "checkpoint_iter_1.pt")
    last = _heads(reference / f"checkpoint_iter_{SETTINGS['num_iterations']}.pt")
    assert any(not torch.equal(first[name], last[name]) for name in first if name.startswith("delta_head"))


@pytest.fixture(scope="module")
def reference(tiny_run: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    out_dir = tmp_path_factory.mktemp("reference")
    train_ppo(
        PPOConfig(sft_checkpoint=str(tiny_run["sft"]), out_dir=str(out_dir), progress=False, **SETTINGS)
    )
    return out_dir


def test_in_process_resume_from_a_middle_checkpoint_matches(
    reference: Path, tiny_run, tmp_path: Path
) -> None:
    out_dir = tmp_path / "run"
    config = PPOConfig(sft_checkpoint=str(tiny_run["sft"]), out_dir=str(out_dir), progress=False, **SETTINGS)
    train_ppo(config)
    # Forget everything after iteration 2, as if the process had died just after that checkpoint.
    for name in ("final.pt", "checkpoint_iter_3.pt", "checkpoint_iter_4.pt", "checkpoint_iter_5.pt"):
        (out_dir / name).unlink()
    resumed = PPOConfig(**{**config.__dict__, "resume": True})
    train_ppo(resumed)
    _assert_same_run(reference, out_dir)


def test_a_compiled_update_resumes_exactly(tiny_run, tmp_path: Path, compiled_step_calls: list[str]) -> None:
    """``--compile-update`` steps Adam in the optimizer's own state, which checkpoints save: resumed
    from a middle checkpoint, a compiled run ends where the uninterrupted compiled run does."""
    torch._dynamo.reset()  # graphs of other tests count towards the recompile limit
    settings = {"sft_checkpoint": str(tiny_run["sft"]), "progress": False, "compile_update": True, **SETTINGS}
    configs = [PPOConfig(out_dir=str(tmp_path / name), **settings) for name in ("reference", "run")]
    for config in configs:
        train_ppo(config)
    out_dir = Path(configs[1].out_dir)
    for name in ("final.pt", "checkpoint_iter_3.pt", "checkpoint_iter_4.pt", "checkpoint_iter_5.pt"):
        (out_dir / name).unlink()
    train_ppo(PPOConfig(**{**configs[1].__dict__, "resume": True}))
    _assert_same_run(Path(configs[0].out_dir), out_dir)
    assert set(compiled_step_calls) == {"step"}  # every update was the compiled whole step


def test_resume_refuses_changed_settings(reference: Path, tiny_run, tmp_path: Path) -> None:
    config = PPOConfig(
        sft_checkpoint=str(tiny_run["sft"]),
        out_dir=str(reference),
        progress=False,
        resume=True,
        **{**SETTINGS, "lr": 1e-3},
    )
    with pytest.raises(UserError, match="other settings"):
        train_ppo(config)


def _iterations_done(out_dir: Path) -> int:
    try:
        return len(json.loads((out_dir / "train_metrics.json").read_text()))
    except (OSError, ValueError):
        return 0


def _kill_and_resume(sft: Path, out_dir: Path, kill_points: list[tuple[int, float]]) -> int:
    """Start (or resume) the run and SIGKILL it at each point, then let it finish.

    A kill point ``(k, extra)`` waits until the run has logged ``k`` more iterations than when it
    started, then ``extra`` seconds more, so the kills land mid-run on a fast or a slow machine.
    Returns how many kills hit a live process.
    """
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    command = [
        sys.executable,
        "-m",
        "training.rl.train_ppo_delta_waypoint",
        *_flags(sft, out_dir),
        "--resume",
    ]
    kills = 0
    for more_iterations, extra in kill_points:
        target = _iterations_done(out_dir) + more_iterations
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
        deadline = time.monotonic() + 120
        while process.poll() is None and _iterations_done(out_dir) < target and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(extra)
        if process.poll() is None:
            process.send_signal(signal.SIGKILL)
            kills += 1
        process.wait()
        for path in out_dir.glob("*.json"):  # every JSON parses after a SIGKILL at any moment
            json.loads(path.read_text())
    finish = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert finish.returncode == 0, finish.stderr
    return kills


def _random_kill_points(seed: int, count: int) -> list[tuple[int, float]]:
    rng = random.Random(seed)
    return [(rng.randint(0, 2), rng.uniform(0.0, 0.4)) for _ in range(count)]


def test_sigkill_at_random_moments_then_resume_matches(reference: Path, tiny_run, tmp_path: Path) -> None:
    out_dir = tmp_path / "killed"
    kills = _kill_and_resume(tiny_run["sft"], out_dir, _random_kill_points(1234, 2))
    assert kills >= 1, "no kill interrupted the run"
    _assert_same_run(reference, out_dir)
    assert not list(out_dir.glob(".*.tmp"))


@pytest.mark.slow
def test_many_sigkills_then_resume_matches(reference: Path, tiny_run, tmp_path: Path) -> None:
    out_dir = tmp_path / "killed_often"
    assert _kill_and_resume(tiny_run["sft"], out_dir, _random_kill_points(99, 8)) >= 3
    _assert_same_run(reference, out_dir)


class _WorldWithoutState:
    """A world that cannot save its state (as a simulator in another process may not)."""

    def __init__(self, env) -> None:
        self._env = env

    def state_dict(self) -> None:  # the protocol's answer of a world that cannot save its state
        return None

    def load_state_dict(self, state):
        raise AssertionError("a world without state is never restored")

    def __getattr__(self, name: str):
        return getattr(self._env, name)


def test_a_world_without_state_is_reseeded_on_resume(tiny_run, tmp_path: Path, monkeypatch) -> None:
    import training.rl.run as run_module

    real_make_env_mix = run_module.make_env_mix
    monkeypatch.setattr(
        run_module,
        "make_env_mix",
        lambda *args, **kwargs: _WorldWithoutState(real_make_env_mix(*args, **kwargs)),
    )
    out_dir = tmp_path / "stateless"
    config = PPOConfig(sft_checkpoint=str(tiny_run["sft"]), out_dir=str(out_dir), progress=False, **SETTINGS)
    train_ppo(config)
    checkpoint = torch.load(out_dir / "checkpoint_iter_3.pt", weights_only=True)
    assert checkpoint["world"] is None
    for name in ("final.pt", "checkpoint_iter_4.pt", "checkpoint_iter_5.pt"):
        (out_dir / name).unlink()
    train_ppo(PPOConfig(**{**config.__dict__, "resume": True}))
    _assert_clean_metrics(out_dir)
    assert all(torch.isfinite(v).all() for v in _heads(out_dir / "final.pt").values())


def _interrupted_copy(reference: Path, out_dir: Path) -> Path:
    """The reference run copied elsewhere, as if killed just after its third iteration's checkpoint."""
    shutil.copytree(reference, out_dir)
    for name in ("final.pt", "checkpoint_iter_4.pt", "checkpoint_iter_5.pt"):
        (out_dir / name).unlink()
    return out_dir


def _rewrite(path: Path, **changes) -> None:
    checkpoint = torch.load(path, weights_only=True)
    checkpoint.update(changes)
    torch.save(checkpoint, path)


def test_a_run_moved_to_another_folder_resumes_exactly(reference: Path, tiny_run, tmp_path: Path) -> None:
    out_dir = _interrupted_copy(reference, tmp_path / "moved")
    train_ppo(
        PPOConfig(
            sft_checkpoint=str(tiny_run["sft"]), out_dir=str(out_dir), progress=False, resume=True, **SETTINGS
        )
    )
    _assert_same_run(reference, out_dir)


def test_resuming_on_another_device_type_is_one_line(
    reference: Path, tiny_run, tmp_path: Path, capsys
) -> None:
    """The sampling generators' states load only on the device type that saved them."""
    out_dir = _interrupted_copy(reference, tmp_path / "gpu_run")
    _rewrite(out_dir / "checkpoint_iter_3.pt", device_type="cuda")
    code, _, err = run_cli(ppo_main, [*_flags(tiny_run["sft"], out_dir), "--resume"], capsys)
    assert_one_line_error(code, err, "--resume", "ran on cuda", "this one on cpu")
    # a checkpoint written before the device type was saved: the generator's state tells
    checkpoint = torch.load(out_dir / "checkpoint_iter_3.pt", weights_only=True)
    del checkpoint["device_type"]
    checkpoint["rng"]["sample"] = torch.zeros(16, dtype=torch.uint8)  # a CUDA generator's state
    torch.save(checkpoint, out_dir / "checkpoint_iter_3.pt")
    code, _, err = run_cli(ppo_main, [*_flags(tiny_run["sft"], out_dir), "--resume"], capsys)
    assert_one_line_error(code, err, "--resume", "another type of device")


def test_a_lost_evaluation_file_keeps_sft_s_record_and_the_run_finishes(
    reference: Path, tiny_run, tmp_path: Path, capsys
) -> None:
    out_dir = _interrupted_copy(reference, tmp_path / "no_eval")
    (out_dir / "eval_metrics.json").unlink()
    code, _, err = run_cli(ppo_main, [*_flags(tiny_run["sft"], out_dir), "--resume"], capsys)
    assert code == 0, err
    assert "eval_metrics.json was missing" in err
    evals = _records(out_dir / "eval_metrics.json")
    assert [r["iteration"] for r in evals] == [0, 4, 5]
    assert evals[0] == _records(reference / "eval_metrics.json")[0]
    _assert_same_heads(reference / "checkpoint_iter_5.pt", out_dir / "checkpoint_iter_5.pt")


def test_resume_without_a_checkpoint_says_it_starts_the_run(tiny_run, tmp_path: Path, capsys) -> None:
    out_dir = tmp_path / "new"
    code, _, err = run_cli(ppo_main, [*_flags(tiny_run["sft"], out_dir), "--resume"], capsys)
    assert code == 0, err
    assert f"--resume: no checkpoint in {out_dir} yet; starting the run" in err
    assert (out_dir / "final.pt").is_file()


def test_a_rollout_buffer_too_large_for_memory_is_one_line(tiny_run, tmp_path: Path, capsys) -> None:
    flags = _flags(tiny_run["sft"], tmp_path / "huge")
    flags[flags.index("--rollout-steps") + 1] = str(10**9)
    code, _, err = run_cli(ppo_main, flags, capsys)
    assert_one_line_error(code, err, "--rollout-steps 1000000000", "does not fit")


def test_a_checkpoint_from_before_the_shared_window_resumes_on_whole_episode_ade(
    reference: Path, tiny_run, tmp_path: Path, capsys
) -> None:
    """A checkpoint that keeps no SFT per-step ADE: the run finishes, and its later evaluations carry
    no shared-window values, so the selection guards the whole-episode ADE."""
    out_dir = _interrupted_copy(reference, tmp_path / "old_checkpoint")
    checkpoint = torch.load(out_dir / "checkpoint_iter_3.pt", weights_only=True)
    del checkpoint["selection"]["sft_step_ade"]
    torch.save(checkpoint, out_dir / "checkpoint_iter_3.pt")
    code, _, err = run_cli(ppo_main, [*_flags(tiny_run["sft"], out_dir), "--resume"], capsys)
    assert code == 0, err
    evals = json.loads((out_dir / "eval_metrics.json").read_text())
    assert "ade_shared" in evals[0] and [r["iteration"] for r in evals] == [0, 2, 4, 5]
    assert all("ade_shared" not in r and "sft_ade_shared" not in r for r in evals if r["iteration"] > 3)
    assert all(math.isfinite(r["ade"]) for r in evals)


def test_a_run_from_before_a_setting_existed_resumes_with_it_at_its_default(
    reference: Path, tiny_run, tmp_path: Path, capsys
) -> None:
    """Settings added since a run started (here ``--compile-update`` and ``--async-worlds``) were at
    their defaults in it: it resumes as it is, and refuses the new setting turned on."""
    out_dir = _interrupted_copy(reference, tmp_path / "old_run")
    checkpoint = torch.load(out_dir / "checkpoint_iter_3.pt", weights_only=True)
    for name in ("compile_update", "async_worlds"):
        del checkpoint["config"][name]
    torch.save(checkpoint, out_dir / "checkpoint_iter_3.pt")
    flags = [*_flags(tiny_run["sft"], out_dir), "--resume"]
    code, _, err = run_cli(ppo_main, [*flags, "--compile-update"], capsys)
    assert_one_line_error(code, err, "other settings (compile_update)")
    code, _, err = run_cli(ppo_main, flags, capsys)
    assert code == 0, err
    _assert_same_run(reference, out_dir)


def test_a_run_from_before_a_setting_that_changes_behaviour_is_refused(
    reference: Path, tiny_run, tmp_path: Path, capsys
) -> None:
    """A run from before ``--select-policy`` kept its last iteration: it is not resumed as if it selected."""
    out_dir = _interrupted_copy(reference, tmp_path / "older_run")
    checkpoint = torch.load(out_dir / "checkpoint_iter_3.pt", weights_only=True)
    del checkpoint["config"]["select_policy"]
    torch.save(checkpoint, out_dir / "checkpoint_iter_3.pt")
    code, _, err = run_cli(ppo_main, [*_flags(tiny_run["sft"], out_dir), "--resume"], capsys)
    assert_one_line_error(code, err, "other settings (select_policy)")
