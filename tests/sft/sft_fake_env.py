"""A tiny deterministic environment that meets the batched protocol, for the SFT data pipeline tests.

Scenario ``s`` lasts ``3 + s % 4`` steps. Its BEV has a 0/255 vertical line at column
``8 * (s % 8)``, its state starts with the speed ``5 + s % 3`` m/s, and the expert's plan is a
straight line whose lateral slope follows the BEV line, so a model can learn it.
"""

from __future__ import annotations

import torch

from training.envs import protocol
from training.envs.protocol import EnvSpec, EpisodeStats, Observation, StepInfo, StepResult

SPEC = EnvSpec(
    bev_shape=(4, 16, 16),
    state_dim=4,
    num_waypoints=4,
    waypoint_dt=0.5,
    policy_dt=0.5,
    max_episode_steps=10,
    bev_channels=("drivable", "route", "vehicles", "obstacles"),
    state_names=("speed_mps", "steer_rad", "accel_mps2", "yaw_rate_radps"),
)


class FakeWaypointEnv(protocol.BatchedWaypointEnv):
    def __init__(self, num_envs: int, device: str | torch.device = "cpu") -> None:
        self.num_envs = num_envs
        self.device = torch.device(device)
        self.spec = SPEC
        self.seeds = torch.zeros(num_envs, dtype=torch.int64)
        self.t = torch.zeros(num_envs, dtype=torch.int64)
        self.next_seed = 0
        self.closed = False

    def _length(self) -> torch.Tensor:
        return 3 + self.seeds % 4

    def _obs(self) -> Observation:
        n = self.num_envs
        bev = torch.zeros(n, *SPEC.bev_shape, dtype=torch.uint8)
        bev[:, 0] = 255
        cols = (self.seeds % 8) * 2
        bev[torch.arange(n), 1, :, cols] = 255
        state = torch.zeros(n, SPEC.state_dim)
        state[:, 0] = 5.0 + (self.seeds % 3).float()
        state[:, 1] = 0.01 * self.t.float()
        return Observation(bev, state)

    def expert_waypoints(self) -> torch.Tensor:
        k = torch.arange(1, SPEC.num_waypoints + 1, dtype=torch.float32)
        speed = 5.0 + (self.seeds % 3).float()
        slope = ((self.seeds % 8).float() - 3.5) / 3.5
        x = speed[:, None] * SPEC.waypoint_dt * k
        y = slope[:, None] * k
        return torch.stack([x, y], dim=-1)

    def reset(self, seed: int | None = None) -> Observation:
        seed = 0 if seed is None else seed
        self.seeds = seed + torch.arange(self.num_envs, dtype=torch.int64)
        self.t.zero_()
        self.next_seed = seed + self.num_envs
        return self._obs()

    def step(self, waypoints: torch.Tensor) -> StepResult:
        assert waypoints.shape == (self.num_envs, SPEC.num_waypoints, 2)
        self.t += 1
        done = self.t >= self._length()
        final = self._obs()
        episode = EpisodeStats(
            done=done.clone(),
            episode_return=self.t.float(),
            length=self.t.clone(),
            route_completion=torch.where(done, 1.0, 0.0),
            collision=torch.zeros_like(done),
            off_road=torch.zeros_like(done),
            goal_reached=done.clone(),
            mean_abs_lateral_m=torch.zeros(self.num_envs),
            mean_abs_jerk=torch.zeros(self.num_envs),
            mean_abs_steer_rate=torch.zeros(self.num_envs),
            scenario_seed=self.seeds.clone(),
        )
        for i in torch.nonzero(done).flatten().tolist():
            self.seeds[i] = self.next_seed
            self.next_seed += 1
            self.t[i] = 0
        obs = self._obs()
        info = StepInfo(
            expert=self.expert_waypoints(),
            final_observation=final,
            episode=episode,
            lateral_deviation_m=torch.zeros(self.num_envs),
            speed_mps=obs.state[:, 0].clone(),
            ego_pose=torch.zeros(self.num_envs, 3),
        )
        reward = torch.ones(self.num_envs)
        return StepResult(obs, reward, done.clone(), torch.zeros_like(done), info)

    def close(self) -> None:
        self.closed = True
