"""Counter-based random numbers: a scenario depends only on its seed, on any device.

Each value is a 32-bit integer hash of (scenario seed, stream, index), so the same seed gives
bit-identical scenarios on the CPU and on CUDA, whatever the other worlds in the batch do.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import torch

_MASK32 = 0xFFFFFFFF


def _hash32(x: torch.Tensor) -> torch.Tensor:
    """The 'lowbias32' integer hash on int64 tensors holding 32-bit values."""
    x = x & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x846CA68B) & _MASK32
    x = x ^ (x >> 16)
    return x


def uniform_streams(seeds: torch.Tensor, draws: Sequence[tuple[int, int]]) -> list[torch.Tensor]:
    """Uniform floats in [0, 1), one ``[len(seeds), count]`` tensor for each ``(stream, count)`` of
    ``draws``, a pure function of the inputs: a value depends only on its seed, stream and index,
    not on the other draws or seeds, and all of them come from one batch of integer ops (a
    scenario's ten quantities cost about 40 ops; drawn one stream at a time, 800)."""
    seeds = seeds.to(torch.int64)
    stream_ids, stream_of_value, index = _draw_layout(tuple(draws), seeds.device)
    low = _hash32(seeds & _MASK32)[:, None]
    high = _hash32((seeds >> 32) ^ 0x9E3779B9)[:, None]
    keys = _hash32(low ^ _hash32(high + stream_ids * 0x85EBCA6B))  # [M, D]: one per stream
    salt = _hash32(index + 0x27D4EB2F * (stream_ids[stream_of_value] + 1))  # [T]
    values = _hash32(keys.index_select(1, stream_of_value) ^ salt)
    uniforms = (values >> 8).to(torch.float32) / float(1 << 24)
    return list(uniforms.split([count for _, count in draws], dim=1))


@functools.lru_cache(maxsize=16)
def _draw_layout(
    draws: tuple[tuple[int, int], ...], device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Stream ids ``[D]``, then for every value drawn ``[T]`` its draw's place in ``draws`` and its
    index within the draw."""
    stream_ids = torch.tensor([stream for stream, _ in draws], dtype=torch.int64, device=device)
    place = [d for d, (_, count) in enumerate(draws) for _ in range(count)]
    index = [i for _, count in draws for i in range(count)]
    as_tensor = functools.partial(torch.tensor, dtype=torch.int64, device=device)
    return stream_ids, as_tensor(place), as_tensor(index)


def in_range(unit: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Uniform values in [0, 1) mapped to [low, high)."""
    return low + (high - low) * unit
