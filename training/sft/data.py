"""Expert demonstrations for behaviour cloning: recorded from a batched environment, stored as shards.

A split (``train`` or ``val``) lives in one folder::

    <split_dir>/shard_0000.pt   {"kind": "sft_demo_shard", BEV uint8 [M, C, H, W] compacted by
                                 ``encode_bev`` (0/255 channels as bits: "bev_binary",
                                 "bev_bits", "bev_raw"),
                                 "state": float32 [M, S], "waypoints": float32 [M, K, 2] (metres),
                                 "scenario_seed": int64 [M], "step": int64 [M]}
    <split_dir>/manifest.json   split name, env spec, samples and episodes per shard,
                                scenario seed range per shard, expert outcome rates

One shard holds one batch of episodes. Episodes are played by the expert: every world of a batch
starts from ``reset(batch_seed)`` (world ``i`` gets scenario seed ``batch_seed + i``), acts with the
expert's own plan, and is recorded until its first episode ends; what a world plays after its
autoreset is discarded. Scenario seeds therefore form one contiguous range per split, and the
training and validation splits use disjoint ranges (see ``split_first_seed``), both below
``RL_EVAL_SEED_START`` where the RL evaluation's scenarios begin.

The manifest is written last and removed first, so a manifest always describes complete shards.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from torch.utils.data import Dataset

from training.common.errors import UserError
from training.common.io import atomic_write_json, load_checkpoint, read_json, save_checkpoint
from training.common.seeds import DEV_SEED_START, SFT_VAL_SEED_START
from training.envs.protocol import BatchedWaypointEnv

DEMO_SHARD_KIND = "sft_demo_shard"
DEMO_FORMAT_VERSION = 1
SEEDS_PER_RUN_SEED = 1_000_000  # scenario seeds reserved for one --seed in one split
VAL_SEED_OFFSET = SFT_VAL_SEED_START  # validation scenarios start here (+ seed * SEEDS_PER_RUN_SEED)
RL_EVAL_SEED_START = DEV_SEED_START  # RL evaluation scenarios; SFT data stays below
SPLITS = ("train", "val")

_BIT_WEIGHTS = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8)


def pack_bits(bev: Tensor) -> Tensor:
    """Pack a 0/255 raster ``[..., W]`` (W divisible by 8) to bits ``[..., W / 8]``, 8x smaller."""
    bits = (bev == 255).to(torch.uint8).unflatten(-1, (-1, 8))
    return (bits * _BIT_WEIGHTS.to(bev.device)).sum(dim=-1, dtype=torch.uint8)


def unpack_bits(bev_bits: Tensor) -> Tensor:
    """Inverse of ``pack_bits``: uint8 ``[..., W / 8]`` -> uint8 0/255 ``[..., W]``."""
    bits = (bev_bits.unsqueeze(-1) & _BIT_WEIGHTS.to(bev_bits.device)) != 0
    return bits.flatten(-2).to(torch.uint8) * 255


def encode_bev(bev: Tensor) -> dict[str, Tensor]:
    """Compact storage of a uint8 BEV batch ``[M, C, H, W]``: channels that only hold 0 and 255
    are packed to bits (when W divides by 8), the others (an anti-aliased line) are kept as they are.

    Returns ``{"bev_binary": bool [C], "bev_bits": [M, Cb, H, W / 8], "bev_raw": [M, C - Cb, H, W]}``.
    """
    m, c, h, w = bev.shape
    if w % 8:
        binary = torch.zeros(c, dtype=torch.bool)
    else:
        binary = ((bev == 0) | (bev == 255)).all(dim=-1).all(dim=-1).all(dim=0).cpu()
    bits = pack_bits(bev[:, binary]) if w % 8 == 0 else torch.zeros(m, 0, h, 0, dtype=torch.uint8)
    return {"bev_binary": binary, "bev_bits": bits, "bev_raw": bev[:, ~binary].clone()}


def decode_bev(stored: dict[str, Tensor]) -> Tensor:
    """Inverse of ``encode_bev``: uint8 ``[M, C, H, W]``."""
    binary, raw, bits = stored["bev_binary"], stored["bev_raw"], stored["bev_bits"]
    m, _, h, w = raw.shape
    bev = torch.empty(m, binary.numel(), h, w, dtype=torch.uint8)
    if binary.any():
        bev[:, binary] = unpack_bits(bits)
    if not binary.all():
        bev[:, ~binary] = raw
    return bev


def split_first_seed(split: str, seed: int) -> int:
    """First scenario seed of ``split`` for a run with ``--seed seed`` (0 <= seed < 500)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}")
    if not 0 <= seed < VAL_SEED_OFFSET // SEEDS_PER_RUN_SEED:
        raise ValueError(f"seed must be in [0, {VAL_SEED_OFFSET // SEEDS_PER_RUN_SEED}), got {seed}")
    offset = 0 if split == "train" else VAL_SEED_OFFSET
    return offset + seed * SEEDS_PER_RUN_SEED


