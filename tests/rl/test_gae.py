"""GAE against numbers computed by hand: truncation bootstraps, termination does not."""

from __future__ import annotations

import pytest
import torch

from training.rl.buffer import RolloutBuffer, compute_gae, minibatch_bounds

GAMMA, LAM = 0.9, 0.5


def _example() -> dict[str, torch.Tensor]:
    """T=4 steps, N=2 worlds.

    World 0: truncated at t=1 (time limit, V(final_obs)=5.0), new episode from t=2.
    World 1: terminated at t=2 (next value 100 must be ignored), new episode at t=3.
    """
    rewards = torch.tensor([[1.0, 0.0], [2.0, 1.0], [0.0, -1.0], [1.0, 2.0]])
    values = torch.tensor([[0.5, 1.0], [1.0, 2.0], [2.0, 3.0], [1.0, 0.5]])
    next_values = torch.tensor([[1.0, 2.0], [5.0, 3.0], [1.0, 100.0], [4.0, 2.0]])
    terminated = torch.tensor([[0, 0], [0, 0], [0, 1], [0, 0]], dtype=torch.bool)
    truncated = torch.tensor([[0, 0], [1, 0], [0, 0], [0, 0]], dtype=torch.bool)
    return dict(
        rewards=rewards, values=values, next_values=next_values, terminated=terminated, truncated=truncated
    )


def _hand_computed() -> torch.Tensor:
    g, gl = GAMMA, GAMMA * LAM
    # world 0: deltas r + g * V_next - V (no termination); recursion cut after t=1 (truncation)
    d0 = [1.0 + g * 1.0 - 0.5, 2.0 + g * 5.0 - 1.0, 0.0 + g * 1.0 - 2.0, 1.0 + g * 4.0 - 1.0]
    a0_3 = d0[3]
    a0_2 = d0[2] + gl * a0_3
    a0_1 = d0[1]  # truncated: no accumulation across the boundary, but bootstrapped from 5.0
    a0_0 = d0[0] + gl * a0_1
    # world 1: termination at t=2 -> delta_2 = r - V, recursion cut after t=2
    d1 = [0.0 + g * 2.0 - 1.0, 1.0 + g * 3.0 - 2.0, -1.0 - 3.0, 2.0 + g * 2.0 - 0.5]
    a1_3 = d1[3]
    a1_2 = d1[2]
    a1_1 = d1[1] + gl * a1_2
    a1_0 = d1[0] + gl * a1_1
    return torch.tensor([[a0_0, a1_0], [a0_1, a1_1], [a0_2, a1_2], [a0_3, a1_3]])


def test_gae_matches_hand_computation_with_truncation_and_termination() -> None:
    ex = _example()
    advantages, returns = compute_gae(
        ex["rewards"],
        ex["values"],
        ex["next_values"],
        ex["terminated"],
        ex["terminated"] | ex["truncated"],
        GAMMA,
        LAM,
    )
    expected = _hand_computed()
    torch.testing.assert_close(advantages, expected)
    torch.testing.assert_close(returns, expected + ex["values"])


def test_terminated_next_value_is_ignored() -> None:
    ex = _example()
    changed = ex["next_values"].clone()
    changed[2, 1] = -1e6
    args = (ex["rewards"], ex["values"])
    ends = ex["terminated"] | ex["truncated"]
    a, _ = compute_gae(*args, ex["next_values"], ex["terminated"], ends, GAMMA, LAM)
    b, _ = compute_gae(*args, changed, ex["terminated"], ends, GAMMA, LAM)
    torch.testing.assert_close(a, b)


