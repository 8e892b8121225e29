"""The value of a truncated episode's last observation, encoded once per rollout.

GAE bootstraps through a truncation (time limit) from ``V(info.final_observation)``, the value
of the finished episode's last observation, which the frozen encoder has not seen: the
observation the step returns is already the next episode's first. Encoding every world's final
observation at every step would run the encoder twice per step; encoding only the truncated
worlds' would need their number on the host at every step. Instead, each step appends the
truncated worlds' final observations to a :class:`TruncationStore` (positions from a running
count on the device, no host read), and after the rollout :meth:`TruncationStore.bootstrap`
encodes the stored rows once and writes their values into the buffer's ``next_value``.

How many rows: an environment truncates only at its time limit, ``spec.max_episode_steps``
policy steps after the episode's start, so one world truncates at most once per that many steps
and a rollout of ``T`` steps holds at most ``N * ceil(T / max_episode_steps)`` truncations (the
toy world, MetaDrive and CARLA all set ``truncated`` that way; a mix uses its shortest limit). A
rollout that ever holds more stops with an error after the rollout instead of losing values.
"""

from __future__ import annotations

import math
from itertools import groupby

import torch
from torch import Tensor

from training.envs.protocol import BatchedWaypointEnv, Observation
from training.rl.policy import PPOPolicy


def truncation_capacity(env: BatchedWaypointEnv, num_steps: int) -> int:
    """The most truncations ``num_steps`` steps of ``env``'s worlds can hold (see the module docstring)."""
    return env.num_envs * math.ceil(num_steps / env.spec.steps_between_truncations)


class TruncationStore:
    """The final observations of the episodes truncated during one rollout, and where they go.

    Row ``r < count`` holds a truncated world's last observation (``bev`` uint8 ``[C, H, W]``,
    ``state`` ``[S]``) and ``position[r] = step * N + world``, its entry in the buffer's
    ``[T, N]`` tensors. Rows fill in step order, worlds in index order within a step. The extra
    last row takes the writes of the worlds that did not truncate (a fixed-shape write per step).
    """

    def __init__(
        self,
        capacity: int,
        num_envs: int,
        bev_shape: tuple[int, int, int],
        state_dim: int,
        device: torch.device,
    ) -> None:
        self.capacity = capacity
        self.num_envs = num_envs
        self.bev = torch.zeros((capacity + 1, *bev_shape), dtype=torch.uint8, device=device)
        self.state = torch.zeros((capacity + 1, state_dim), device=device)
        self.position = torch.zeros(capacity + 1, dtype=torch.int64, device=device)
        self.count = torch.zeros((), dtype=torch.int64, device=device)  # truncations seen, even past capacity
        self._world = torch.arange(num_envs, device=device)

    @classmethod
    def for_rollout(cls, env: BatchedWaypointEnv, num_steps: int) -> TruncationStore:
        """Room for every truncation ``num_steps`` steps of ``env`` can bring."""
        spec = env.spec
        capacity = truncation_capacity(env, num_steps)
        return cls(capacity, env.num_envs, spec.bev_shape, spec.state_dim, env.device)

    def add(self, step: Tensor, truncated: Tensor, final: Observation) -> None:
        """Append the final observations of the worlds truncated at ``step`` (0-d int64 tensor).

        ``truncated`` bool ``[N]``; ``final`` the step's ``info.final_observation``. Fixed shapes,
        no host read.
        """
        slot = self.count + torch.cumsum(truncated, dim=0) - 1
        slot = torch.where(truncated & (slot < self.capacity), slot, self.capacity)
        self._copy_bev_rows(slot, final.bev)
        self.state.index_copy_(0, slot, final.state.to(self.state.dtype))
        self.position.index_copy_(0, slot, step * self.num_envs + self._world)
        self.count += truncated.sum()

    def add_world(self, step: int, world: int, final_bev: Tensor, final_state: Tensor) -> None:
        """Append one truncated world's final observation (``[C, H, W]``, ``[S]``), for worlds that
        step apart: rows then arrive in no set order, and :meth:`bootstrap` sorts them."""
        slot = min(int(self.count), self.capacity)
        self.bev[slot] = final_bev
        self.state[slot] = final_state.to(self.state.dtype)
        self.position[slot] = step * self.num_envs + world
        self.count += 1

    def _copy_bev_rows(self, slot: Tensor, bev: Tensor) -> None:
        """``self.bev[slot] = bev``, as 8-byte words where each row's bytes allow it.

        ``index_copy_`` moves a uint8 image byte by byte on the CPU (0.4 ms for 32 worlds' 64 x
        64 x 4 images, a tenth of a rollout step); the same bytes as int64 words take a seventh of
        that. The stored bytes are the same either way.
        """
        row_bytes = bev[0].numel()
        if row_bytes % 8 == 0 and bev.is_contiguous():
            words = self.bev.view(self.bev.shape[0], row_bytes).view(torch.int64)
            words.index_copy_(0, slot, bev.view(bev.shape[0], row_bytes).view(torch.int64))
        else:
            self.bev.index_copy_(0, slot, bev)

    @torch.no_grad()
    def bootstrap(self, policy: PPOPolicy, next_value: Tensor, *, by_step: bool) -> int:
        """Write ``V(final observation)`` of every stored row into ``next_value`` ``[T, N]``.

        Reads ``count`` on the host (the rollout's one host synchronisation). ``by_step``: encode
        each step's truncated worlds as one batch, the batches a per-step pass would encode, so
        the results are bit for bit those of encoding them during the rollout (a CPU
        convolution's rounding depends on the batch it runs in); otherwise all rows in one batch.
        Returns the number of truncations.

        Raises:
            RuntimeError: the rollout held more truncations than ``capacity`` (an environment that
                truncates other than at its time limit).
        """
        count = int(self.count)
        if count > self.capacity:
            raise RuntimeError(
                f"{count} episodes were truncated in one rollout, more than the {self.capacity} that "
                "N * ceil(T / max_episode_steps) allows: an environment truncates before its time limit"
            )
        if count == 0:
            return 0
        # in step order, worlds in index order (rows added by ``add`` are already; ``add_world``'s not)
        order = torch.argsort(self.position[:count], stable=True)
        position, bevs, states = (
            self.position[:count][order],
            self.bev[:count][order],
            self.state[:count][order],
        )
        sizes = [count]
        if by_step:
            steps = (position // self.num_envs).tolist()
            sizes = [len(list(group)) for _, group in groupby(steps)]
        values = []
        for bev, state in zip(bevs.split(sizes), states.split(sizes), strict=True):
            values.append(policy.value(*policy.features(bev, state)))
        next_value.view(-1).index_copy_(0, position, torch.cat(values))
        return count
