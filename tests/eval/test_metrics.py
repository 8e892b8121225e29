import math

import numpy as np
import pytest
import torch

from eval.metrics import METRICS, compare_paired, displacement_errors, paired_bootstrap_ci, summarise


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