def test_gamma_lambda_one_gives_monte_carlo_returns() -> None:
    """With gamma = lambda = 1 and no episode end, returns are reward-to-go + final bootstrap."""
    rewards = torch.tensor([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0], [7.0, 8.0]])
    values = torch.tensor([[9.0, -1.0], [0.5, 2.0], [1.0, 1.0], [3.0, 0.0]])
    next_values = torch.cat([values[1:], torch.tensor([[10.0, 20.0]])])
    no_end = torch.zeros_like(rewards, dtype=torch.bool)
    advantages, returns = compute_gae(rewards, values, next_values, no_end, no_end, 1.0, 1.0)
    expected_returns = torch.tensor(
        [[1 + 3 + 5 + 7 + 10.0, 2 + 4 + 6 + 8 + 20.0], [3 + 5 + 7 + 10.0, 4 + 6 + 8 + 20.0],
         [5 + 7 + 10.0, 6 + 8 + 20.0], [7 + 10.0, 8 + 20.0]]
    )  # fmt: skip
    torch.testing.assert_close(returns, expected_returns)
    torch.testing.assert_close(advantages, expected_returns - values)


def test_lambda_zero_gives_one_step_td() -> None:
    ex = _example()
    ends = ex["terminated"] | ex["truncated"]
    advantages, _ = compute_gae(
        ex["rewards"], ex["values"], ex["next_values"], ex["terminated"], ends, GAMMA, 0.0
    )
    not_term = 1.0 - ex["terminated"].float()
    td = ex["rewards"] + GAMMA * not_term * ex["next_values"] - ex["values"]
    torch.testing.assert_close(advantages, td)


def test_buffer_uses_compute_gae_and_minibatches_cover_all_samples() -> None:
    ex = _example()
    t, n, d, k = 4, 2, 3, 2
    buffer = RolloutBuffer(t, n, feature_dim=d, num_waypoints=k)
    for step in range(t):
        buffer.add(
            step,
            z=torch.full((n, d), float(step)),
            sft_waypoints=torch.zeros(n, k, 2),
            delta=torch.zeros(n, k, 2),
            log_prob=torch.zeros(n),
            value=ex["values"][step],
            reward=ex["rewards"][step],
            terminated=ex["terminated"][step],
            truncated=ex["truncated"][step],
            next_value=ex["next_values"][step],
        )
    with pytest.raises(RuntimeError):
        next(buffer.minibatches(3))
    buffer.compute_advantages(GAMMA, LAM)
    torch.testing.assert_close(buffer.advantages, _hand_computed())

    batches = list(buffer.minibatches(3, torch.Generator().manual_seed(0)))
    assert [len(b.value) for b in batches] == [3, 3, 2]
    seen = torch.cat([b.advantage for b in batches]).sort().values
    torch.testing.assert_close(seen, buffer.advantages.flatten().sort().values)
    again = list(buffer.minibatches(3, torch.Generator().manual_seed(0)))
    for first, second in zip(batches, again, strict=True):
        torch.testing.assert_close(first.z, second.z)


def test_no_minibatch_holds_a_single_transition() -> None:
    """Advantages are normalised per minibatch, which one transition cannot be: 8 transitions in
    minibatches of 7 give one minibatch of 8, not 7 and 1; of 3 or 4, the usual split."""
    t, n, d, k = 4, 2, 3, 2
    buffer = RolloutBuffer(t, n, feature_dim=d, num_waypoints=k)
    for step in range(t):
        buffer.add(
            step,
            z=torch.zeros(n, d),
            sft_waypoints=torch.zeros(n, k, 2),
            delta=torch.zeros(n, k, 2),
            log_prob=torch.zeros(n),
            value=torch.zeros(n),
            reward=torch.ones(n),
            terminated=torch.zeros(n, dtype=torch.bool),
            truncated=torch.zeros(n, dtype=torch.bool),
            next_value=torch.zeros(n),
        )
    buffer.compute_advantages(GAMMA, LAM)
    sizes = {size: [len(b.value) for b in buffer.minibatches(size)] for size in (3, 4, 7, 8)}
    assert sizes == {3: [3, 3, 2], 4: [4, 4], 7: [8], 8: [8]}
    # the split the benchmark counts minibatch steps with is the buffer's
    assert {size: [stop - start for start, stop in minibatch_bounds(8, size)] for size in sizes} == sizes
