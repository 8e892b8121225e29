"""``MetaDriveWaypointEnv``: ``num_envs`` MetaDrive worlds behind the batched protocol.

The worlds step in parallel in their worker processes; this object only batches their numpy
answers into tensors, assigns scenario seeds (``reset(seed)`` gives world ``i`` seed ``seed + i``;
later episodes take the next unused seeds in the order the worlds finish, ties by index) and
autoresets finished worlds (a second round trip, for those worlds only).
"""

from __future__ import annotations

import weakref

import numpy as np
import torch

from training.envs.metadrive.config import MetaDriveWorldConfig
from training.envs.metadrive.frames import WorldFrame, WorldStep
from training.envs.metadrive.workers import WorldPool
from training.envs.protocol import BatchedWaypointEnv, EpisodeStats, Observation, StepInfo, StepResult
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
        self, num_envs: int, device: torch.device | str = "cpu", config: MetaDriveWorldConfig | None = None
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
        self._pool = WorldPool(num_envs, self.config)
        self._finalizer = weakref.finalize(self, self._pool.close)
        self._next_seed = 0
        self._frames: list[WorldFrame] | None = None
        self.scenario_seed = np.zeros(num_envs, dtype=np.int64)

    # ------------------------------------------------------------------ protocol
    def reset(self, seed: int | None = None) -> Observation:
        if seed is not None:
            self._next_seed = int(seed)
        seeds = [self._next_seed + i for i in range(self.num_envs)]
        self._next_seed += self.num_envs
        self._frames = self._pool.call(list(range(self.num_envs)), "reset", seeds)
        self.scenario_seed[:] = seeds
        return self._observation(self._frames)

    def step(self, waypoints: torch.Tensor) -> StepResult:
        if self._frames is None:
            raise RuntimeError("call reset() before step()")
        expected = (self.num_envs, self.spec.num_waypoints, 2)
        if tuple(waypoints.shape) != expected:
            raise ValueError(f"waypoints must have shape {expected}, got {tuple(waypoints.shape)}")
        plans = waypoints.detach().to("cpu", torch.float32).numpy()
        steps: list[WorldStep] = self._pool.call(list(range(self.num_envs)), "step", list(plans))
        final_frames = [s.frame for s in steps]
        done = [s.terminated or s.truncated for s in steps]
        episode = self._episode_stats(steps, done)
        finished = [i for i, d in enumerate(done) if d]
        seeds = [self._next_seed + order for order in range(len(finished))]
        self._next_seed += len(finished)
        frames = list(final_frames)
        for index, frame in zip(finished, self._pool.call(finished, "reset", seeds), strict=True):
            frames[index] = frame
        self.scenario_seed[finished] = seeds
        self._frames = frames
        info = StepInfo(
            expert=self.expert_waypoints(),
            final_observation=self._observation(final_frames),
            episode=episode,
            lateral_deviation_m=self._tensor([f.lateral_m for f in final_frames]),
            speed_mps=self._tensor([f.speed_mps for f in final_frames]),
            ego_pose=self.ego_pose(),
        )
        reward = self._tensor([s.reward for s in steps])
        terminated = torch.tensor([s.terminated for s in steps], device=self.device)
        truncated = torch.tensor([s.truncated for s in steps], device=self.device)
        return StepResult(self._observation(frames), reward, terminated, truncated, info)

    def expert_waypoints(self) -> torch.Tensor:
        if self._frames is None:
            raise RuntimeError("call reset() before expert_waypoints()")
        return self._tensor(np.stack([f.expert for f in self._frames]))

    def ego_pose(self) -> torch.Tensor:
        """Rear-axle pose ``[N, 3]`` (x, y in metres, yaw in rad, world frame) for drawing episodes."""
        if self._frames is None:
            raise RuntimeError("call reset() before ego_pose()")
        return self._tensor(np.stack([f.pose for f in self._frames]))

    def worker_pids(self) -> list[int]:
        """Process ids of the live workers, one per world (for monitoring and tests)."""
        return self._pool.pids()

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

    def _episode_stats(self, steps: list[WorldStep], done: list[bool]) -> EpisodeStats:
        def column(name: str, dtype: torch.dtype) -> torch.Tensor:
            values = [s.episode.get(name, 0) for s in steps]
            return torch.tensor(values, dtype=dtype, device=self.device)

        return EpisodeStats(
            done=torch.tensor(done, device=self.device),
            length=column("length", torch.int64),
            scenario_seed=torch.as_tensor(self.scenario_seed.copy(), device=self.device),
            **{name: column(name, torch.float32) for name in _FLOAT_STATS},
            **{name: column(name, torch.bool) for name in _BOOL_STATS},
        )
