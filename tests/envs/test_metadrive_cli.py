"""The three commands end to end with ``--env metadrive`` at tiny sizes: SFT on MetaDrive's
expert, residual PPO in MetaDrive, and the paired comparison in MetaDrive."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip(
    "metadrive", reason="the metadrive extra is not installed (pip install -e '.[metadrive]')"
)

import training.envs.metadrive as metadrive_env
from eval import compare_sft_vs_rl
from tests.cli_helpers import run_cli
from training.common.seeds import DEV_SEED_START
from training.rl import train_ppo_delta_waypoint
from training.sft import train_waypoint_bc_torch_v0

EPISODE_STEPS = 6


@pytest.fixture
def short_episodes(monkeypatch: pytest.MonkeyPatch) -> None:
    """MetaDrive episodes of 6 policy steps (3 s) so the commands finish in seconds."""
    short = functools.partial(metadrive_env.MetaDriveWorldConfig, max_episode_steps=EPISODE_STEPS)
    monkeypatch.setattr(metadrive_env, "MetaDriveWorldConfig", short)


def test_sft_then_rl_then_compare_in_metadrive(
    tmp_path: Path, short_episodes: None, capsys: pytest.CaptureFixture[str]
) -> None:
    sft_dir, rl_dir, compare_dir = tmp_path / "sft", tmp_path / "rl", tmp_path / "compare"
    common = ["--env", "metadrive", "--device", "cpu", "--difficulty", "0"]
    code, _, err = run_cli(
        train_waypoint_bc_torch_v0.main,
        [
            *common,
            "--out-dir",
            str(sft_dir),
            "--num-episodes",
            "2",
            "--val-episodes",
            "1",
            "--episodes-per-batch",
            "2",
            "--epochs",
            "1",
            "--batch-size",
            "8",
        ],
        capsys,
    )
    assert code == 0, err
    manifest = json.loads((sft_dir / "demos" / "train" / "manifest.json").read_text())
    assert manifest["env_spec"]["max_episode_steps"] == EPISODE_STEPS

    code, _, err = run_cli(
        train_ppo_delta_waypoint.main,
        [
            *common,
            "--sft-checkpoint",
            str(sft_dir / "model.pt"),
            "--out-dir",
            str(rl_dir),
            "--num-iterations",
            "1",
            "--num-envs",
            "2",
            "--rollout-steps",
            "4",
            "--batch-size",
            "8",
            "--eval-episodes",
            "1",
            "--critic-warmup-iterations",
            "0",
        ],
        capsys,
    )
    assert code == 0, err
    train = json.loads((rl_dir / "train_metrics.json").read_text())
    assert train[-1]["env_steps"] == 8
    evaluations = json.loads((rl_dir / "eval_metrics.json").read_text())
    assert evaluations and all(0.0 <= e["route_completion"] <= 1.0 for e in evaluations)

    # a mix: two toy worlds and one MetaDrive world in one run, with metrics per environment
    mix_dir = tmp_path / "mix"
    code, _, err = run_cli(
        train_ppo_delta_waypoint.main,
        [
            "--env", "toy,metadrive", "--env-weights", "2,1", "--device", "cpu", "--difficulty", "0",
            "--sft-checkpoint", str(sft_dir / "model.pt"), "--out-dir", str(mix_dir), "--num-iterations", "1",
            "--num-envs", "3", "--rollout-steps", str(EPISODE_STEPS), "--batch-size", "6",
            "--eval-episodes", "1", "--critic-warmup-iterations", "0",
        ],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    record = json.loads((mix_dir / "train_metrics.json").read_text())[-1]
    assert record["env_steps"] == 3 * EPISODE_STEPS
    assert record["metadrive/episodes"] >= 1  # its one world finished its 6-step episode
    assert record["toy/episodes"] + record["metadrive/episodes"] == record["episodes"]
    final_eval = json.loads((mix_dir / "eval_metrics.json").read_text())[-1]
    assert {"toy/route_completion", "metadrive/route_completion"} <= set(final_eval)

    # worlds that step apart, twice: the same run bit for bit, whatever the timing was
    runs = []
    for name in ("apart", "apart_again"):
        code, _, err = run_cli(
            train_ppo_delta_waypoint.main,
            [
                *common, "--sft-checkpoint", str(sft_dir / "model.pt"), "--out-dir", str(tmp_path / name),
                "--async-worlds", "--no-select-policy", "--num-iterations", "2", "--num-envs", "2",
                "--rollout-steps", str(EPISODE_STEPS + 2), "--batch-size", "8", "--eval-episodes", "1",
                "--critic-warmup-iterations", "0",
            ],
            capsys,
        )  # fmt: skip
        assert code == 0, err
        records = json.loads((tmp_path / name / "train_metrics.json").read_text())
        heads = torch.load(tmp_path / name / "final.pt", weights_only=True)["heads"]
        runs.append((records, heads))
    (records, heads), (records_again, heads_again) = runs
    assert records[-1]["env_steps"] == 2 * 2 * (EPISODE_STEPS + 2)
    assert records[0]["episodes"] >= 2  # every world finished an episode within its rollout steps
    assert heads.keys() == heads_again.keys() and all(torch.equal(heads[k], heads_again[k]) for k in heads)

    def untimed(runs: list[dict]) -> list[str]:
        return [json.dumps({k: v for k, v in r.items() if k != "steps_per_s"}, sort_keys=True) for r in runs]

    assert untimed(records) == untimed(records_again)

    code, out, err = run_cli(
        compare_sft_vs_rl.main,
        [
            *common[:4],
            "--sft-checkpoint",
            str(sft_dir / "model.pt"),
            "--rl-checkpoint",
            str(rl_dir / "final.pt"),
            "--episodes",
            "2",
            "--seed",  # the development range: tests never read the test scenarios
            str(DEV_SEED_START),
            "--out-dir",
            str(compare_dir),
        ],
        capsys,
    )
    assert code == 0, err
    report = json.loads((compare_dir / "compare.json").read_text())
    assert report["metadata"]["env"] == "metadrive"
    assert len(report["episodes"]["sft"]) == 2 == len(report["episodes"]["rl"])
    for policy in ("sft", "rl"):  # every collision described (MetaDrive tells who moved into whom)
        collided = sum(episode["collision"] for episode in report["episodes"][policy])
        closed_by = report["metadata"][f"{policy}_collisions_closed_by"]
        assert sum(closed_by.values()) == collided and closed_by["not found"] == 0
    assert "collisions by who closed the gap: SFT" in out
    assert "route_completion" in out
