"""The RL trainer's command line: documented flags and defaults, one-line errors that leave
existing files alone, safe checkpoints, --overwrite, determinism and the checkpoint contents."""

from __future__ import annotations

import hashlib
import json
import pickle
import random
import re
import shutil
from collections.abc import Sequence
from pathlib import Path

import pytest
import torch

from tests.cli_helpers import assert_one_line_error, run_cli
from training.common.errors import UserError
from training.common.io import load_checkpoint
from training.rl import train_ppo_delta_waypoint
from training.rl.config import PPOConfig

# The public contract (DESIGN.md): flags of the trainer and their documented defaults.
CONTRACT_DEFAULTS = {
    "--out-dir": "out/rl_delta_ppo_v0",
    "--env": "toy",
    "--num-iterations": "100",
    "--batch-size": "64",
    "--lr": "0.0003",
    "--clip-epsilon": "0.2",
    "--value-coef": "0.5",
    "--entropy-coef": "0.01",
    "--gamma": "0.99",
    "--gae-lambda": "0.95",
}
CONTRACT_FLAGS = (
    "--sft-checkpoint",
    *CONTRACT_DEFAULTS,
    "--num-envs",
    "--rollout-steps",
    "--update-epochs",
    "--max-grad-norm",
    "--target-kl",
    "--max-delta",
    "--eval-every",
    "--eval-episodes",
    "--save-every",
    "--device",
    "--seed",
)
TIMING_FIELDS = {"steps_per_s", "wall_time_s"}

# The tiny settings of tests/conftest.py's ``tiny_run``.
TINY = [
    "--num-iterations",
    "2",
    "--num-envs",
    "4",
    "--rollout-steps",
    "8",
    "--batch-size",
    "16",
    "--update-epochs",
    "2",
    "--eval-episodes",
    "4",
    "--device",
    "cpu",
    "--no-progress",
    "--critic-warmup-iterations",
    "0",
]


