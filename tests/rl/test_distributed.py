"""Data-parallel PPO under torchrun: 2 processes on the CPU (gloo)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from tests.cli_helpers import assert_one_line_error, run_cli
from training.rl.checkpoint import load_rl_checkpoint
from training.rl.distributed import DistContext, init_distributed, shutdown

NUM_ENVS, ROLLOUT_STEPS, ITERATIONS = 4, 8, 3
SETTINGS = [
    "--device", "cpu", "--no-progress", "--num-iterations", str(ITERATIONS), "--num-envs", str(NUM_ENVS),
    "--rollout-steps", str(ROLLOUT_STEPS), "--batch-size", "16", "--update-epochs", "2", "--eval-every", "0",
    "--eval-episodes", "2", "--save-every", "2", "--critic-warmup-iterations", "0",
]  # fmt: skip


def _torchrun(sft: Path, out_dir: Path, *extra: str, timeout: float = 240) -> subprocess.CompletedProcess:
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
        "-m", "training.rl.train_ppo_delta_waypoint",
        "--sft-checkpoint", str(sft), "--out-dir", str(out_dir), *SETTINGS,
        *extra,
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    return subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env)


@pytest.fixture(scope="module")
def ddp_run(tiny_run, tmp_path_factory: pytest.TempPathFactory) -> dict:
    out_dir = tmp_path_factory.mktemp("ddp") / "run"
    result = _torchrun(tiny_run["sft"], out_dir)
    assert result.returncode == 0, result.stderr[-3000:]
    return {"out_dir": out_dir, "result": result, "sft": tiny_run["sft"]}


def test_two_processes_train_one_policy_and_rank_0_alone_writes(ddp_run) -> None:
    out_dir = ddp_run["out_dir"]
    records = json.loads((out_dir / "train_metrics.json").read_text())
    assert [r["iteration"] for r in records] == [1, 2, 3]  # written once, by rank 0
    assert all(r["world_size"] == 2 for r in records)
    # each iteration collects both processes' worlds
    assert [r["env_steps"] for r in records] == [2 * NUM_ENVS * ROLLOUT_STEPS * i for i in (1, 2, 3)]
    assert sorted(p.name for p in out_dir.glob("*.pt")) == [
        "checkpoint_iter_2.pt",
        "checkpoint_iter_3.pt",
        "final.pt",
    ]
    assert ddp_run["result"].stdout.count("final.pt (iteration") == 1  # only rank 0 reports


def test_the_processes_drove_different_worlds_and_the_checkpoint_keeps_both(ddp_run) -> None:
    checkpoint = load_rl_checkpoint(ddp_run["out_dir"] / "final.pt")
    assert checkpoint["world_size"] == 2 and len(checkpoint["ranks"]) == 2
    seeds = [rank["world"]["scenario_seed"] for rank in checkpoint["ranks"]]
    assert not set(seeds[0].tolist()) & set(seeds[1].tolist())  # disjoint scenario seeds
    samplers = [rank["rng"]["sample"] for rank in checkpoint["ranks"]]
    assert not torch.equal(samplers[0], samplers[1])


def test_resuming_with_another_process_count_is_refused(ddp_run, capsys) -> None:
    from training.rl.train_ppo_delta_waypoint import main

    argv = [
        "--sft-checkpoint",
        str(ddp_run["sft"]),
        "--out-dir",
        str(ddp_run["out_dir"]),
        "--resume",
        *SETTINGS,
    ]
    code, _, err = run_cli(main, argv, capsys)
    assert_one_line_error(code, err, "ran on 2 processes", "--nproc-per-node")


def test_a_start_failure_on_rank_0_stops_every_process_with_one_message(ddp_run) -> None:
    """The out-dir holds a run: rank 0 refuses, rank 1 must not hang waiting for it."""
    result = _torchrun(ddp_run["sft"], ddp_run["out_dir"], timeout=120)
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(ours) == 1 and "already holds a run" in ours[0], result.stderr
    # torchrun prints its own ChildFailedError summary; no frame of ours may appear in it
    assert "training/rl" not in result.stderr


def test_each_process_gets_its_own_block_of_carla_servers() -> None:
    from training.envs.carla import CARLA_PORT_STRIDE
    from training.envs.options import EnvOptions, for_process

    options = EnvOptions(carla_port=2000)
    assert for_process(options, 0, 10).carla_port == 2000
    assert for_process(options, 2, 10).carla_port == 2000 + 2 * 10 * CARLA_PORT_STRIDE


# ------------------------------------------------------- collectives on the backend's device (NCCL)
# No GPU here, so the context declares ``meta`` as its backend's device: a device other than the CPU
# that any machine can allocate on. A stand-in all_reduce records where each tensor it is handed
# lives, then stops the call (a meta tensor holds no value to read back).


class _Reached(Exception):
    """The stand-in collective saw its tensor."""


@pytest.fixture
def reduced_on(monkeypatch: pytest.MonkeyPatch) -> list[torch.device]:
    devices: list[torch.device] = []

    def all_reduce(tensor: torch.Tensor, *args: object, **kwargs: object) -> None:
        devices.append(tensor.device)
        raise _Reached

    monkeypatch.setattr(dist, "all_reduce", all_reduce)
    return devices


def _params() -> list[torch.nn.Parameter]:
    params = [torch.nn.Parameter(torch.ones(2, 3)), torch.nn.Parameter(torch.zeros(4))]
    params[0].grad = torch.ones(2, 3)
    return params


@pytest.mark.parametrize(
    "collective",
    [
        lambda ctx: ctx.mean(torch.ones(3)),
        lambda ctx: ctx.sum_(torch.ones(3)),
        lambda ctx: ctx.all_agree(True),
        lambda ctx: ctx.average_gradients(_params()),
        lambda ctx: ctx.parameters_in_sync(_params()),
    ],
    ids=["mean", "sum_", "all_agree", "average_gradients", "parameters_in_sync"],
)
def test_every_reduction_hands_the_backend_a_tensor_on_its_device(reduced_on, collective) -> None:
    ctx = DistContext(rank=0, world_size=2, device=torch.device("meta"))
    with pytest.raises(_Reached):
        collective(ctx)  # the caller's tensors are on the CPU
    assert reduced_on == [ctx.device]


def test_the_barrier_names_this_process_gpu_under_nccl(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[dict] = []
    monkeypatch.setattr(dist, "barrier", lambda **kwargs: calls.append(kwargs))
    DistContext(rank=1, world_size=2, local_rank=1, device=torch.device("cuda", 1)).barrier()
    DistContext(rank=1, world_size=2, local_rank=1).barrier()  # gloo: no GPU to name
    assert [call.get("device_ids") for call in calls] == [[1], None]


@pytest.mark.parametrize(
    "backend, expected", [("nccl", torch.device("cuda", 1)), ("gloo", torch.device("cpu"))]
)
def test_the_context_reduces_where_its_backend_does(
    monkeypatch, backend: str, expected: torch.device
) -> None:
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    monkeypatch.setattr(dist, "is_initialized", lambda: True)  # as torchrun's group, already joined
    monkeypatch.setattr(dist, "get_backend", lambda *args: backend)
    assert init_distributed("cuda").device == expected


@pytest.mark.parametrize(
    "finished, expected", [(True, ["barrier", "destroy", "drain"]), (False, ["destroy"])]
)
def test_a_finished_run_leaves_no_backend_work_to_interpreter_shutdown(
    monkeypatch: pytest.MonkeyPatch, finished: bool, expected: list[str]
) -> None:
    """gloo's threads freed a last collective's tensors during interpreter shutdown now and then
    (SIGABRT): a finished run meets the others, leaves the group, then lets the threads finish with
    the GIL free. After an error the others may never arrive: leave at once."""
    import training.rl.distributed as distributed

    calls: list[str] = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", lambda **kwargs: calls.append("barrier"))
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr(distributed.time, "sleep", lambda seconds: calls.append("drain"))
    shutdown(DistContext(rank=1, world_size=2), finished=finished)
    shutdown(DistContext(), finished=finished)  # one process: nothing to leave
    assert calls == expected


def test_a_peer_that_fails_after_this_process_finished_does_not_make_it_fail(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    calls: list[str] = []

    def barrier(**kwargs: object) -> None:
        raise RuntimeError("Connection closed by peer")

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "barrier", barrier)
    monkeypatch.setattr(dist, "destroy_process_group", lambda: calls.append("destroy"))
    monkeypatch.setattr("training.rl.distributed.time.sleep", lambda seconds: None)
    shutdown(DistContext(rank=1, world_size=2), finished=True)
    assert calls == ["destroy"]


@pytest.mark.parametrize("fails", [False, True])
def test_the_trainer_leaves_the_job_as_finished_only_when_the_run_returned(
    monkeypatch: pytest.MonkeyPatch, fails: bool
) -> None:
    import types

    import training.rl.trainer as trainer

    left: list[bool] = []
    closed: list[str] = []
    world = types.SimpleNamespace(close=lambda: closed.append("env"))
    run = types.SimpleNamespace(env=world, eval_envs={"toy": world})

    def train(_: object) -> dict:
        if fails:
            raise RuntimeError("diverged")
        return {"done": True}

    config = types.SimpleNamespace(validate=lambda: None, device="cpu")
    monkeypatch.setattr(trainer, "init_distributed", lambda device: DistContext())
    monkeypatch.setattr(trainer, "_build_agreed", lambda config, ctx: run)
    monkeypatch.setattr(trainer, "_train", train)
    monkeypatch.setattr(trainer, "shutdown", lambda ctx, *, finished: left.append(finished))
    if fails:
        with pytest.raises(RuntimeError, match="diverged"):
            trainer.train_ppo(config)
    else:
        assert trainer.train_ppo(config) == {"done": True}
    assert left == [not fails] and closed == ["env", "env"]


def test_averaging_gradients_gives_none_to_a_parameter_that_had_none(monkeypatch: pytest.MonkeyPatch) -> None:
    """The actor in the critic warm-up: it must keep no gradient, so that Adam skips it (a zero gradient
    would count a step for it) as it does in one process."""
    monkeypatch.setattr(dist, "all_reduce", lambda tensor, *args, **kwargs: tensor.mul_(2))  # 2 equal ranks
    params = _params()  # the second has no gradient
    params[0].grad = torch.arange(6.0).view(2, 3)
    DistContext(rank=0, world_size=2).average_gradients(params)
    assert torch.equal(params[0].grad, torch.arange(6.0).view(2, 3))
    assert params[1].grad is None
