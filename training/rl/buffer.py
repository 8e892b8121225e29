"""Rollout storage and generalised advantage estimation (GAE).

The buffer holds ``T`` steps of ``N`` worlds. It stores the frozen SFT features ``z`` and the
SFT plan, never images: the PPO epochs only run the small heads on them.

Filling ``next_value`` (the value the step bootstraps from), for step ``t``:

* the episode went on: ``V(obs[t + 1])``;
* the episode was truncated (time limit): ``V(info.final_observation)``, the value of the
  finished episode's last observation, so we bootstrap through the truncation;
* the episode terminated: anything finite (it is multiplied by 0).

Since ``info.final_observation`` equals the returned observation wherever no episode ended,
``V(features(info.final_observation))`` is a correct ``next_value`` for every world. The trainer
skips that second encoder pass, and the value pass too: ``V(obs[t + 1])`` is the value that step
``t + 1`` stores (:meth:`RolloutBuffer.next_values_from_values`), and after the rollout the
truncated entries are overwritten with the values of their final observations, encoded once
(``bootstrap.TruncationStore``).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import NamedTuple

import torch
from torch import Tensor


def compute_gae(
    rewards: Tensor,
    values: Tensor,
    next_values: Tensor,
    terminated: Tensor,
    episode_end: Tensor,
    gamma: float,
    gae_lambda: float,
) -> tuple[Tensor, Tensor]:
    """Generalised advantage estimation over a rollout of ``T`` steps and ``N`` worlds.

    Args:
        rewards: ``[T, N]`` reward of step ``t``.
        values: ``[T, N]`` ``V(obs[t])``.
        next_values: ``[T, N]`` value of the observation that follows step ``t`` in the same
            episode: ``V(obs[t + 1])``, or ``V(final_observation)`` where the episode was
            truncated; ignored where it terminated.
        terminated: ``[T, N]`` bool/0-1, the episode ended for good at step ``t`` (no bootstrap).
        episode_end: ``[T, N]`` bool/0-1, ``terminated | truncated``: the recursion stops here.
        gamma: discount per step; gae_lambda: GAE's lambda.

    Returns:
        ``(advantages [T, N], returns [T, N])`` with ``returns = advantages + values``.

    ::

        delta_t = r_t + gamma * (1 - terminated_t) * next_values_t - values_t
        A_t     = delta_t + gamma * lambda * (1 - episode_end_t) * A_{t+1},    A_T = 0
    """
    not_terminated = 1.0 - terminated.to(values.dtype)
    not_ended = 1.0 - episode_end.to(values.dtype)
    deltas = rewards + gamma * not_terminated * next_values - values
    advantages = torch.zeros_like(values)
    next_advantage = torch.zeros_like(values[0])
    for t in reversed(range(values.shape[0])):
        next_advantage = deltas[t] + gamma * gae_lambda * not_ended[t] * next_advantage
        advantages[t] = next_advantage
    return advantages, advantages + values


def _write_row(storage: Tensor, row: Tensor, value: Tensor) -> None:
    """``storage[row] = value`` for a 1-element index tensor ``row``, without reading it on the host."""
    storage.index_copy_(0, row, value.to(storage.dtype).unsqueeze(0))


def minibatch_bounds(size: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each minibatch of one pass over ``size`` rows, ``batch_size`` at a time.

    The last minibatch is smaller when ``batch_size`` does not divide ``size``, or one larger where
    only one row would be left for it (the loss normalises advantages per minibatch).
    """
    starts = list(range(0, size, batch_size))
    if len(starts) > 1 and size - starts[-1] < 2:
        starts.pop()  # one transition cannot normalise its advantage: it joins the minibatch before
    return list(zip(starts, [*starts[1:], size], strict=True))


class Minibatch(NamedTuple):
    """A flat minibatch of ``B`` samples drawn from the rollout."""

    z: Tensor  # [B, D]
    sft_waypoints: Tensor  # [B, K, 2] metres
    delta: Tensor  # [B, K, 2] metres, the sampled (unclipped) delta
    log_prob: Tensor  # [B] log-prob of delta under the rollout policy
    value: Tensor  # [B] V(obs) at rollout time
    advantage: Tensor  # [B]
    returns: Tensor  # [B] value targets

    def rows(self, index: Tensor) -> Minibatch:
        """The samples at ``index`` ``[M]`` of every field (a new minibatch of ``M`` samples)."""
        return Minibatch(*(tensor[index] for tensor in self))


