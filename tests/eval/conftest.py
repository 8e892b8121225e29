"""A tiny deterministic environment that meets the batched protocol, for closed-loop tests.

Scenario ``s`` lasts ``episode_length(s)`` steps (ends by termination), or is truncated at
``max_episode_steps``. The ego drives along its own line: at episode step ``t`` its world pose is
``(t, s, yaw(s))``. The expert's plan at step ``t`` is ``expert_plan(s, t)`` (ego frame). The
observation state is ``[s, t]`` so a test policy can compute plans with known errors.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from training.envs import protocol
from training.envs.protocol import EnvSpec, EpisodeStats, Observation, StepInfo, StepResult

NUM_WAYPOINTS = 3
MAX_EPISODE_STEPS = 6


def episode_length(seed: int) -> int:
    """Policy steps of scenario ``seed``'s episode (2..7; 7 is truncated at 6)."""
    return 2 + seed % 6


def scenario_yaw(seed: int) -> float:
    return 0.3 * (seed % 5)


def expert_plan(seed: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``[N, K, 2]``: waypoint k at (k + 1, 0.1 * seed + 0.01 * t) metres, ego frame."""
    k = torch.arange(1, NUM_WAYPOINTS + 1, dtype=torch.float32)
    x = k.expand(seed.shape[0], NUM_WAYPOINTS)
    y = (0.1 * seed.float() + 0.01 * t.float()).unsqueeze(-1).expand(-1, NUM_WAYPOINTS)
    return torch.stack((x, y), dim=-1)


class FakeWaypointEnv(protocol.BatchedWaypointEnv):
    """``num_envs`` independent toy worlds with autoreset, on the CPU."""

    def __init__(self, num_envs: int) -> None:
        self.num_envs = num_envs
        self.device = torch.device("cpu")
        self.spec = EnvSpec(
            bev_shape=(1, 4, 4),
            state_dim=2,
            num_waypoints=NUM_WAYPOINTS,
            waypoint_dt=0.5,
            policy_dt=0.5,
            max_episode_steps=MAX_EPISODE_STEPS,
            bev_channels=("road",),
            state_names=("scenario_seed", "step"),
        )
        self.seed = torch.zeros(num_envs, dtype=torch.int64)
        self.t = torch.zeros(num_envs, dtype=torch.int64)
        self.ret = torch.zeros(num_envs)
        self.next_seed = 0
        self.nan_actions_seen = 0
        self.step_calls = 0

    def _obs(self) -> Observation:
        bev = torch.zeros((self.num_envs, 1, 4, 4), dtype=torch.uint8)
        state = torch.stack((self.seed.float(), self.t.float()), dim=-1)
        return Observation(bev, state)

    def _pose(self) -> torch.Tensor:
        yaw = torch.tensor([scenario_yaw(int(s)) for s in self.seed])
        return torch.stack((self.t.float(), self.seed.float(), yaw), dim=-1)

    def reset(self, seed: int | None = None) -> Observation:
        seed = 0 if seed is None else seed
        self.seed = torch.arange(seed, seed + self.num_envs, dtype=torch.int64)
        self.t = torch.zeros(self.num_envs, dtype=torch.int64)
        self.ret = torch.zeros(self.num_envs)
        self.next_seed = seed + self.num_envs
        return self._obs()

    def expert_waypoints(self) -> torch.Tensor:
        return expert_plan(self.seed, self.t)

    def ego_pose(self) -> torch.Tensor:
        return self._pose()

    def step(self, waypoints: torch.Tensor) -> StepResult:
        assert waypoints.shape == (self.num_envs, NUM_WAYPOINTS, 2)
        self.step_calls += 1
        bad = ~torch.isfinite(waypoints).all(dim=-1).all(dim=-1)
        self.nan_actions_seen += int(bad.sum())
        final_obs = None
        self.t = self.t + 1
        reward = 1.0 + 0.1 * self.seed.float()
        self.ret = self.ret + reward
        lengths = torch.tensor([episode_length(int(s)) for s in self.seed])
        terminated = self.t >= lengths
        truncated = ~terminated & (self.t >= MAX_EPISODE_STEPS)
        done = terminated | truncated
        final_obs = self._obs()
        episode = EpisodeStats(
            done=done.clone(),
            episode_return=self.ret.clone(),
            length=self.t.clone(),
            route_completion=(self.t.float() / lengths.float()).clamp(max=1.0),
            collision=(self.seed % 3 == 0) & done,
            off_road=(self.seed % 4 == 1) & done,
            goal_reached=terminated.clone(),
            mean_abs_lateral_m=0.01 * self.seed.float(),
            mean_abs_jerk=0.02 * self.seed.float(),
            mean_abs_steer_rate=0.03 * self.seed.float(),
            scenario_seed=self.seed.clone(),
        )
        for i in torch.nonzero(done).flatten().tolist():
            self.seed[i] = self.next_seed
            self.next_seed += 1
            self.t[i] = 0
            self.ret[i] = 0.0
        obs = self._obs()
        final_obs = Observation(
            torch.where(done[:, None, None, None], final_obs.bev, obs.bev),
            torch.where(done[:, None], final_obs.state, obs.state),
        )
        info = StepInfo(
            expert=self.expert_waypoints(),
            final_observation=final_obs,
            episode=episode,
            lateral_deviation_m=torch.zeros(self.num_envs),
            speed_mps=torch.ones(self.num_envs),
            ego_pose=self._pose(),
        )
        return StepResult(obs, reward, terminated, truncated, info)

    def close(self) -> None:
        pass


def offset_policy(obs: Observation) -> torch.Tensor:
    """The expert's plan shifted sideways by 1 + t metres: ADE = FDE = 1 + t at episode step t."""
    seed, t = obs.state[:, 0].long(), obs.state[:, 1]
    plan = expert_plan(seed, t.long()).clone()
    plan[..., 1] += (1.0 + t).unsqueeze(-1)
    return plan


@pytest.fixture(scope="session")
def fake() -> SimpleNamespace:
    """The fake environment and its known quantities (tests use fixtures, not imports of conftest)."""
    return SimpleNamespace(
        Env=FakeWaypointEnv,
        expert_plan=expert_plan,
        episode_length=episode_length,
        scenario_yaw=scenario_yaw,
        offset_policy=offset_policy,
        max_episode_steps=MAX_EPISODE_STEPS,
        num_waypoints=NUM_WAYPOINTS,
    )
