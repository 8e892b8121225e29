"""Process-backed simulators get worlds sized to the machine unless the user gives a number."""

from __future__ import annotations

import pytest

import eval.compare_sft_vs_rl as compare_module
import training.rl.config as ppo_config_module
import training.sft.train_waypoint_bc_torch_v0 as sft_module
from eval.compare_sft_vs_rl import CompareConfig
from training.envs.capacity import MEMORY_PER_WORKER_BYTES, MachineCapacity, machine_capacity
from training.rl.config import PPOConfig
from training.sft.train_waypoint_bc_torch_v0 import SFTTrainConfig

GIB = 2**30
TWO_CORES = MachineCapacity(cores=2, available_memory_bytes=22 * GIB)  # this project's machine


def test_one_world_per_core_and_never_more_than_half_the_memory_holds() -> None:
    assert TWO_CORES.worlds() == 2
    assert MachineCapacity(cores=64, available_memory_bytes=4 * GIB).worlds() == int(
        2 * GIB // MEMORY_PER_WORKER_BYTES
    )
    assert MachineCapacity(cores=16, available_memory_bytes=6 * GIB).worlds(concurrent_groups=2) == 5
    assert MachineCapacity(cores=8, available_memory_bytes=0).worlds() == 1
    measured = machine_capacity()
    assert measured.cores >= 1 and measured.available_memory_bytes > 0


@pytest.fixture
def two_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    for module in (ppo_config_module, sft_module, compare_module):
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
    assert capsys.readouterr().err == ""
    toy = PPOConfig(sft_checkpoint="model.pt")
    assert (toy.num_envs, toy.eval_worlds) == (32, None)  # the toy world keeps its sizes


def test_sft_and_compare_defaults_fit_the_machine(two_cores, capsys) -> None:
    assert sft_module._episodes_per_batch(SFTTrainConfig(env="metadrive")) == 2
    assert sft_module._episodes_per_batch(SFTTrainConfig(env="metadrive", episodes_per_batch=5)) == 5
    assert sft_module._episodes_per_batch(SFTTrainConfig()) == sft_module.TOY_EPISODES_PER_BATCH
    compare = CompareConfig(sft_checkpoint="a.pt", rl_checkpoint="b.pt", env="metadrive")
    assert compare_module._worlds(compare) == 2
    assert compare_module._worlds(CompareConfig(sft_checkpoint="a.pt", rl_checkpoint="b.pt")) == 256
    assert capsys.readouterr().err.count("to fit this machine") == 2
