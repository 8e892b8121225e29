"""The reward presets of ``--reward`` and the penalties that replace the environment's."""

from __future__ import annotations

import dataclasses

import pytest

from training.envs.options import EnvOptions
from training.envs.toy.config import SHAPING_TERMS, RewardWeights, reward_preset, run_reward

WEIGHTS = RewardWeights()


def test_shaped_is_every_term_unchanged() -> None:
    assert reward_preset(WEIGHTS, "shaped") == WEIGHTS


@pytest.mark.parametrize(("preset", "kept"), [("progress", ()), ("comfort", ("jerk", "steer_rate"))])
def test_progress_presets_keep_progress_and_infractions_and_only_their_shaping_terms(preset, kept) -> None:
    weights = reward_preset(WEIGHTS, preset)
    for term in SHAPING_TERMS:
        assert getattr(weights, term) == (getattr(WEIGHTS, term) if term in kept else 0.0), term
    for term in ("progress", "collision", "off_road"):
        assert getattr(weights, term) == getattr(WEIGHTS, term) != 0.0, term
    assert all(getattr(WEIGHTS, term) > 0 for term in kept)  # kept means something


def test_penalties_given_replace_the_environments() -> None:
    options = dataclasses.replace(EnvOptions(), reward="comfort", collision_penalty=50.0)
    weights = run_reward(WEIGHTS, options)
    assert (weights.collision, weights.off_road, weights.jerk) == (50.0, WEIGHTS.off_road, WEIGHTS.jerk)


def test_an_unknown_preset_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown reward preset"):
        reward_preset(WEIGHTS, "fast")
