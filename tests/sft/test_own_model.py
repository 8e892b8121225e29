"""Your model, your architecture: SFT models this project did not build, through the three commands.

Two architectures unlike ``WaypointModel`` (``tests/own_models.py``), neither trained by this
project's SFT trainer: an MLP on a 4x-downsampled BEV with ``z`` of 48, given as ``--sft-model
tests.own_models:mlp`` with a ``state_dict`` saved by ``torch.save``, and a pooled conv net with
``z`` of 24 exported with ``torch.export`` to a ``.pt2`` file given alone. Both go end to end through
the RL trainer and the comparison. Shape mismatches and bad factories or files end with one line
and exit 2; the SFT trainer clones a foreign architecture given by ``--sft-model``.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch
from sft_fake_env import SPEC as FAKE_SPEC
from sft_fake_env import FakeWaypointEnv

import training.sft.train_waypoint_bc_torch_v0 as sft_trainer
from eval import compare_sft_vs_rl
from tests import own_models
from tests.cli_helpers import assert_one_line_error, run_cli
from training.common.io import file_sha256
from training.common.seeds import DEV_SEED_START
from training.envs.protocol import EnvSpec
from training.envs.registry import make_env
from training.envs.toy import viz
from training.rl import train_ppo_delta_waypoint
from training.rl.checkpoint import load_rl_checkpoint
from training.rl.policy import PolicySettings, PPOPolicy
from training.sft.external import ExternalSFTModel, is_state_dict, read_sft

MLP = "tests.own_models:mlp"
TINY_PPO = [
    "--num-iterations",
    "1",
    "--num-envs",
    "4",
    "--rollout-steps",
    "8",
    "--batch-size",
    "16",
    "--update-epochs",
    "1",
    "--eval-episodes",
    "2",
    "--device",
    "cpu",
    "--no-progress",
    "--critic-warmup-iterations",
    "0",
]


def compare_argv(sft_flags: list[str], rl_dir: Path, out: Path) -> list[str]:
    return [
        *sft_flags,
        "--rl-checkpoint",
        str(rl_dir / "final.pt"),
        "--episodes",
        "4",
        "--device",
        "cpu",
        "--seed",  # tests read the development scenarios
        str(DEV_SEED_START),
        "--animations",
        "0",
        "--out-dir",
        str(out),
    ]


@pytest.fixture(scope="module")
def toy_spec() -> EnvSpec:
    env = make_env("toy", 1, "cpu")
    env.close()
    return env.spec


@pytest.fixture(scope="module")
def own_files(tmp_path_factory: pytest.TempPathFactory, toy_spec: EnvSpec) -> dict[str, Path]:
    """The MLP's state_dict and the conv net as a torch.export program, as a user would save them."""
    root = tmp_path_factory.mktemp("own_models")
    torch.manual_seed(0)
    torch.save(own_models.mlp().state_dict(), root / "mlp_state.pt")
    net = own_models.convnet().eval()
    bev = torch.zeros((2, *toy_spec.bev_shape), dtype=torch.uint8)
    state = torch.zeros((2, toy_spec.state_dim))
    batch = torch.export.Dim("batch")
    program = torch.export.export(net, (bev, state), dynamic_shapes=({0: batch}, {0: batch}))
    torch.export.save(program, root / "convnet.pt2")
    return {"root": root, "mlp_state": root / "mlp_state.pt", "convnet_pt2": root / "convnet.pt2"}


@pytest.fixture(scope="module")
def rl_runs(own_files: dict[str, Path]) -> dict[str, Path]:
    """Two tiny PPO runs through the command line, one per architecture."""
    runs = {}
    flags = {
        "mlp": ["--sft-model", MLP, "--sft-checkpoint", str(own_files["mlp_state"])],
        "convnet": ["--sft-checkpoint", str(own_files["convnet_pt2"])],
    }
    for name, sft_flags in flags.items():
        runs[name] = own_files["root"] / f"rl_{name}"
        train_ppo_delta_waypoint.main([*sft_flags, "--out-dir", str(runs[name]), *TINY_PPO])
    return runs


# ------------------------------------------------------------------------------------------ end to end
def test_rl_runs_record_the_model_file_and_its_factory(
    own_files: dict[str, Path], rl_runs: dict[str, Path]
) -> None:
    expected = {"mlp": (own_files["mlp_state"], MLP), "convnet": (own_files["convnet_pt2"], None)}
    for name, (sft_file, factory) in expected.items():
        config = json.loads((rl_runs[name] / "config.json").read_text())
        assert config["sft_sha256"] == file_sha256(sft_file)
        assert config["sft_model"] == factory
        final = load_rl_checkpoint(rl_runs[name] / "final.pt")
        assert final["sft_sha256"] == file_sha256(sft_file) and final["config"]["sft_model"] == factory
        train = json.loads((rl_runs[name] / "train_metrics.json").read_text())
        assert [record["iteration"] for record in train] == [1]


