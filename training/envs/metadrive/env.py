"""``MetaDriveWaypointEnv``: ``num_envs`` MetaDrive worlds behind the batched protocol.

The worlds step in parallel in their worker processes; this object only batches their numpy
answers into tensors, assigns scenario seeds (``reset(seed)`` gives world ``i`` seed ``seed + i``;
later episodes take the next unused seeds in the order the worlds finish, ties by index) and
autoresets finished worlds.

A MetaDrive reset builds a map and its traffic: about 0.3 s, ten policy steps. The worlds step in
lockstep, so while one world resets every other one waits (measured: 10% of the wall time with one
world, 14% with two). So one more worker, the *spare*, resets the next scenario (the next unused
seed) while the worlds step; the first world to finish takes the spare's ready scenario and its own
worker becomes the spare. Scenarios do not depend on which worker plays them (the adapter destroys
every object between episodes, see ``config.py``), so the batches are the same with or without it;
worlds finishing in the same step beyond the first reset in place, as without a spare.

With ``asynchronous=True`` the worlds step apart instead (``send`` / ``recv``, see the protocol):
a world whose plan arrives steps at once, and ``recv`` hands back whichever worlds are done, so
none waits for a slower one. Seeds then follow each world, not the order they finish in (which
would depend on timing): world ``i`` plays ``seed + i``, then ``seed + i + N``, ``seed + i + 2N``
and so on, and resets in its own worker in the same round trip as its last step (no spare).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from training.envs.metadrive.config import MetaDriveWorldConfig
from training.envs.metadrive.frames import WorldFrame, WorldStep
from training.envs.metadrive.workers import WorldPool
from training.envs.protocol import (
    BatchedWaypointEnv,
    EpisodeStats,
    Observation,
    StepInfo,
    StepResult,
    WorldsStepped,
)
from training.envs.toy.config import shared_layout_spec

_FLOAT_STATS = (
    "episode_return",
    "route_completion",
    "mean_abs_lateral_m",
    "mean_abs_jerk",
    "mean_abs_steer_rate",
)
_BOOL_STATS = ("collision", "off_road", "goal_reached")


class MetaDriveWaypointEnv(BatchedWaypointEnv):
    """Meets ``BatchedWaypointEnv`` (see ``training/envs/protocol.py``); no ``state_dict``:
    a resumed run re-seeds its worlds on fresh scenarios."""

    def __init__(
        self,
        num_envs: int,
        device: torch.device | str = "cpu",
        config: MetaDriveWorldConfig | None = None,
        spare_world: bool = True,
        asynchronous: bool = False,
    ) -> None:
        self.config = config or MetaDriveWorldConfig()
        self.config.validate()
        geometry = self.config.geometry
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.spec = shared_layout_spec(
            geometry.bev_size_px,
            geometry.num_waypoints,
            geometry.waypoint_dt,
            geometry.policy_dt,
            self.config.max_episode_steps,
        )
        self.asynchronous = asynchronous
        spare_world = spare_world and not asynchronous
        self._pool = WorldPool(num_envs + int(spare_world), self.config)
        self._finalizer = weakref.finalize(self, self._pool.close)
        self._worker_of = list(range(num_envs))  # world -> the worker process that plays it
        self._spare: int | None = num_envs if spare_world else None  # worker preparing the next scenario
        self._spare_seed: int | None = None  # the seed it is resetting to (its answer not collected yet)
        self._next_seed = 0
        self._frames: list[WorldFrame] | None = None
        self.scenario_seed = np.zeros(num_envs, dtype=np.int64)
        self._collision_reports: dict[int, dict[str, Any]] = {}
        self._in_flight: set[int] = set()  # worlds stepping (asynchronous)

    # ------------------------------------------------------------------ protocol
    def reset(self, seed: int | None = None) -> Observation:
        if self._in_flight:
            raise RuntimeError(f"worlds {sorted(self._in_flight)} are still stepping: recv() them first")
        if seed is not None:
            self._next_seed = int(seed)
        seeds = [self._next_seed + i for i in range(self.num_envs)]
        self._next_seed += self.num_envs
        if self._spare_seed is not None:  # prepared for a seed sequence that no longer holds
            self._pool.collect(self._spare)
            self._spare_seed = None
        self._prepare_spare()
        self._frames = self._pool.call(self._worker_of, "reset", seeds)
        self.scenario_seed[:] = seeds
        return self._observation(self._frames)

    def step(self, waypoints: torch.Tensor) -> StepResult:
        if self._frames is None:
            raise RuntimeError("call reset() before step()")
        expected = (self.num_envs, self.spec.num_waypoints, 2)
        if tuple(waypoints.shape) != expected:
            raise ValueError(f"waypoints must have shape {expected}, got {tuple(waypoints.shape)}")
        worlds = list(range(self.num_envs))
        if self.asynchronous:
            self.send(worlds, waypoints)
            answers = [self._pool.collect(self._worker_of[i]) for i in worlds]
            self._in_flight.clear()
            return self._stepped(worlds, answers)
        plans = waypoints.detach().to("cpu", torch.float32).numpy()
        steps: list[WorldStep] = self._pool.call(self._worker_of, "step", list(plans))
        played = self.scenario_seed.copy()
        finished = [i for i, s in enumerate(steps) if s.terminated or s.truncated]
        seeds = [self._next_seed + order for order in range(len(finished))]
        self._next_seed += len(finished)
        frames = [s.frame for s in steps]
        for index, frame in zip(finished, self._reset_finished(finished, seeds), strict=True):
            frames[index] = frame
        self.scenario_seed[finished] = seeds
        self._frames = frames
        return self._result(steps, frames, played)

    # ------------------------------------------------------------------ worlds stepping apart
    def send(self, worlds: Sequence[int], waypoints: torch.Tensor) -> None:
        """Start stepping ``worlds`` (distinct, none already stepping) with their plans ``waypoints``
        ``[len(worlds), K, 2]``; returns at once (``asynchronous`` only)."""
        if not self.asynchronous:
            raise RuntimeError("send() needs MetaDriveWaypointEnv(asynchronous=True)")
        if self._frames is None:
            raise RuntimeError("call reset() before send()")
        expected = (len(worlds), self.spec.num_waypoints, 2)
        if tuple(waypoints.shape) != expected:
            raise ValueError(f"waypoints must have shape {expected}, got {tuple(waypoints.shape)}")
        busy = self._in_flight.intersection(worlds)
        if busy or len(set(worlds)) != len(worlds):
            raise RuntimeError(f"worlds sent twice before recv(): {sorted(busy) or list(worlds)}")
        plans = waypoints.detach().to("cpu", torch.float32).numpy()
        for world, plan in zip(worlds, plans, strict=True):
            next_seed = int(self.scenario_seed[world]) + self.num_envs  # if this step ends the episode
            self._pool.start(self._worker_of[world], "step_then_reset", (plan, next_seed))
            self._in_flight.add(world)

    def recv(self) -> WorldsStepped:
        """Wait until at least one world sent has stepped; return every world done by then (in index
        order) with its rows of a ``StepResult`` (autoreset as in ``step``)."""
        if not self._in_flight:
            raise RuntimeError("recv() with no world stepping: send() first")
        by_worker = {self._worker_of[w]: w for w in self._in_flight}
        worlds = sorted(by_worker[worker] for worker in self._pool.ready(sorted(by_worker)))
        self._in_flight.difference_update(worlds)
        answers = [self._pool.collect(self._worker_of[w]) for w in worlds]
        return WorldsStepped(worlds, self._stepped(worlds, answers))

    def _stepped(self, worlds: list[int], answers: list[tuple[WorldStep, WorldFrame | None]]) -> StepResult:
        """Record the answers of ``step_then_reset`` and return those worlds' rows of a ``StepResult``."""
        assert self._frames is not None
        played = self.scenario_seed[worlds].copy()
        steps, frames = [step for step, _ in answers], []
        for world, (step, first_frame) in zip(worlds, answers, strict=True):
            if first_frame is not None:  # the episode ended and the world reset to its next seed
                self.scenario_seed[world] += self.num_envs
            self._frames[world] = step.frame if first_frame is None else first_frame
            frames.append(self._frames[world])
        return self._result(steps, frames, played)

    def _result(self, steps: list[WorldStep], frames: list[WorldFrame], played: np.ndarray) -> StepResult:
        """The ``StepResult`` rows of worlds that stepped (``steps``), ``frames`` their observations now
        (a new episode's first where one ended) and ``played`` the scenario seeds of those steps."""
        final_frames = [s.frame for s in steps]
        done = [s.terminated or s.truncated for s in steps]
        for step, seed in zip(steps, played, strict=True):
            if step.episode.get("collision_report") is not None:
                self._collision_reports[int(seed)] = step.episode["collision_report"]
        info = StepInfo(
            expert=self._tensor(np.stack([f.expert for f in frames])),
            final_observation=self._observation(final_frames),
            episode=self._episode_stats(steps, done, played),
            lateral_deviation_m=self._tensor([f.lateral_m for f in final_frames]),
            speed_mps=self._tensor([f.speed_mps for f in final_frames]),
            ego_pose=self._tensor(np.stack([f.pose for f in frames])),
        )
        reward = self._tensor([s.reward for s in steps])
        terminated = torch.tensor([s.terminated for s in steps], device=self.device)
        truncated = torch.tensor([s.truncated for s in steps], device=self.device)
        return StepResult(self._observation(frames), reward, terminated, truncated, info)

    def _prepare_spare(self) -> None:
        """Start the spare's reset to the next unused seed (no wait)."""
        if self._spare is not None:
            self._spare_seed = self._next_seed
            self._pool.start(self._spare, "reset", self._spare_seed)

    def _reset_finished(self, finished: list[int], seeds: list[int]) -> list[WorldFrame]:
        """First frames of the finished worlds' next scenarios ``seeds``: the first world takes the
        spare's, which ``_next_seed`` (already past ``seeds``) then prepares anew."""
        if not finished:
            return []
        if self._spare is None:
            return self._pool.call([self._worker_of[i] for i in finished], "reset", seeds)
        if self._spare_seed != seeds[0]:
            raise RuntimeError(f"spare world prepared seed {self._spare_seed}, next is {seeds[0]}")
        first, rest = finished[0], finished[1:]
        ready = self._pool.collect(self._spare)
        self._worker_of[first], self._spare = self._spare, self._worker_of[first]
        self._prepare_spare()
        return [ready, *self._pool.call([self._worker_of[i] for i in rest], "reset", seeds[1:])]

    def expert_waypoints(self) -> torch.Tensor:
        if self._frames is None:
            raise RuntimeError("call reset() before expert_waypoints()")
        return self._tensor(np.stack([f.expert for f in self._frames]))

    def ego_pose(self) -> torch.Tensor:
        """Rear-axle pose ``[N, 3]`` (x, y in metres, yaw in rad, world frame) for drawing episodes."""
        if self._frames is None:
            raise RuntimeError("call reset() before ego_pose()")
        return self._tensor(np.stack([f.pose for f in self._frames]))

    def collision_reports(self) -> dict[int, dict[str, Any]]:
        """What each collision was with and who was moving into whom (``collisions.py``), by scenario
        seed, for the episodes finished so far."""
        return dict(self._collision_reports)

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers: the worlds' in world order, then the spare's (monitoring,
        tests)."""
        spare = [] if self._spare is None else [self._spare]
        return self._pool.pids([*self._worker_of, *spare])

    def close(self) -> None:
        """Stop the worker processes (idempotent)."""
        self._finalizer()

    def __enter__(self) -> MetaDriveWaypointEnv:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ batching
    def _tensor(self, values: object) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, dtype=np.float32), device=self.device)

    def _observation(self, frames: list[WorldFrame]) -> Observation:
        bev = torch.from_numpy(np.stack([f.bev for f in frames])).to(self.device)
        return Observation(bev=bev, state=self._tensor(np.stack([f.state for f in frames])))

    def _episode_stats(self, steps: list[WorldStep], done: list[bool], played: np.ndarray) -> EpisodeStats:
        def column(name: str, dtype: torch.dtype) -> torch.Tensor:
            values = [s.episode.get(name, 0) for s in steps]
            return torch.tensor(values, dtype=dtype, device=self.device)

        return EpisodeStats(
            done=torch.tensor(done, device=self.device),
            length=column("length", torch.int64),
            scenario_seed=torch.as_tensor(played, device=self.device),
            **{name: column(name, torch.float32) for name in _FLOAT_STATS},
            **{name: column(name, torch.bool) for name in _BOOL_STATS},
        )