@torch.no_grad()
def record_expert_batch(
    env: BatchedWaypointEnv,
    batch_seed: int,
    num_episodes: int,
    record_every: int = 1,
    action_noise_m: float = 0.0,
    generator: torch.Generator | None = None,
) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Play the expert in the first ``num_episodes`` worlds of ``env`` until each episode ends.

    Args:
        env: a batched environment with ``num_envs >= num_episodes``.
        batch_seed: ``reset`` seed; world ``i`` plays scenario ``batch_seed + i``.
        num_episodes: worlds ``0 .. num_episodes - 1`` are recorded, the rest only run along.
        record_every: keep every n-th step of an episode (1 keeps all).
        action_noise_m: std (metres) of Gaussian noise added to the executed plan (not to the
            recorded label), to visit states slightly off the expert's path; 0 plays it clean.
        generator: random source of that noise (CPU generator).

    Returns:
        ``(samples, episodes)``: samples as CPU tensors (``bev``, ``state``, ``waypoints``,
        ``scenario_seed``, ``step``), and per recorded episode (``scenario_seed``, ``length``,
        ``route_completion``, ``collision``, ``off_road``, ``goal_reached``, ``episode_return``).
    """
    n = env.num_envs
    if not 1 <= num_episodes <= n:
        raise ValueError(f"num_episodes must be in [1, {n}], got {num_episodes}")
    device = env.device
    obs = env.reset(seed=batch_seed)
    expert = env.expert_waypoints()
    world_seeds = batch_seed + torch.arange(n, dtype=torch.int64, device=device)
    active = torch.arange(n, device=device) < num_episodes
    ended = torch.zeros(n, dtype=torch.bool, device=device)
    stats = {
        "length": torch.zeros(n, dtype=torch.int64, device=device),
        "route_completion": torch.zeros(n, device=device),
        "collision": torch.zeros(n, dtype=torch.bool, device=device),
        "off_road": torch.zeros(n, dtype=torch.bool, device=device),
        "goal_reached": torch.zeros(n, dtype=torch.bool, device=device),
        "episode_return": torch.zeros(n, device=device),
    }
    chunks: dict[str, list[Tensor]] = {k: [] for k in ("bev", "state", "waypoints", "scenario_seed", "step")}
    max_steps = env.spec.max_episode_steps + 1
    for step in range(max_steps + 1):
        if not bool(active.any()):
            break
        if step == max_steps:
            raise RuntimeError(f"episodes did not end within max_episode_steps={env.spec.max_episode_steps}")
        if step % record_every == 0:
            chunks["bev"].append(obs.bev[active].to("cpu", torch.uint8))
            chunks["state"].append(obs.state[active].to("cpu", torch.float32))
            chunks["waypoints"].append(expert[active].to("cpu", torch.float32))
            chunks["scenario_seed"].append(world_seeds[active].cpu())
            chunks["step"].append(torch.full((int(active.sum()),), step, dtype=torch.int64))
        action = expert
        if action_noise_m > 0:
            noise = torch.randn(expert.shape, generator=generator) * action_noise_m
            action = expert + noise.to(device)
        result = env.step(action)
        episode = result.info.episode
        newly = active & episode.done
        for key in stats:
            stats[key] = torch.where(newly, getattr(episode, key).to(stats[key].dtype), stats[key])
        ended |= newly
        active &= ~episode.done
        obs = result.obs
        expert = result.info.expert_waypoints
    samples = {k: torch.cat(v) for k, v in chunks.items()}
    keep = torch.arange(n, device=device) < num_episodes
    episodes = {k: v[keep].cpu() for k, v in stats.items()}
    episodes["scenario_seed"] = world_seeds[keep].cpu()
    return samples, episodes


def _clear_split_dir(split_dir: Path) -> None:
    (split_dir / "manifest.json").unlink(missing_ok=True)
    for old in split_dir.glob("shard_*.pt"):
        old.unlink()


def collect_split(
    env: BatchedWaypointEnv,
    split_dir: str | Path,
    split: str,
    num_episodes: int,
    first_seed: int,
    record_every: int = 1,
    action_noise_m: float = 0.0,
    noise_seed: int = 0,
    progress: Callable[[int], None] | None = None,
) -> dict[str, Any]:
    """Record ``num_episodes`` expert episodes (scenario seeds ``first_seed`` upward) as shards.

    Args:
        env: the environment that records; its ``num_envs`` worlds are one batch of episodes
            (the last batch may use fewer). The caller builds it before writing anything, so a
            simulator that cannot start leaves no files, and closes it.
        split_dir: folder for ``shard_XXXX.pt`` and ``manifest.json`` (old ones are replaced).
        split: ``"train"`` or ``"val"``, recorded in the manifest.
        num_episodes: episodes to record, in batches of ``env.num_envs`` worlds.
        first_seed: scenario seed of the first episode; the split covers
            ``[first_seed, first_seed + num_episodes)``.
        record_every, action_noise_m: see ``record_expert_batch``.
        noise_seed: seed of the action noise.
        progress: called with the number of episodes finished after each batch.

    Returns:
        The manifest (also written to ``split_dir/manifest.json``).
    """
    if num_episodes < 1 or record_every < 1:
        raise ValueError("num_episodes and record_every must be >= 1")
    split_dir = Path(split_dir)
    split_dir.mkdir(parents=True, exist_ok=True)
    _clear_split_dir(split_dir)
    num_envs = min(env.num_envs, num_episodes)
    generator = torch.Generator().manual_seed(noise_seed)
    shards: list[dict[str, Any]] = []
    outcome_sums = {"route_completion": 0.0, "collision": 0.0, "off_road": 0.0, "goal_reached": 0.0}
    done = 0
    while done < num_episodes:
        count = min(num_envs, num_episodes - done)
        batch_seed = first_seed + done
        samples, episodes = record_expert_batch(
            env, batch_seed, count, record_every, action_noise_m, generator
        )
        name = f"shard_{len(shards):04d}.pt"
        shard = {"kind": DEMO_SHARD_KIND, "format_version": DEMO_FORMAT_VERSION, **samples}
        shard.update(encode_bev(shard.pop("bev")))
        save_checkpoint(split_dir / name, shard)
        for key in outcome_sums:
            outcome_sums[key] += float(episodes[key].float().sum())
        shards.append(
            {
                "file": name,
                "num_samples": int(samples["state"].shape[0]),
                "num_episodes": count,
                "scenario_seeds": [batch_seed, batch_seed + count],
                "mean_episode_length": float(episodes["length"].float().mean()),
            }
        )
        done += count
        if progress is not None:
            progress(done)
    manifest = {
        "kind": "sft_demo_manifest",
        "format_version": DEMO_FORMAT_VERSION,
        "split": split,
        "num_samples": sum(s["num_samples"] for s in shards),
        "num_episodes": num_episodes,
        "scenario_seeds": [first_seed, first_seed + num_episodes],  # half-open range
        "record_every": record_every,
        "action_noise_m": action_noise_m,
        "expert_outcomes": {f"{k}_rate": v / num_episodes for k, v in outcome_sums.items()},
        "env_spec": env.spec.to_dict(),
        "shards": shards,
    }
    atomic_write_json(split_dir / "manifest.json", manifest)
    return manifest


class WaypointDemoDataset(Dataset):
    """All shards of one split folder, held in memory as tensors.

    Attributes:
        bev: uint8 ``[M, C, H, W]``; state: float32 ``[M, S]``; waypoints: float32 ``[M, K, 2]``
        (metres, ego frame); scenario_seed, step: int64 ``[M]``; manifest: the split's manifest.

    ``dataset[i]`` is ``(bev, state, waypoints)`` of sample ``i``; trainers may also index the
    tensors directly with a batch of indices, which is much faster than a ``DataLoader``.
    """

    def __init__(self, split_dir: str | Path) -> None:
        split_dir = Path(split_dir)
        manifest = read_json(split_dir / "manifest.json")
        if not isinstance(manifest, dict) or manifest.get("kind") != "sft_demo_manifest":
            raise UserError(f"{split_dir / 'manifest.json'} is not a demonstration manifest")
        self.manifest = manifest
        parts: dict[str, list[Tensor]] = {
            k: [] for k in ("bev", "state", "waypoints", "scenario_seed", "step")
        }
        for entry in manifest["shards"]:
            path = split_dir / entry["file"]
            shard = load_checkpoint(path, expected_kind=DEMO_SHARD_KIND)
            try:
                shard["bev"] = decode_bev(shard)
            except (KeyError, RuntimeError, IndexError, ValueError):
                raise UserError(f"demonstration shard {path} is malformed: bad BEV entries") from None
            missing = [k for k in parts if k not in shard]
            if missing:
                raise UserError(f"demonstration shard {path} is malformed: missing {', '.join(missing)}")
            if int(shard["state"].shape[0]) != entry["num_samples"]:
                raise UserError(f"demonstration shard {path} does not match its manifest entry")
            for key in parts:
                parts[key].append(shard[key])
        if not manifest["shards"]:
            raise UserError(f"{split_dir} holds no demonstration shards")
        self.bev = torch.cat(parts["bev"])
        self.state = torch.cat(parts["state"])
        self.waypoints = torch.cat(parts["waypoints"])
        self.scenario_seed = torch.cat(parts["scenario_seed"])
        self.step = torch.cat(parts["step"])

    def __len__(self) -> int:
        return int(self.state.shape[0])

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        return self.bev[index], self.state[index], self.waypoints[index]

    def to(self, device: str | torch.device) -> WaypointDemoDataset:
        """Move the tensors to ``device`` in place (for training on a GPU) and return self."""
        for key in ("bev", "state", "waypoints", "scenario_seed", "step"):
            setattr(self, key, getattr(self, key).to(device))
        return self