def test_comparison_pairs_each_model_with_its_run(
    own_files: dict[str, Path],
    rl_runs: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(compare_sft_vs_rl, "make_plots", lambda *args, **kwargs: {})  # numbers only
    pairs = {
        # no --sft-model: the state_dict's architecture is the one the RL run recorded
        "mlp": ["--sft-checkpoint", str(own_files["mlp_state"])],
        "convnet": ["--sft-checkpoint", str(own_files["convnet_pt2"])],
    }
    for name, sft_flags in pairs.items():
        out = tmp_path / name
        code, stdout, err = run_cli(
            compare_sft_vs_rl.main, compare_argv(sft_flags, rl_runs[name], out), capsys
        )
        assert code == 0, err
        report = json.loads((out / "compare.json").read_text())
        assert report["metadata"]["sft_sha256"] == file_sha256(sft_flags[1])
        assert report["metadata"]["sft_model"] == (MLP if name == "mlp" else None)
        assert len(report["episodes"]["sft"]) == 4 and "ade" in stdout


def test_comparison_refuses_a_model_the_run_did_not_refine(
    own_files: dict[str, Path], rl_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    argv = compare_argv(
        ["--sft-model", MLP, "--sft-checkpoint", str(own_files["mlp_state"])],
        rl_runs["convnet"],
        tmp_path / "out",
    )
    code, _, err = run_cli(compare_sft_vs_rl.main, argv, capsys)
    assert_one_line_error(code, err, "another SFT checkpoint", "--allow-mismatch")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------ the adapter
def _torchscript_file(tmp_path: Path) -> Path:
    path = tmp_path / "mlp_scripted.pt"
    torch.manual_seed(1)
    with warnings.catch_warnings():  # torch.jit is deprecated; its files are still what some users have
        warnings.simplefilter("ignore", DeprecationWarning)
        torch.jit.script(own_models.mlp().eval()).save(str(path))
    return path


@pytest.mark.parametrize(
    ("form", "feature_dim"), [("state_dict", 48), ("export", 24), ("torchscript", 48)], ids=str
)
def test_iteration_zero_drives_exactly_like_the_model(
    form: str, feature_dim: int, own_files: dict[str, Path], toy_spec: EnvSpec, tmp_path: Path
) -> None:
    """Behind the adapter the policy starts at the model's own plan, and stays frozen in eval."""
    if form == "state_dict":
        source = read_sft(own_files["mlp_state"], MLP)
    elif form == "export":
        source = read_sft(own_files["convnet_pt2"], None)
    else:
        source = read_sft(_torchscript_file(tmp_path), None)
    assert source.kind == form
    model = source.for_env(toy_spec)
    assert isinstance(model, ExternalSFTModel)
    assert (model.feature_dim, model.num_waypoints) == (feature_dim, toy_spec.num_waypoints)
    policy = PPOPolicy(model, PolicySettings())  # a run's defaults
    policy.train()
    assert not policy.sft_model.training
    generator = torch.Generator().manual_seed(0)
    bev = (torch.rand((5, *toy_spec.bev_shape), generator=generator) > 0.7).to(torch.uint8) * 255
    state = torch.rand((5, toy_spec.state_dim), generator=generator) * 10
    with torch.no_grad():
        z, plan = source.module(bev, state)
    assert torch.equal(policy.deterministic_waypoints(bev, state), plan)
    assert torch.equal(policy.features(bev, state)[0], z)


# ------------------------------------------------------------------------------------------ one-line errors
@pytest.mark.parametrize(
    ("factory", "fragments"),
    [
        ("mlp_six_waypoints", ("waypoints float32 [2, 6, 2]", "K = 8")),
        ("mlp_three_channels", ("bev uint8 [2, 4, 64, 64]", "mat1 and mat2")),
        ("mlp_state_of_four", ("state float32 [2, 5]", "mat1 and mat2")),
        ("z_not_2d", ("z must be 2-D", "[2, 4, 12]")),
    ],
)
def test_shape_mismatch_exits_2_with_one_line(
    factory: str, fragments: tuple[str, ...], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    weights = tmp_path / f"{factory}.pt"
    torch.save(getattr(own_models, factory)().state_dict(), weights)
    out = tmp_path / "run"
    argv = [
        "--sft-model",
        f"tests.own_models:{factory}",
        "--sft-checkpoint",
        str(weights),
        "--out-dir",
        str(out),
    ]
    code, _, err = run_cli(train_ppo_delta_waypoint.main, [*argv, *TINY_PPO], capsys)
    assert_one_line_error(code, err, factory, *fragments)
    assert not out.exists()


@pytest.mark.parametrize(
    ("sft_model", "checkpoint", "fragments"),
    [
        ("tests.own_models", "mlp_state", ("MODULE:FACTORY",)),
        ("tests.no_such_module:mlp", "mlp_state", ("no module named 'tests.no_such_module'", "PYTHONPATH")),
        ("tests.own_models:nope", "mlp_state", ("has no attribute 'nope'",)),
        ("tests.own_models:NOT_CALLABLE", "mlp_state", ("not callable",)),
        ("tests.own_models:not_a_module", "mlp_state", ("returned a dict, not a torch.nn.Module",)),
        ("tests.own_models:broken_factory", "mlp_state", ("RuntimeError: out of coffee",)),
        ("tests.own_models:convnet", "mlp_state", ("does not fit --sft-model tests.own_models:convnet",)),
        (None, "mlp_state", ("plain state_dict", "--sft-model MODULE:FACTORY")),
        (MLP, "convnet_pt2", ("torch.export file", "drop --sft-model")),
    ],
    ids=[
        "malformed",
        "no-module",
        "no-attribute",
        "not-callable",
        "not-a-module",
        "factory-raises",
        "weights-of-another-architecture",
        "state-dict-without-factory",
        "program-with-factory",
    ],
)
def test_bad_factory_or_file_exits_2_with_one_line(
    sft_model: str | None,
    checkpoint: str,
    fragments: tuple[str, ...],
    own_files: dict[str, Path],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    out = tmp_path / "run"
    argv = ["--sft-checkpoint", str(own_files[checkpoint]), "--out-dir", str(out), *TINY_PPO]
    if sft_model is not None:
        argv = ["--sft-model", sft_model, *argv]
    code, _, err = run_cli(train_ppo_delta_waypoint.main, argv, capsys)
    assert_one_line_error(code, err, *fragments)
    assert not out.exists()


def test_viz_animates_your_model_and_its_rl_policy(
    own_files: dict[str, Path], rl_runs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The episode viewer reads the same forms: a state_dict (its factory recorded by the RL run or
    given), and an exported program; an RL run of the other model is refused."""
    mlp = ["--sft-checkpoint", str(own_files["mlp_state"])]
    convnet = ["--sft-checkpoint", str(own_files["convnet_pt2"])]
    argv = ["--seed", str(DEV_SEED_START), "--max-frames", "2"]
    runs = [
        [*mlp, "--sft-model", MLP, "--out", str(tmp_path / "mlp.png")],
        [*mlp, "--rl-checkpoint", str(rl_runs["mlp"] / "final.pt"), "--out", str(tmp_path / "mlp.gif")],
        [*convnet, "--rl-checkpoint", str(rl_runs["convnet"] / "final.pt"), "--out", str(tmp_path / "c.gif")],
    ]
    for flags in runs:
        code, _, err = run_cli(viz.main, [*flags, *argv], capsys)
        assert code == 0, err
        assert Path(flags[flags.index("--out") + 1]).stat().st_size > 0

    code, _, err = run_cli(viz.main, [*mlp, "--out", str(tmp_path / "bare.png"), *argv], capsys)
    assert_one_line_error(code, err, "--sft-model")
    wrong = [*convnet, "--rl-checkpoint", str(rl_runs["mlp"] / "final.pt"), "--out", str(tmp_path / "x.gif")]
    code, _, err = run_cli(viz.main, [*wrong, *argv], capsys)
    assert_one_line_error(code, err, "another SFT checkpoint")
    assert not (tmp_path / "x.gif").exists()


def test_every_command_takes_the_flag(capsys: pytest.CaptureFixture[str]) -> None:
    for main in (sft_trainer.main, train_ppo_delta_waypoint.main, compare_sft_vs_rl.main, viz.main):
        code, out, _ = run_cli(main, ["--help"], capsys)
        assert code == 0 and "--sft-model MODULE:FACTORY" in out


# ------------------------------------------------------------------------------------------ SFT trainer
def test_sft_trainer_clones_your_architecture(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(
        sft_trainer, "make_env", lambda name, num_envs, device, **_: FakeWaypointEnv(num_envs)
    )
    factory = "tests.own_models:small_world_mlp"
    common = ["--num-episodes", "48", "--val-episodes", "16", "--episodes-per-batch", "16", "--device", "cpu"]
    argv = [*common, "--record-every", "1", "--epochs", "8", "--batch-size", "16", "--lr", "3e-3"]

    code, _, err = run_cli(
        sft_trainer.main, [*argv, "--sft-model", MLP, "--out-dir", str(tmp_path / "x")], capsys
    )
    assert_one_line_error(
        code, err, "bev uint8 [2, 4, 16, 16]"
    )  # the toy world's MLP, the fake world's shapes
    assert not (tmp_path / "x").exists()

    run = tmp_path / "run"
    code, out, err = run_cli(sft_trainer.main, [*argv, "--sft-model", factory, "--out-dir", str(run)], capsys)
    assert code == 0, err
    assert f"--sft-model {factory}" in out
    weights = torch.load(run / "model.pt", weights_only=True)
    assert is_state_dict(weights) and "body.0.weight" in weights  # the module's own state_dict
    model = read_sft(run / "model.pt", factory).for_env(FAKE_SPEC)
    assert model.feature_dim == 32
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["final"]["val_ade_m"] < 0.7 * metrics["final"]["mean_plan_val_ade_m"]
    assert json.loads((run / "config.json").read_text())["sft_model"] == factory
