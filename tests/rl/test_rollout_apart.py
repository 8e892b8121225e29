"""The rollout of worlds that step apart (``--async-worlds``): what it stores does not depend on the
order the worlds come back in, each world's steps are its own (its actions drawn with the noise of
its own step), truncations are bootstrapped from their final observations, and the flag is refused
where worlds cannot step apart."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor

from tests.rl.conftest import BEV_SHAPE, NUM_WAYPOINTS, STATE_DIM, FakeSFT, policy_settings
from training.common.errors import UserError
from training.envs import protocol
from training.envs.protocol import EnvSpec, EpisodeStats, Observation, StepInfo, StepResult, WorldsStepped
from training.rl.buffer import RolloutBuffer
from training.rl.config import PPOConfig
from training.rl.policy import PPOPolicy
from training.rl.rollout_apart import collect_rollout_apart

NUM_ENVS = 3
ROLLOUT_STEPS = 10
TIME_LIMIT = 4
TERMINATION_RATE = 0.15
SEED = 40


class OneWorld:
    """A world whose every draw comes from its scenario seed and step: its episode depends on the
    plans it is sent, never on the other worlds."""

    def __init__(self, seed: int) -> None:
        self.seed, self.t, self.ret = seed, 0, 0.0
        self.generator = torch.Generator().manual_seed(seed)
        self.obs = self._draw()

    def _draw(self) -> tuple[Tensor, Tensor]:
        bev = (torch.rand((1, *BEV_SHAPE), generator=self.generator) > 0.5).to(torch.uint8) * 255
        return bev, torch.randn((1, STATE_DIM), generator=self.generator)

    def step(self, plan: Tensor) -> tuple[float, bool, bool, tuple[Tensor, Tensor], dict]:
        reward = float(-plan.norm(dim=-1).mean())
        self.t, self.ret = self.t + 1, self.ret + reward
        terminated = bool(torch.rand((), generator=self.generator) < TERMINATION_RATE)
        truncated = self.t >= TIME_LIMIT and not terminated
        final = self._draw()
        episode = {"seed": self.seed, "length": self.t, "ret": self.ret}
        self.obs = final
        return reward, terminated, truncated, final, episode


class WorldsApart(protocol.BatchedWaypointEnv):
    """``NUM_ENVS`` ``OneWorld``s behind ``send``/``recv``. ``recv`` returns a random non-empty subset
    of the worlds stepping, drawn from ``timing`` (None: all of them): the order a machine's load
    would bring them back in."""

    asynchronous = True

    def __init__(self, timing: int | None) -> None:
        self.num_envs, self.device = NUM_ENVS, torch.device("cpu")
        self.spec = EnvSpec(
            BEV_SHAPE, STATE_DIM, NUM_WAYPOINTS, 0.5, 0.5, TIME_LIMIT, ("a", "b"), ("x", "y", "z")
        )
        self.timing = None if timing is None else torch.Generator().manual_seed(timing)
        self.worlds: list[OneWorld] = []
        self.sent: dict[int, Tensor] = {}
        self.batch_sizes: list[int] = []

    def reset(self, seed: int | None = None) -> Observation:
        self.worlds = [OneWorld((seed or 0) + i) for i in range(self.num_envs)]
        return self._observation(range(self.num_envs))

    def _observation(self, worlds: Sequence[int]) -> Observation:
        return Observation(
            torch.cat([self.worlds[i].obs[0] for i in worlds]),
            torch.cat([self.worlds[i].obs[1] for i in worlds]),
        )

    def send(self, worlds: Sequence[int], waypoints: Tensor) -> None:
        assert not set(worlds) & set(self.sent)
        self.sent |= dict(zip(worlds, waypoints, strict=True))

    def recv(self) -> WorldsStepped:
        pending = sorted(self.sent)
        if self.timing is not None:
            chosen = torch.rand(len(pending), generator=self.timing) < 0.5
            chosen[torch.randint(len(pending), (), generator=self.timing)] = True
            pending = [w for w, keep in zip(pending, chosen.tolist(), strict=True) if keep]
        self.batch_sizes.append(len(pending))
        rows = []
        for world in pending:
            rows.append(self._step_world(world, self.sent.pop(world)))
        reward, terminated, truncated, finals, episodes = zip(*rows, strict=True)
        done = torch.tensor(terminated) | torch.tensor(truncated)
        zeros = torch.zeros(len(pending))
        stats = EpisodeStats(
            done=done,
            episode_return=torch.tensor([e["ret"] for e in episodes]),
            length=torch.tensor([e["length"] for e in episodes]),
            route_completion=zeros,
            collision=torch.tensor(terminated),
            off_road=torch.zeros(len(pending), dtype=torch.bool),
            goal_reached=torch.zeros(len(pending), dtype=torch.bool),
            mean_abs_lateral_m=zeros,
            mean_abs_jerk=zeros,
            mean_abs_steer_rate=zeros,
            scenario_seed=torch.tensor([e["seed"] for e in episodes]),
        )
        final = Observation(torch.cat([f[0] for f in finals]), torch.cat([f[1] for f in finals]))
        info = StepInfo(
            torch.zeros(len(pending), NUM_WAYPOINTS, 2),
            final,
            stats,
            zeros,
            zeros,
            torch.zeros(len(pending), 3),
        )
        result = StepResult(
            self._observation(pending),
            torch.tensor(reward),
            torch.tensor(terminated),
            torch.tensor(truncated),
            info,
        )
        return WorldsStepped(pending, result)

    def _step_world(self, world: int, plan: Tensor) -> tuple:
        reward, terminated, truncated, final, episode = self.worlds[world].step(plan)
        if terminated or truncated:  # the world's next scenario: its seed + N
            self.worlds[world] = OneWorld(self.worlds[world].seed + self.num_envs)
        return reward, terminated, truncated, final, episode

    def step(self, waypoints: Tensor) -> StepResult:
        raise AssertionError("a rollout of worlds that step apart never steps them together")

    def expert_waypoints(self) -> Tensor:
        return torch.zeros(self.num_envs, NUM_WAYPOINTS, 2)

    def close(self) -> None:
        pass


def _rollout(timing: int | None) -> tuple[RolloutBuffer, Observation, dict, WorldsApart, PPOPolicy]:
    torch.manual_seed(1)
    policy = PPOPolicy(FakeSFT(), policy_settings())
    env = WorldsApart(timing)
    sft = FakeSFT()
    buffer = RolloutBuffer(ROLLOUT_STEPS, NUM_ENVS, sft.feature_dim, sft.num_waypoints)
    obs = env.reset(seed=SEED)
    next_obs, tally = collect_rollout_apart(policy, env, buffer, obs, torch.Generator().manual_seed(7), 1.0)
    buffer.compute_advantages(gamma=0.9, gae_lambda=0.8)
    return buffer, next_obs, tally.means(), env, policy


BUFFER_FIELDS = ("z", "sft_waypoints", "delta", "log_prob", "value", "reward", "terminated", "truncated")
BUFFER_FIELDS += ("next_value", "advantages", "returns")


def test_the_order_worlds_come_back_in_changes_nothing() -> None:
    """Worlds returned all together, or one or two at a time in two random orders: the same buffer,
    advantages, next observation and episode tally, bit for bit."""
    reference, ref_obs, ref_tally, together, _ = _rollout(timing=None)
    assert set(together.batch_sizes) == {NUM_ENVS}
    assert bool(reference.truncated.any()) and bool(reference.terminated.any())  # both kinds of ends
    for timing in (0, 1):
        buffer, obs, tally, env, _ = _rollout(timing)
        assert min(env.batch_sizes) < NUM_ENVS, "the worlds came back apart"
        for name in BUFFER_FIELDS:
            assert torch.equal(getattr(buffer, name), getattr(reference, name)), name
        assert torch.equal(obs.bev, ref_obs.bev) and torch.equal(obs.state, ref_obs.state)
        assert tally == ref_tally


def test_each_world_plays_its_own_steps_with_its_own_noise() -> None:
    """Every world contributes exactly ``ROLLOUT_STEPS`` steps; the delta of world ``i`` at its step
    ``t`` is the mean plus std times row ``i`` of the ``t``-th noise draw of the generator."""
    buffer, _, tally, _, policy = _rollout(timing=0)
    generator = torch.Generator().manual_seed(7)
    noise = torch.stack(
        [torch.randn((NUM_ENVS, NUM_WAYPOINTS, 2), generator=generator) for _ in range(ROLLOUT_STEPS)]
    )
    with torch.no_grad():
        mean = policy.delta_head(buffer.z.flatten(0, 1), buffer.sft_waypoints.flatten(0, 1)).view_as(
            buffer.delta
        )
    torch.testing.assert_close(buffer.delta, mean + policy.std() * noise)
    assert tally["episodes"] == int((buffer.terminated | buffer.truncated).sum())


def test_truncations_bootstrap_from_their_final_observations() -> None:
    """Where a world was truncated, ``next_value`` is the critic's value of that episode's last
    observation, replayed here world by world; where it terminated, the next step's value is unused
    and where it went on, it is the value stored at the next step."""
    buffer, _, _, _, policy = _rollout(timing=1)
    for world in range(NUM_ENVS):
        replay = OneWorld(SEED + world)
        for t in range(ROLLOUT_STEPS):
            plan = policy.final_waypoints(
                buffer.sft_waypoints[t, world : world + 1], buffer.delta[t, world : world + 1]
            )
            _, terminated, truncated, final, _ = replay.step(plan)
            if truncated:
                expected = policy.value(*policy.features(*final))
                torch.testing.assert_close(buffer.next_value[t, world : world + 1], expected)
            elif not terminated and t + 1 < ROLLOUT_STEPS:
                assert buffer.next_value[t, world] == buffer.value[t + 1, world]
            if terminated or truncated:
                replay = OneWorld(replay.seed + NUM_ENVS)
    assert int(buffer.truncated.sum()) >= 2


@pytest.mark.parametrize("env", ["toy", "toy,metadrive", "carla"])
def test_async_worlds_needs_metadrive(env: str) -> None:
    with pytest.raises(UserError, match="--async-worlds needs --env metadrive"):
        PPOConfig(env=env, async_worlds=True, num_envs=2, eval_worlds=1, sft_checkpoint="x.pt").validate()
