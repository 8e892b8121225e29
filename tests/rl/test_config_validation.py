"""Property tests: PPOConfig.validate accepts exactly the values a run can use."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from training.common.errors import UserError
from training.rl.config import PPOConfig

BASE = PPOConfig(sft_checkpoint="model.pt", num_envs=8, rollout_steps=16, batch_size=64)
ANY_FLOAT = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(-2.0, 2.0),
    st.sampled_from([0.0, -0.0, 1.0, 1.0 + 1e-9, -1e-9, 1e-12]),
)
ANY_INT = st.integers(-5, 200)

# field -> (values to try, the rule from the issue, stated independently of the code)
RULES: dict[str, tuple[st.SearchStrategy, Callable[[float], bool]]] = {
    "lr": (ANY_FLOAT, lambda v: math.isfinite(v) and v > 0),
    "clip_epsilon": (ANY_FLOAT, lambda v: 0 < v < 1),
    "value_coef": (ANY_FLOAT, lambda v: math.isfinite(v) and v >= 0),
    "entropy_coef": (ANY_FLOAT, lambda v: math.isfinite(v) and v >= 0),
    "residual_l2_coef": (ANY_FLOAT, lambda v: math.isfinite(v) and v >= 0),
    "reward_scale": (ANY_FLOAT, lambda v: math.isfinite(v) and v > 0),
    "max_delta": (ANY_FLOAT, lambda v: math.isfinite(v) and v > 0),
    "action_scale": (ANY_FLOAT, lambda v: math.isfinite(v) and v > 0),
    "max_grad_norm": (ANY_FLOAT, lambda v: math.isfinite(v) and v > 0),
    "target_kl": (ANY_FLOAT, lambda v: math.isfinite(v) and v > 0),
    "exploration_start_scale": (ANY_FLOAT, lambda v: 1e-3 <= v <= 1),
    "init_log_std": (ANY_FLOAT, math.isfinite),
    "min_log_std": (ANY_FLOAT, lambda v: math.isfinite(v) and v < BASE.max_log_std),
    "gamma": (ANY_FLOAT, lambda v: 0 <= v <= 1),
    "gae_lambda": (ANY_FLOAT, lambda v: 0 <= v <= 1),
    "num_envs": (ANY_INT, lambda v: v >= 1 and BASE.batch_size <= v * BASE.rollout_steps),
    "rollout_steps": (ANY_INT, lambda v: v >= 1 and BASE.batch_size <= BASE.num_envs * v),
    "batch_size": (st.integers(-5, 300), lambda v: 2 <= v <= BASE.num_envs * BASE.rollout_steps),
    "collision_penalty": (ANY_FLOAT, lambda v: math.isfinite(v) and v >= 0),
    "off_road_penalty": (ANY_FLOAT, lambda v: math.isfinite(v) and v >= 0),
}


def test_the_base_config_is_valid() -> None:
    BASE.validate()


@pytest.mark.parametrize("field", sorted(RULES))
@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_validate_accepts_exactly_the_usable_values(field: str, data: st.DataObject) -> None:
    values, rule = RULES[field]
    value = data.draw(values, label=field)
    config = dataclasses.replace(BASE, **{field: value})
    if rule(value):
        config.validate()
    else:
        with pytest.raises(UserError, match=field.replace("_", "-")):
            config.validate()


@pytest.mark.parametrize("env", ["carla2", "", "TOY"])
def test_unknown_env_is_rejected(env: str) -> None:
    with pytest.raises(UserError, match="unknown --env"):
        dataclasses.replace(BASE, env=env).validate()


def test_evaluation_worlds_default_to_one_per_episode_up_to_a_bound() -> None:
    """Each evaluation world is a copy of the world's state: a million episodes must not build a million."""
    assert dataclasses.replace(BASE, eval_episodes=50).num_eval_worlds == 50
    assert dataclasses.replace(BASE, eval_episodes=10**6).num_eval_worlds == 256
    assert dataclasses.replace(BASE, eval_episodes=10**6, eval_worlds=1000).num_eval_worlds == 1000
