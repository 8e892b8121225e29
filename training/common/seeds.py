"""Scenario-seed ranges: the data splits of every stage, named in one place.

A scenario (road, traffic, start state) is a pure function of its seed, so disjoint seed ranges
are disjoint data. Who may look at which range:

- SFT demonstrations, ``[0, 1e9)``: the SFT trainer (training below ``5e8``, validation above).
- development, ``[1e9, 1.5e9)``: the in-training evaluation and the policy selection it drives,
  the tests, and every benchmark that chooses a default.
- test, ``[1.5e9, 2e9)``: final comparisons only (``compare_sft_vs_rl``'s default, README's numbers).
- RL training, ``[2e9, ...)``: the worlds PPO trains in (``--seed s`` starts at ``2e9 + s * 1e6``).
"""

from __future__ import annotations

SFT_TRAIN_SEED_START = 0
SFT_VAL_SEED_START = 500_000_000
DEV_SEED_START = 1_000_000_000
TEST_SEED_START = 1_500_000_000
RL_TRAIN_SEED_START = 2_000_000_000

SEED_RANGES: dict[str, tuple[int, int]] = {
    "sft_train": (SFT_TRAIN_SEED_START, SFT_VAL_SEED_START),
    "sft_val": (SFT_VAL_SEED_START, DEV_SEED_START),
    "development": (DEV_SEED_START, TEST_SEED_START),
    "test": (TEST_SEED_START, RL_TRAIN_SEED_START),
}


def split_of(seed: int) -> str:
    """The name of the range ``seed`` belongs to (``rl_train`` above the others)."""
    for name, (start, stop) in SEED_RANGES.items():
        if start <= seed < stop:
            return name
    return "rl_train" if seed >= RL_TRAIN_SEED_START else "invalid"
