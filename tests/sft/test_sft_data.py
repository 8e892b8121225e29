"""Expert demonstrations: recording, shards, manifest and the dataset that reads them."""

from __future__ import annotations

import json

import pytest
import torch
from sft_fake_env import FakeWaypointEnv

from training.common.errors import UserError
from training.sft.data import (
    RL_EVAL_SEED_START,
    WaypointDemoDataset,
    collect_split,
    decode_bev,
    encode_bev,
    record_expert_batch,
    split_first_seed,
)


def test_bev_storage_round_trip() -> None:
    bev = torch.randint(0, 2, (3, 4, 8, 16), dtype=torch.uint8) * 255
    bev[:, 1] = torch.randint(0, 256, (3, 8, 16), dtype=torch.uint8)  # an anti-aliased channel
    stored = encode_bev(bev)
    assert stored["bev_binary"].tolist() == [True, False, True, True]
    assert stored["bev_bits"].shape == (3, 3, 8, 2) and stored["bev_raw"].shape == (3, 1, 8, 16)
    assert torch.equal(decode_bev(stored), bev)
    all_binary = encode_bev(bev[:, [0, 2]])
    assert all_binary["bev_raw"].shape[1] == 0
    assert torch.equal(decode_bev(all_binary), bev[:, [0, 2]])
    odd_width = encode_bev(bev[..., :12])  # not a multiple of 8: kept raw
    assert not odd_width["bev_binary"].any()
    assert torch.equal(decode_bev(odd_width), bev[..., :12])


def test_split_seeds_are_disjoint_and_below_rl_eval() -> None:
    assert split_first_seed("train", 0) == 0
    assert split_first_seed("train", 3) == 3_000_000
    assert split_first_seed("val", 3) == 503_000_000
    assert split_first_seed("val", 499) + 1_000_000 <= RL_EVAL_SEED_START
    with pytest.raises(ValueError):
        split_first_seed("val", 500)


def test_record_keeps_only_first_episode_of_each_world() -> None:
    env = FakeWaypointEnv(num_envs=6)
    samples, episodes = record_expert_batch(env, batch_seed=10, num_episodes=4)
    lengths = 3 + torch.arange(10, 14) % 4
    assert torch.equal(episodes["scenario_seed"], torch.arange(10, 14))
    assert torch.equal(episodes["length"], lengths)
    assert samples["state"].shape[0] == int(lengths.sum())
    for seed, length in zip(range(10, 14), lengths.tolist(), strict=True):
        steps = samples["step"][samples["scenario_seed"] == seed]
        assert sorted(steps.tolist()) == list(range(length))
    assert samples["bev"].dtype == torch.uint8 and samples["waypoints"].dtype == torch.float32
    assert samples["scenario_seed"].dtype == torch.int64


def test_collect_split_and_dataset_round_trip(tmp_path) -> None:
    recorder = FakeWaypointEnv(4)
    manifest = collect_split(recorder, tmp_path / "train", "train", num_episodes=11, first_seed=100)
    assert not recorder.closed  # the caller owns the environment
    lengths = 3 + torch.arange(100, 111) % 4
    assert manifest["num_episodes"] == 11 and manifest["num_samples"] == int(lengths.sum())
    assert manifest["scenario_seeds"] == [100, 111]
    assert [s["scenario_seeds"] for s in manifest["shards"]] == [[100, 104], [104, 108], [108, 111]]
    assert manifest["expert_outcomes"]["goal_reached_rate"] == 1.0
    on_disk = json.loads((tmp_path / "train" / "manifest.json").read_text())
    assert on_disk == manifest
    shard = torch.load(tmp_path / "train" / "shard_0000.pt", weights_only=True)
    assert shard["bev_binary"].all()  # 0/255 rasters are stored as bits

    data = WaypointDemoDataset(tmp_path / "train")
    assert len(data) == manifest["num_samples"]
    assert sorted(data.scenario_seed.unique().tolist()) == list(range(100, 111))
    bev, _state, waypoints = data[0]
    assert bev.shape == (4, 16, 16) and bev.dtype == torch.uint8 and set(bev.unique().tolist()) <= {0, 255}
    # The label is the expert's plan for the recorded observation.
    env = FakeWaypointEnv(1)
    env.reset(seed=int(data.scenario_seed[0]))
    assert torch.allclose(waypoints, env.expert_waypoints()[0])
    assert torch.equal(bev, env._obs().bev[0])

    # Re-recording replaces the old shards and manifest.
    collect_split(recorder, tmp_path / "train", "train", num_episodes=2, first_seed=0)
    assert sorted(p.name for p in (tmp_path / "train").glob("shard_*.pt")) == ["shard_0000.pt"]


def test_record_every_and_noise_keep_clean_labels(tmp_path) -> None:
    manifest = collect_split(
        FakeWaypointEnv(4),
        tmp_path,
        "val",
        num_episodes=4,
        first_seed=0,
        record_every=2,
        action_noise_m=0.5,
    )
    data = WaypointDemoDataset(tmp_path)
    assert (data.step % 2 == 0).all()
    assert manifest["split"] == "val" and manifest["record_every"] == 2
    env = FakeWaypointEnv(1)
    env.reset(seed=0)
    assert torch.allclose(data.waypoints[data.scenario_seed == 0][0], env.expert_waypoints()[0])


def test_dataset_reports_missing_or_corrupt_shards(tmp_path) -> None:
    with pytest.raises(UserError, match="not found"):
        WaypointDemoDataset(tmp_path)
    collect_split(FakeWaypointEnv(2), tmp_path, "train", num_episodes=2, first_seed=0)
    (tmp_path / "shard_0000.pt").write_bytes(b"garbage")
    with pytest.raises(UserError, match=r"shard_0000\.pt"):
        WaypointDemoDataset(tmp_path)