def run_main(argv: Sequence[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return run_cli(train_ppo_delta_waypoint.main, argv, capsys)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under ``folder`` (relative path -> bytes)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def help_entries(text: str) -> dict[str, str]:
    """``--flag`` -> its help text (joined over wrapped lines) from ``--help`` output."""
    entries: dict[str, str] = {}
    current = None
    for line in text.splitlines():
        match = re.match(r"^\s{2}(--[a-z0-9-]+)", line)
        if match:
            current = match.group(1)
            entries[current] = line
        elif current is not None and line.startswith(" " * 4):
            entries[current] += " " + line.strip()
        else:
            current = None
    return entries


# ------------------------------------------------------------------------------------------ help
def test_help_lists_every_contract_flag_with_its_default(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "120")
    code, out, err = run_main(["--help"], capsys)
    assert code == 0, err
    entries = help_entries(out)
    defaults = PPOConfig(sft_checkpoint="unused")
    for flag in CONTRACT_FLAGS:
        assert flag in entries, f"{flag} missing from --help"
        if flag == "--sft-checkpoint":
            continue
        shown = re.search(r"\(default: ([^)]*)\)", entries[flag])
        assert shown, f"{flag} shows no default: {entries[flag]}"
        expected = CONTRACT_DEFAULTS.get(flag, str(getattr(defaults, flag[2:].replace("-", "_"))))
        assert shown.group(1) == expected, f"{flag}: {entries[flag]}"


def test_config_defaults_are_the_contract() -> None:
    config = PPOConfig(sft_checkpoint="model.pt")
    assert config.out_dir == "out/rl_delta_ppo_v0"
    assert config.env == "toy"
    assert config.num_iterations == 100
    assert config.batch_size == 64
    assert config.lr == 3e-4
    assert config.clip_epsilon == 0.2
    assert config.value_coef == 0.5
    assert config.entropy_coef == 0.01
    assert config.gamma == 0.99
    assert config.gae_lambda == 0.95
    config.validate()  # the defaults themselves are a valid configuration
    with pytest.raises(TypeError):
        PPOConfig()  # type: ignore[call-arg]  # the SFT checkpoint has no default


# ------------------------------------------------------------------------------------------ bad input
@pytest.fixture
def existing_out(tmp_path: Path) -> Path:
    """An out dir that already holds a user's file."""
    out = tmp_path / "existing_out"
    out.mkdir()
    (out / "notes.txt").write_text("keep me\n")
    return out


def _truncated(tmp: Path, sft: Path, rl_dir: Path) -> Path:
    path = tmp / "truncated.pt"
    path.write_bytes(sft.read_bytes()[:100])
    return path


def _random_bytes(tmp: Path, sft: Path, rl_dir: Path) -> Path:
    path = tmp / "random.pt"
    path.write_bytes(random.Random(0).randbytes(4096))
    return path


def _missing(tmp: Path, sft: Path, rl_dir: Path) -> Path:
    return tmp / "no_such_model.pt"


def _rl_checkpoint(tmp: Path, sft: Path, rl_dir: Path) -> Path:
    return rl_dir / "final.pt"


@pytest.mark.parametrize(
    ("flags", "fragment"),
    [
        (["--lr", "0"], "--lr"),
        (["--lr", "-1"], "--lr"),
        (["--lr", "abc"], "--lr"),
        (["--clip-epsilon", "0"], "--clip-epsilon"),
        (["--gamma", "1.5"], "--gamma"),
        (["--gae-lambda", "-0.1"], "--gae-lambda"),
        (["--num-envs", "0"], "--num-envs"),
        (["--num-envs", "2", "--rollout-steps", "4", "--batch-size", "9"], "--batch-size"),
        (["--env", "nosuchenv"], "nosuchenv"),
    ],
    ids=lambda v: " ".join(v) if isinstance(v, list) else None,
)
def test_bad_flag_values_exit_2_with_one_line(
    flags: list[str],
    fragment: str,
    tiny_run: dict[str, Path],
    existing_out: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    before = snapshot(existing_out)
    argv = ["--sft-checkpoint", str(tiny_run["sft"]), "--out-dir", str(existing_out), *TINY, *flags]
    code, _, err = run_main(argv, capsys)
    assert_one_line_error(code, err, fragment)
    assert snapshot(existing_out) == before


def test_missing_sft_checkpoint_flag(existing_out: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = snapshot(existing_out)
    code, _, err = run_main(["--out-dir", str(existing_out), *TINY], capsys)
    assert_one_line_error(code, err, "--sft-checkpoint")
    assert snapshot(existing_out) == before


@pytest.mark.parametrize(
    ("make_path", "fragments"),
    [
        (_missing, ("no_such_model.pt", "not found")),
        (_truncated, ("truncated.pt",)),
        (_random_bytes, ("random.pt",)),
        (_rl_checkpoint, ("ppo_delta_waypoint", "sft_waypoint_model")),
    ],
    ids=["missing", "truncated", "random-bytes", "rl-checkpoint-as-sft"],
)
def test_bad_sft_checkpoint_exits_2_with_one_line(
    make_path,
    fragments: tuple[str, ...],
    tiny_run: dict[str, Path],
    existing_out: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    path = make_path(tmp_path, tiny_run["sft"], tiny_run["rl_dir"])
    before = snapshot(existing_out)
    code, _, err = run_main(["--sft-checkpoint", str(path), "--out-dir", str(existing_out), *TINY], capsys)
    assert_one_line_error(code, err, *fragments)
    assert snapshot(existing_out) == before


def test_existing_run_is_not_replaced_without_overwrite(
    tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(tiny_run["rl_dir"], out)
    before = snapshot(out)
    assert "final.pt" in before
    code, _, err = run_main(["--sft-checkpoint", str(tiny_run["sft"]), "--out-dir", str(out), *TINY], capsys)
    assert_one_line_error(code, err, "--overwrite")
    assert snapshot(out) == before


def test_unwritable_out_dir(
    tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    blocker = tmp_path / "a_file"
    blocker.write_bytes(b"not a folder")
    out = blocker / "run"
    code, _, err = run_main(["--sft-checkpoint", str(tiny_run["sft"]), "--out-dir", str(out), *TINY], capsys)
    assert_one_line_error(code, err, str(out))
    assert blocker.read_bytes() == b"not a folder"


# ------------------------------------------------------------------------------------------ unsafe pickle
class _RunsCodeOnLoad:
    """Unpickling this object executes code that creates ``marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (exec, (f"open({self.marker!r}, 'w').write('pwned')",))


def test_checkpoint_that_runs_code_is_refused(
    tiny_run: dict[str, Path], existing_out: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    marker = tmp_path / "MARKER"
    sft = torch.load(tiny_run["sft"], weights_only=True)
    evil_path = tmp_path / "evil_model.pt"
    torch.save({**sft, "payload": _RunsCodeOnLoad(marker)}, evil_path)
    pickled_path = tmp_path / "evil_plain.pkl"
    pickled_path.write_bytes(
        pickle.dumps({"kind": "sft_waypoint_model", "x": _RunsCodeOnLoad(marker)}, protocol=2)
    )

    before = snapshot(existing_out)
    for path in (evil_path, pickled_path):
        code, _, err = run_main(
            ["--sft-checkpoint", str(path), "--out-dir", str(existing_out), *TINY], capsys
        )
        assert_one_line_error(code, err, path.name)
        assert not marker.exists(), f"loading {path.name} ran its code"
        with pytest.raises(UserError):
            load_checkpoint(path)
        with pytest.raises(UserError):
            load_checkpoint(path, expected_kind="sft_waypoint_model")
        assert not marker.exists(), f"load_checkpoint({path.name}) ran its code"
    assert snapshot(existing_out) == before

    # Control: the payload is live, an unsafe load does run it (so the checks above mean something).
    torch.load(evil_path, weights_only=False)
    assert marker.read_text() == "pwned"


# ------------------------------------------------------------------------------------------ runs
def test_overwrite_replaces_a_run(
    tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "run"
    shutil.copytree(tiny_run["rl_dir"], out)  # 2 iterations, checkpoint_iter_1.pt and _2.pt
    first = snapshot(out)
    assert "checkpoint_iter_2.pt" in first
    argv = ["--sft-checkpoint", str(tiny_run["sft"]), "--out-dir", str(out), *TINY]
    argv += ["--num-iterations", "1", "--save-every", "0", "--seed", "3", "--overwrite"]
    code, out_text, err = run_main(argv, capsys)
    assert code == 0, err
    assert "final.pt" in out_text

    files = snapshot(out)
    # the old run's checkpoints are gone; the new run keeps its last iteration resumable
    assert sorted(n for n in files if n.startswith("checkpoint_iter_")) == ["checkpoint_iter_1.pt"]
    assert len([n for n in files if n.startswith("events.out.tfevents.")]) == 1, sorted(files)
    assert files["final.pt"] != first["final.pt"]
    config = json.loads(files["config.json"])
    assert config["num_iterations"] == 1 and config["seed"] == 3 and config["overwrite"] is True
    train = json.loads(files["train_metrics.json"])
    assert [r["iteration"] for r in train] == [1]
    evals = json.loads(files["eval_metrics.json"])
    assert [r["iteration"] for r in evals] == [0, 1]
    final = torch.load(out / "final.pt", weights_only=True)
    assert final["iteration"] == 1
    assert final["config"]["seed"] == 3


def _run_tiny(out: Path, sft: Path, seed: int, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [
        "--sft-checkpoint",
        str(sft),
        "--out-dir",
        str(out),
        *TINY,
        "--seed",
        str(seed),
        "--save-every",
        "0",
    ]
    code, _, err = run_main(argv, capsys)
    assert code == 0, err


def _without_timing(records: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in records]


def test_same_seed_gives_identical_runs(
    tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("other_seed", 1)):
        _run_tiny(tmp_path / name, tiny_run["sft"], seed, capsys)
        run = tmp_path / name
        runs[name] = {
            "heads": torch.load(run / "final.pt", weights_only=True)["heads"],
            "train": json.loads((run / "train_metrics.json").read_text()),
            "eval": json.loads((run / "eval_metrics.json").read_text()),
        }
    a, b, other = runs["a"], runs["b"], runs["other_seed"]
    assert a["heads"].keys() == b["heads"].keys()
    for name, tensor in a["heads"].items():
        assert torch.equal(tensor, b["heads"][name]), name
    assert _without_timing(a["train"]) == _without_timing(b["train"])
    assert _without_timing(a["eval"]) == _without_timing(b["eval"])
    assert all(TIMING_FIELDS & set(r) for r in a["train"])  # the timing fields exist (and are ignored)

    # Control: another seed gives other heads and other metrics.
    assert any(not torch.equal(t, other["heads"][n]) for n, t in a["heads"].items())
    assert _without_timing(a["train"]) != _without_timing(other["train"])


def test_the_same_command_writes_the_same_final_pt(
    tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Byte for byte, so that a sha256 identifies a run's result (no wall times in the file)."""
    out = tmp_path / "run"
    _run_tiny(out, tiny_run["sft"], 0, capsys)
    first = (out / "final.pt").read_bytes()
    shutil.rmtree(out)
    _run_tiny(out, tiny_run["sft"], 0, capsys)
    assert (out / "final.pt").read_bytes() == first
    timings = [r["wall_time_s"] for r in json.loads((out / "eval_metrics.json").read_text())]
    assert all(t > 0 for t in timings)  # the metrics keep them


def test_rl_checkpoint_is_plain_data_tied_to_its_sft(tiny_run: dict[str, Path]) -> None:
    sft_sha = hashlib.sha256(tiny_run["sft"].read_bytes()).hexdigest()
    config = json.loads((tiny_run["rl_dir"] / "config.json").read_text())
    assert config["sft_sha256"] == sft_sha
    for name in ("final.pt", "checkpoint_iter_1.pt", "checkpoint_iter_2.pt"):
        checkpoint = torch.load(tiny_run["rl_dir"] / name, weights_only=True)
        assert checkpoint["kind"] == "ppo_delta_waypoint"
        assert checkpoint["sft_sha256"] == sft_sha
        assert Path(checkpoint["sft_checkpoint"]) == tiny_run["sft"]
        assert checkpoint["heads"] and all(isinstance(t, torch.Tensor) for t in checkpoint["heads"].values())
        assert not any(key.startswith("sft_model.") for key in checkpoint["heads"])
        assert checkpoint["config"]["num_iterations"] == 2
    assert torch.load(tiny_run["rl_dir"] / "final.pt", weights_only=True)["iteration"] == 2


@pytest.mark.parametrize(
    ("key", "value", "what"),
    [
        ("num_waypoints", 6, "waypoint count"),
        ("bev_shape", [4, 32, 32], "BEV shape"),
        ("state_dim", 3, "ego state"),
    ],
)
def test_sft_model_built_for_another_world_is_refused(
    key: str, value, what: str, tiny_run: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    checkpoint = torch.load(tiny_run["sft"], weights_only=True)
    checkpoint["env_spec"][key] = value
    other = tmp_path / "other_world.pt"
    torch.save(checkpoint, other)
    out = tmp_path / "run"
    code, _, err = run_main(
        ["--sft-checkpoint", str(other), "--out-dir", str(out), "--device", "cpu"], capsys
    )
    assert_one_line_error(code, err, what)
    assert not out.exists() or not any(out.iterdir())
