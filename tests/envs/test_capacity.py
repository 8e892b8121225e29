"""Process-backed simulators get worlds sized to the machine unless the user gives a number."""

from __future__ import annotations

import pytest

import training.envs.capacity as capacity_module
import training.rl.config as ppo_config_module
from training.envs.capacity import MEMORY_PER_WORKER_BYTES, MachineCapacity, default_worlds, machine_capacity
from training.rl.config import PPOConfig

GIB = 2**30
TWO_CORES = MachineCapacity(cores=2, available_memory_bytes=22 * GIB)  # this project's machine


def test_one_world_per_core_and_never_more_than_half_the_memory_holds() -> None:
    assert TWO_CORES.worlds() == 2
    # half of 4 GiB holds 6 workers: 5 worlds and their spare
    assert MachineCapacity(cores=64, available_memory_bytes=4 * GIB).worlds() == int(
        2 * GIB // MEMORY_PER_WORKER_BYTES - 1
    )
    # half of 6 GiB holds 10 workers: two groups of 4 worlds and a spare each
    assert MachineCapacity(cores=16, available_memory_bytes=6 * GIB).worlds(concurrent_groups=2) == 4
    assert MachineCapacity(cores=8, available_memory_bytes=0).worlds() == 1
    measured = machine_capacity()
    assert measured.cores >= 1 and measured.available_memory_bytes > 0


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (ppo_config_module, capacity_module):
        monkeypatch.setattr(module, "machine_capacity", lambda: TWO_CORES)


def test_ppo_defaults_fit_the_machine_and_say_so(two_cores, capsys) -> None:
    config = PPOConfig(sft_checkpoint="model.pt", env="metadrive")
    assert (config.num_envs, config.eval_worlds) == (2, 2)
    assert capsys.readouterr().err.count("\n") == 1  # one line names what was chosen
    mix = PPOConfig(sft_checkpoint="model.pt", env="toy,metadrive", env_weights="3,1")
    assert dict(mix.env_mix())["metadrive"] <= 2 and mix.num_envs > 2


def test_ppo_numbers_the_user_gives_are_obeyed(two_cores, capsys) -> None:
    config = PPOConfig(sft_checkpoint="model.pt", env="metadrive", num_envs=8, eval_worlds=6)
    assert (config.num_envs, config.eval_worlds) == (8, 6)
    many = PPOConfig(sft_checkpoint="model.pt", env="metadrive", sim_workers=32, eval_worlds=4)
    assert many.num_envs == 32  # --sim-workers asks for the processes explicitly
    assert capsys.readouterr().err == ""
    toy = PPOConfig(sft_checkpoint="model.pt")
    assert (toy.num_envs, toy.eval_worlds) == (32, None)  # the toy world keeps its sizes


def test_sft_and_compare_defaults_fit_the_machine(two_cores, capsys) -> None:
    """The SFT trainer's --episodes-per-batch and compare's --worlds (both call default_worlds)."""
    assert default_worlds("metadrive", None, 120, "--episodes-per-batch", "recording") == 2
    assert default_worlds("metadrive", 5, 120, "--episodes-per-batch", "recording") == 5
    assert default_worlds("toy", None, 256, "--worlds", "driving") == 256
    err = capsys.readouterr().err
    assert err.count("to fit this machine") == 1 and "--episodes-per-batch sets another number" in err


def test_the_sft_trainer_records_on_the_worlds_the_machine_fits(two_cores, monkeypatch) -> None:
    import training.sft.train_waypoint_bc_torch_v0 as sft_module

    built = []
    monkeypatch.setattr(
        sft_module, "make_env", lambda name, num_envs, *args, **kwargs: built.append(num_envs)
    )
    sft_module._recording_env(sft_module.SFTTrainConfig(env="metadrive", num_episodes=6), "cpu")
    sft_module._recording_env(sft_module.SFTTrainConfig(num_episodes=200), "cpu")
    assert built == [2, sft_module.TOY_EPISODES_PER_BATCH]
