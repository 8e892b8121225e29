"""PPO really learns: on a small fixed task the real trainer pieces fix an imperfect SFT plan.

The task needs no rendering, so it runs in seconds. Each world has a random lateral target
``y*`` per episode, encoded in the ego state; the best plan puts every waypoint ``k`` at
``(k, y*)``. The reward of a step is minus the mean distance between the plan and that target
plan. The fake SFT model recovers ``y*`` from its features but plans ``SFT_ERROR_M`` metres to
the left of it, so SFT earns ``-SFT_ERROR_M`` per step and the residual must learn to shift the
plan right. A negative control (learning rate 0) runs the same loop and must not improve: the
improvement comes from the update, not from the evaluation or the seeds.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from tests.rl.conftest import policy_settings
from training.envs import protocol
from training.envs.protocol import EnvSpec, EpisodeStats, Observation, StepInfo, StepResult
from training.rl.buffer import RolloutBuffer
from training.rl.policy import PPOPolicy
from training.rl.trainer import collect_rollout, ppo_update

NUM_WAYPOINTS = 4
EPISODE_STEPS = 8
STATE_DIM = 2  # (target lateral offset y* in metres, episode progress t / EPISODE_STEPS)
FEATURE_DIM = 6
SFT_ERROR_M = 0.5  # the SFT plan is this far left of the target plan, on every waypoint
TARGET_RANGE_M = 2.0  # y* ~ Uniform(-TARGET_RANGE_M, TARGET_RANGE_M)

NUM_ENVS = 16
ROLLOUT_STEPS = 16
ITERATIONS = 20
EVAL_WORLDS = 64


def target_plan(state: Tensor) -> Tensor:
    """``[N, K, 2]``: waypoint ``k`` (1-based) at ``(k, y*)`` metres, ``y* = state[:, 0]``."""
    x = torch.arange(1, NUM_WAYPOINTS + 1, dtype=state.dtype).expand(state.shape[0], NUM_WAYPOINTS)
    y = state[:, :1].expand(-1, NUM_WAYPOINTS)
    return torch.stack((x, y), dim=-1)


class TargetEnv(protocol.BatchedWaypointEnv):
    """``num_envs`` worlds of the fixed task: 8-step episodes, truncated by the time limit, autoreset."""

    def __init__(self, num_envs: int) -> None:
        self.num_envs = num_envs
        self.device = torch.device("cpu")
        self.spec = EnvSpec(
            bev_shape=(1, 4, 4),
            state_dim=STATE_DIM,
            num_waypoints=NUM_WAYPOINTS,
            waypoint_dt=0.5,
            policy_dt=0.5,
            max_episode_steps=EPISODE_STEPS,
            bev_channels=("nothing",),
            state_names=("target_lateral_m", "progress"),
        )
        self.generator = torch.Generator().manual_seed(0)
        self.target = torch.zeros(num_envs)
        self.t = torch.zeros(num_envs, dtype=torch.int64)
        self.ret = torch.zeros(num_envs)

    def _draw_targets(self, count: int) -> Tensor:
        return (torch.rand(count, generator=self.generator) * 2.0 - 1.0) * TARGET_RANGE_M

    def _obs(self) -> Observation:
        bev = torch.zeros((self.num_envs, 1, 4, 4), dtype=torch.uint8)
        state = torch.stack((self.target, self.t.float() / EPISODE_STEPS), dim=-1)
        return Observation(bev, state)

    def reset(self, seed: int | None = None) -> Observation:
        self.generator.manual_seed(0 if seed is None else seed)
        self.target = self._draw_targets(self.num_envs)
        self.t.zero_()
        self.ret.zero_()
        return self._obs()

    def expert_waypoints(self) -> Tensor:
        return target_plan(self._obs().state)

    def step(self, waypoints: Tensor) -> StepResult:
        assert waypoints.shape == (self.num_envs, NUM_WAYPOINTS, 2)
        before = self._obs()
        reward = -(waypoints - target_plan(before.state)).norm(dim=-1).mean(dim=-1)
        self.ret += reward
        self.t += 1
        truncated = self.t >= EPISODE_STEPS
        terminated = torch.zeros_like(truncated)
        final = self._obs()
        false = torch.zeros_like(truncated)
        episode = EpisodeStats(
            done=truncated.clone(),
            episode_return=self.ret.clone(),
            length=self.t.clone(),
            route_completion=self.t.float() / EPISODE_STEPS,
            collision=false,
            off_road=false,
            goal_reached=false,
            mean_abs_lateral_m=torch.zeros(self.num_envs),
            mean_abs_jerk=torch.zeros(self.num_envs),
            mean_abs_steer_rate=torch.zeros(self.num_envs),
            scenario_seed=torch.zeros(self.num_envs, dtype=torch.int64),
        )
        # autoreset: finished worlds start a new episode with a new target
        self.target = torch.where(truncated, self._draw_targets(self.num_envs), self.target)
        self.t = torch.where(truncated, torch.zeros_like(self.t), self.t)
        self.ret = torch.where(truncated, torch.zeros_like(self.ret), self.ret)
        obs = self._obs()
        info = StepInfo(
            expert=target_plan(obs.state),
            final_observation=Observation(final.bev, torch.where(truncated[:, None], final.state, obs.state)),
            episode=episode,
            lateral_deviation_m=torch.zeros(self.num_envs),
            speed_mps=torch.ones(self.num_envs),
            ego_pose=torch.zeros(self.num_envs, 3),
        )
        return StepResult(obs, reward, terminated, truncated, info)

    def close(self) -> None:
        pass


class OffsetSFT(nn.Module):
    """``encode``: a fixed random linear map of the state; ``head``: the target plan + ``SFT_ERROR_M``."""

    def __init__(self) -> None:
        super().__init__()
        generator = torch.Generator().manual_seed(123)
        self.feature_dim = FEATURE_DIM
        self.num_waypoints = NUM_WAYPOINTS
        weight = torch.randn((FEATURE_DIM, STATE_DIM), generator=generator)
        self.register_buffer("weight", weight)
        self.register_buffer("weight_pinv", torch.linalg.pinv(weight))

    @torch.no_grad()
    def encode(self, bev: Tensor, state: Tensor) -> Tensor:
        return state @ self.weight.T

    @torch.no_grad()
    def head(self, z: Tensor) -> Tensor:
        state = z @ self.weight_pinv.T
        plan = target_plan(state)
        plan[..., 1] += SFT_ERROR_M
        return plan

    def frozen_features(self, bev: Tensor, state: Tensor) -> tuple[Tensor, Tensor]:
        z = self.encode(bev, state)
        return z, self.head(z)


def deterministic_return(policy: PPOPolicy) -> float:
    """Mean return of one episode per world with the policy's mean plan, on fixed targets."""
    env = TargetEnv(EVAL_WORLDS)
    obs = env.reset(seed=10_000)
    total = torch.zeros(EVAL_WORLDS)
    for _ in range(EPISODE_STEPS):
        result = env.step(policy.deterministic_waypoints(obs.bev, obs.state))
        total += result.reward
        obs = result.obs
    assert bool(result.truncated.all())
    return float(total.mean())