class RolloutBuffer:
    """Preallocated storage for ``num_steps`` x ``num_envs`` transitions on ``device``.

    Use: ``add(t, ...)`` for ``t = 0 .. num_steps - 1``, then ``compute_advantages``, then
    iterate ``minibatches``. Adding step 0 again starts the next rollout.
    """

    def __init__(
        self,
        num_steps: int,
        num_envs: int,
        feature_dim: int,
        num_waypoints: int,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.num_steps = num_steps
        self.num_envs = num_envs
        self.device = torch.device(device)
        t, n, k = num_steps, num_envs, num_waypoints

        def zeros(*shape: int, kind: torch.dtype = dtype) -> Tensor:
            return torch.zeros(shape, dtype=kind, device=self.device)

        self.z = zeros(t, n, feature_dim)
        self.sft_waypoints = zeros(t, n, k, 2)
        self.delta = zeros(t, n, k, 2)
        self.log_prob = zeros(t, n)
        self.value = zeros(t, n)
        self.reward = zeros(t, n)
        self.terminated = zeros(t, n, kind=torch.bool)
        self.truncated = zeros(t, n, kind=torch.bool)
        self.next_value = zeros(t, n)
        self.advantages = zeros(t, n)
        self.returns = zeros(t, n)
        self._advantages_ready = False

    @property
    def size(self) -> int:
        """Number of transitions, ``num_steps * num_envs``."""
        return self.num_steps * self.num_envs

    def add(
        self,
        step: int | Tensor,
        *,
        z: Tensor,
        sft_waypoints: Tensor,
        delta: Tensor,
        log_prob: Tensor,
        value: Tensor,
        reward: Tensor,
        terminated: Tensor,
        truncated: Tensor,
        next_value: Tensor | None = None,
        world: int | None = None,
    ) -> None:
        """Store step ``step`` of all ``N`` worlds (shapes as the attributes without ``T``), or with
        ``world`` of that world alone (shapes without ``T`` and ``N``; worlds that step apart).

        ``step``: the row, an ``int`` or a 0-d int64 tensor on the buffer's device (a step counted
        on the device, as a rollout captured in a CUDA graph writes it: no host read).
        ``next_value`` ``[N]``: see the module docstring (``V(final_observation)`` where truncated);
        None leaves the row to :meth:`next_values_from_values`.
        """
        fields = [
            (self.z, z),
            (self.sft_waypoints, sft_waypoints),
            (self.delta, delta),
            (self.log_prob, log_prob),
            (self.value, value),
            (self.reward, reward),
            (self.terminated, terminated),
            (self.truncated, truncated),
        ]
        if next_value is not None:
            fields.append((self.next_value, next_value))
        if world is not None:
            for storage, entry in fields:
                storage[int(step), world] = entry
        else:
            row = step.view(1) if isinstance(step, Tensor) else torch.tensor([step], device=self.device)
            for storage, entry in fields:
                _write_row(storage, row, entry)
        self._advantages_ready = False

    def next_values_from_values(self, last_next_value: Tensor) -> None:
        """Fill ``next_value`` of a rollout stored in step order: ``V(obs[t + 1])`` is the value
        stored at step ``t + 1``, and ``last_next_value`` ``[N]`` is ``V`` of the observation after
        the last step. Where an episode ended, the entry is the next episode's first value: a
        terminated one ignores it, a truncated one is overwritten (module docstring)."""
        self.next_value[:-1].copy_(self.value[1:])
        self.next_value[-1].copy_(last_next_value)
        self._advantages_ready = False

    def compute_advantages(self, gamma: float, gae_lambda: float) -> None:
        """Fill ``advantages`` and ``returns`` ``[T, N]`` with :func:`compute_gae`."""
        self.advantages, self.returns = compute_gae(
            self.reward,
            self.value,
            self.next_value,
            self.terminated,
            self.terminated | self.truncated,
            gamma,
            gae_lambda,
        )
        self._advantages_ready = True

    def minibatches(self, batch_size: int, generator: torch.Generator | None = None) -> Iterator[Minibatch]:
        """One pass over all ``T * N`` transitions in a random order, ``batch_size`` at a time
        (the rows of :meth:`flat` at each of :meth:`minibatch_indices`)."""
        flat = self.flat()
        for index in self.minibatch_indices(batch_size, generator):
            yield flat.rows(index)

    def flat(self) -> Minibatch:
        """The whole rollout as one minibatch of ``T * N`` transitions (views, no copy)."""
        if not self._advantages_ready:
            raise RuntimeError("call compute_advantages() before minibatches()")
        return Minibatch(
            z=self.z.flatten(0, 1),
            sft_waypoints=self.sft_waypoints.flatten(0, 1),
            delta=self.delta.flatten(0, 1),
            log_prob=self.log_prob.flatten(),
            value=self.value.flatten(),
            advantage=self.advantages.flatten(),
            returns=self.returns.flatten(),
        )

    def minibatch_indices(
        self, batch_size: int, generator: torch.Generator | None = None
    ) -> Iterator[Tensor]:
        """The rows of :meth:`flat` in each minibatch of one pass: a random order, ``batch_size`` at a time.

        The order is a ``torch.randperm`` drawn from ``generator`` (deterministic for a seeded
        generator, which may live on the CPU or on the buffer's device). The last minibatch is
        smaller when ``batch_size`` does not divide ``T * N``, or one larger where only one
        transition would be left for it (the loss normalises advantages per minibatch).
        """
        if not self._advantages_ready:
            raise RuntimeError("call compute_advantages() before minibatches()")
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}")
        gen_device = generator.device if generator is not None else torch.device("cpu")
        order = torch.randperm(self.size, generator=generator, device=gen_device).to(self.device)
        for start, stop in minibatch_bounds(self.size, batch_size):
            yield order[start:stop]
