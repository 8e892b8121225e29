"""Counter-based random numbers: a scenario depends only on its seed, on any device.

Each value is a 32-bit integer hash of (scenario seed, stream, index), so the same seed gives
bit-identical scenarios on the CPU and on CUDA, whatever the other worlds in the batch do.
"""

from __future__ import annotations

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


def uniform(seeds: torch.Tensor, stream: int, count: int) -> torch.Tensor:
    """Uniform floats in [0, 1), shape ``[len(seeds), count]``, a pure function of the inputs."""
    seeds = seeds.to(torch.int64)
    index = torch.arange(count, device=seeds.device, dtype=torch.int64)
    low = _hash32(seeds & _MASK32)
    high = _hash32((seeds >> 32) ^ 0x9E3779B9)
    key = _hash32(low ^ _hash32(high + stream * 0x85EBCA6B))
    values = _hash32(key[:, None] ^ _hash32(index[None, :] + 0x27D4EB2F * (stream + 1)))
    return (values >> 8).to(torch.float32) / float(1 << 24)


def uniform_range(seeds: torch.Tensor, stream: int, count: int, low: float, high: float) -> torch.Tensor:
    return low + (high - low) * uniform(seeds, stream, count)
