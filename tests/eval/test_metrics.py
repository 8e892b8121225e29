import math

import numpy as np
import pytest
import torch

from eval.metrics import (
    METRICS,
    add_shared_window_errors,
    compare_paired,
    displacement_errors,
    paired_bootstrap_ci,
    shared_window_means,
    summarise,
)


def test_displacement_errors_hand_computed():
    pred = torch.tensor([[[0.0, 0.0], [3.0, 4.0]], [[1.0, 1.0], [2.0, 2.0]]])
    expert = torch.tensor([[[0.0, 0.0], [0.0, 0.0]], [[1.0, 2.0], [2.0, 2.0]]])
    ade, fde = displacement_errors(pred, expert)
    assert torch.allclose(ade, torch.tensor([2.5, 0.5]))
    assert torch.allclose(fde, torch.tensor([5.0, 0.0]))
    ade_np, fde_np = displacement_errors(pred.numpy(), expert.numpy())
    np.testing.assert_allclose(ade_np, [2.5, 0.5])
    np.testing.assert_allclose(fde_np, [5.0, 0.0])


def test_displacement_errors_rejects_bad_shapes():
    with pytest.raises(ValueError):
        displacement_errors(torch.zeros(2, 3, 2), torch.zeros(2, 4, 2))


def test_bootstrap_covers_known_shift_and_is_deterministic():
    rng = np.random.default_rng(1)
    a = rng.normal(3.0, 1.0, size=200)
    b = a + 0.5 + rng.normal(0.0, 0.05, size=200)
    diff, low, high = paired_bootstrap_ci(a, b, seed=7)
    assert low < 0.5 < high
    assert low > 0.0
    assert abs(diff - 0.5) < 0.02
    assert paired_bootstrap_ci(a, b, seed=7) == (diff, low, high)
    assert paired_bootstrap_ci(a, b, seed=8) != (diff, low, high)


def test_bootstrap_identical_inputs_zero_width():
    a = np.linspace(0.0, 1.0, 50)
    assert paired_bootstrap_ci(a, a.copy()) == (0.0, 0.0, 0.0)


def test_bootstrap_drops_non_finite_pairs_and_handles_empty():
    a = np.array([1.0, np.nan, 2.0])
    b = np.array([2.0, 5.0, 3.0])
    diff, low, high = paired_bootstrap_ci(a, b)
    assert (diff, low, high) == (1.0, 1.0, 1.0)
    assert all(math.isnan(x) for x in paired_bootstrap_ci(np.array([np.nan]), np.array([1.0])))


def _episode(seed, ade, collision=0):
    ep = {spec.key: 1.0 for spec in METRICS}
    ep.update(scenario_seed=seed, ade=ade, collision=collision, length=10)
    return ep


def test_summarise_uses_rate_names():
    eps = [_episode(0, 1.0, collision=1), _episode(1, 3.0, collision=0)]
    summary = summarise(eps)
    assert summary["ade"] == 2.0
    assert summary["collision_rate"] == 0.5
    assert summary["num_episodes"] == 2.0
    assert {"fde", "episode_return", "route_completion", "off_road_rate", "mean_abs_jerk"} <= set(summary)


def test_compare_paired_pairs_by_seed_and_flags_improvement():
    sft = [_episode(s, 2.0 + 0.01 * s) for s in range(30)]
    rl = [_episode(s, 1.0 + 0.01 * s) for s in reversed(range(30))]
    rows = {row["metric"]: row for row in compare_paired(sft, rl, num_resamples=500)}
    ade = rows["ade"]
    assert ade["difference"] == pytest.approx(-1.0)
    assert ade["ci_low"] == pytest.approx(-1.0) and ade["ci_high"] == pytest.approx(-1.0)
    assert ade["improved"] and not ade["worsened"]
    assert ade["relative_change"] == pytest.approx(-1.0 / (2.0 + 0.01 * 14.5))
    assert not rows["fde"]["significant"]
    assert {"metric", "sft", "rl", "difference", "relative_change", "ci_low", "ci_high"} <= set(ade)


def test_compare_paired_rejects_mismatched_scenarios():
    with pytest.raises(ValueError):
        compare_paired([_episode(0, 1.0)], [_episode(1, 1.0)])


def test_shared_window_means_cover_the_steps_both_drove():
    longer = np.array([[1.0, 2.0], [3.0, np.nan], [10.0, 10.0]])
    shorter = np.array([[2.0, 4.0], [2.0, 4.0]])
    mine, theirs = shared_window_means(longer, shorter)
    np.testing.assert_allclose(mine, [2.0, 2.0])  # steps 0-1; the NaN step is left out
    np.testing.assert_allclose(theirs, [2.0, 4.0])
    mine, _ = shared_window_means(np.array([[np.nan, 1.0]]), shorter)
    assert math.isnan(mine[0]) and mine[1] == 1.0


def test_shared_window_errors_pair_by_scenario_and_enter_the_comparison():
    """SFT fails after 2 steps, RL drives on into harder states: its whole-episode ADE rises, its
    ADE over the steps both drove does not."""
    sft = [{"scenario_seed": 5, "ade": 1.0}, {"scenario_seed": 6, "ade": 2.0}]
    rl = [{"scenario_seed": 6, "ade": 2.0}, {"scenario_seed": 5, "ade": 4.0}]
    sft_steps = [np.array([[1.0, 1.5], [1.0, 1.5]]), np.array([[2.0, 3.0]])]
    rl_steps = [np.array([[2.0, 3.0]]), np.array([[0.5, 1.0], [0.5, 1.0], [11.0, 20.0]])]
    add_shared_window_errors((sft, sft_steps), (rl, rl_steps))
    assert (sft[0]["ade_shared"], sft[0]["fde_shared"]) == (1.0, 1.5)
    assert (rl[1]["ade_shared"], rl[1]["fde_shared"]) == (0.5, 1.0)
    assert rl[0]["ade_shared"] == sft[1]["ade_shared"] == 2.0
    rows = {row["metric"]: row for row in compare_paired(sft, rl, num_resamples=200)}
    assert rows["ade"]["difference"] == pytest.approx(1.5)
    assert rows["ade_shared"]["difference"] == pytest.approx(-0.25)
    with pytest.raises(ValueError, match="same scenario seeds"):
        add_shared_window_errors((sft, sft_steps), ([{"scenario_seed": 7}, rl[1]], rl_steps))


def test_paired_only_metrics_are_left_out_where_no_episode_has_them():
    episodes = [{"scenario_seed": 0, "ade": 1.0}]
    assert "ade_shared" not in summarise(episodes)
    assert "ade_shared" not in {
        row["metric"] for row in compare_paired(episodes, episodes, num_resamples=100)
    }
    assert "fde" in summarise(episodes)  # a metric that is not paired-only stays, as NaN
