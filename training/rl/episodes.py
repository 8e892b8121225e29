"""The rollout's episode tally: what the training episodes that ended during a rollout achieved.

Sums stay on the device while the rollout runs (no host synchronisation per step); the loop reads
them once per iteration (:meth:`EpisodeTally.means`), after summing them over the processes of a
distributed run.
"""

from __future__ import annotations

import dataclasses

import torch

from training.envs.protocol import StepResult
from training.rl.distributed import DistContext

_TALLY_FIELDS = ("count", "ret", "route_completion", "collision", "off_road", "goal")


@dataclasses.dataclass
class EpisodeTally:
    """Sums over the training episodes that ended during one rollout, per environment group.

    ``sums`` is ``[len(_TALLY_FIELDS), G]`` on the device; ``group`` ``[N]`` says which group
    (environment of a mix) each world belongs to. Nothing is read on the host before
    :meth:`means`, once per iteration.
    """

    sums: torch.Tensor
    group: torch.Tensor
    names: tuple[str, ...]
    nonfinite: torch.Tensor  # non-finite reward or observation entries seen

    @classmethod
    def zeros(
        cls, device: torch.device, num_envs: int = 1, groups: dict[str, slice] | None = None
    ) -> EpisodeTally:
        group = torch.zeros(num_envs, dtype=torch.int64, device=device)
        for index, world_slice in enumerate((groups or {}).values()):
            group[world_slice] = index
        names = tuple(groups) if groups else ("",)
        sums = torch.zeros(len(_TALLY_FIELDS), len(names), device=device)
        return cls(sums, group, names, torch.zeros((), device=device))

    @classmethod
    def per_world(cls, device: torch.device, num_envs: int) -> EpisodeTally:
        """A tally with one column per world (worlds that step apart add their rows in their own
        order; :meth:`absorb` then sums the columns in world order, whatever the timing was)."""
        sums = torch.zeros(len(_TALLY_FIELDS), num_envs, device=device)
        group = torch.arange(num_envs, device=device)
        return cls(sums, group, tuple(str(i) for i in range(num_envs)), torch.zeros((), device=device))

    def absorb(self, worlds: EpisodeTally) -> None:
        """Add a :meth:`per_world` tally of this tally's worlds."""
        self.sums.index_add_(1, self.group, worlds.sums)
        self.nonfinite += worlds.nonfinite

    def add(self, result: StepResult, worlds: torch.Tensor | None = None) -> None:
        """Add the episodes that ended in ``result`` (all worlds', or the rows of ``worlds``, indices)
        and count its non-finite rewards and observed states."""
        self.nonfinite += (~torch.isfinite(result.reward)).sum() + (~torch.isfinite(result.obs.state)).sum()
        group = self.group if worlds is None else self.group[worlds]
        ep = result.info.episode
        done = ep.done.float()
        values = torch.stack(
            [
                done,
                done * ep.episode_return,
                done * ep.route_completion,
                done * ep.collision.float(),
                done * ep.off_road.float(),
                done * ep.goal_reached.float(),
            ]
        )
        self.sums.index_add_(1, group, values)

    def all_reduce(self, ctx: DistContext) -> None:
        """Sum the tallies of every process (one collective per iteration)."""
        if ctx.enabled:
            packed = torch.cat([self.sums.flatten(), self.nonfinite.reshape(1)])
            ctx.sum_(packed)
            self.sums = packed[:-1].view_as(self.sums)
            self.nonfinite = packed[-1]

    def means(self) -> dict[str, float]:
        """Read once per iteration; NaN when no episode ended. A mix adds ``<env>/<metric>`` keys."""
        sums = self.sums.cpu()
        record: dict[str, float] = {"nonfinite_inputs": int(self.nonfinite.item())}
        record |= _episode_means(sums.sum(dim=1))
        if len(self.names) > 1:
            for index, name in enumerate(self.names):
                record |= {f"{name}/{key}": value for key, value in _episode_means(sums[:, index]).items()}
        return record


def _episode_means(sums: torch.Tensor) -> dict[str, float]:
    totals = dict(zip(_TALLY_FIELDS, sums.tolist(), strict=True))
    count = int(round(totals["count"]))
    mean = (lambda key: totals[key] / count) if count else (lambda key: float("nan"))
    return {
        "episodes": count,
        "goals": int(round(totals["goal"])),
        "episode_return": mean("ret"),
        "route_completion": mean("route_completion"),
        "collision_rate": mean("collision"),
        "off_road_rate": mean("off_road"),
        "goal_rate": mean("goal"),
    }