def train(lr: float) -> dict[str, list[float]]:
    """The trainer's loop (rollout, GAE, PPO update) on the fixed task; returns per-iteration returns."""
    torch.manual_seed(0)
    policy = PPOPolicy(OffsetSFT(), policy_settings(init_log_std=-1.0))
    optimizer = torch.optim.Adam(policy.trainable_parameters(), lr=lr, eps=1e-5)
    env = TargetEnv(NUM_ENVS)
    buffer = RolloutBuffer(ROLLOUT_STEPS, NUM_ENVS, FEATURE_DIM, NUM_WAYPOINTS)
    sample_gen = torch.Generator().manual_seed(1)
    batch_gen = torch.Generator().manual_seed(2)
    obs = env.reset(seed=0)
    history: dict[str, list[float]] = {"deterministic": [deterministic_return(policy)], "rollout": []}
    for _ in range(ITERATIONS):
        obs, tally = collect_rollout(policy, env, buffer, obs, sample_gen, reward_scale=1.0)
        history["rollout"].append(tally.means()["episode_return"])
        buffer.compute_advantages(gamma=0.9, gae_lambda=0.95)
        ppo_update(
            policy,
            optimizer,
            buffer,
            update_epochs=4,
            minibatch_size=64,
            clip_epsilon=0.2,
            value_coef=0.5,
            entropy_coef=0.0,
            max_grad_norm=0.5,
            target_kl=None,
            generator=batch_gen,
        )
        history["deterministic"].append(deterministic_return(policy))
    return history


def test_fake_sft_is_off_by_the_constant() -> None:
    """The task is what the learning test assumes: SFT earns exactly -SFT_ERROR_M per step."""
    torch.manual_seed(0)
    policy = PPOPolicy(OffsetSFT(), policy_settings(hidden_size=8))
    sft_return = deterministic_return(policy)
    assert abs(sft_return - (-SFT_ERROR_M * EPISODE_STEPS)) < 1e-4
    env = TargetEnv(3)
    obs = env.reset(seed=5)
    perfect = env.step(target_plan(obs.state))
    assert torch.allclose(perfect.reward, torch.zeros(3), atol=1e-6)


def test_ppo_improves_the_return_and_lr_zero_does_not() -> None:
    sft_return = -SFT_ERROR_M * EPISODE_STEPS  # -4.0
    margin = 0.6 * SFT_ERROR_M * EPISODE_STEPS  # fix at least 60% of the SFT error

    learned = train(lr=3e-3)
    assert abs(learned["deterministic"][0] - sft_return) < 1e-4  # iteration 0 drives like SFT
    best_late = max(learned["deterministic"][-3:])
    assert learned["deterministic"][-1] > sft_return + margin, learned["deterministic"]
    assert best_late > sft_return + margin
    # the stochastic training episodes improve too (first rollouts vs last rollouts)
    early = sum(learned["rollout"][:3]) / 3
    late = sum(learned["rollout"][-3:]) / 3
    assert late > early + 0.5 * margin, learned["rollout"]

    frozen = train(lr=0.0)
    assert max(frozen["deterministic"]) < sft_return + 1e-4, frozen["deterministic"]
    late_frozen = sum(frozen["rollout"][-3:]) / 3
    early_frozen = sum(frozen["rollout"][:3]) / 3
    assert late_frozen < early_frozen + 0.5 * margin, frozen["rollout"]
