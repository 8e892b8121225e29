"""The rollout's device path: no host synchronisation per step, and results as before.

A GPU cannot be tested here, so these tests check on the CPU what the CUDA path relies on:

* the rollout runs one code path on every device, and no tensor is read back to the host before
  the rollout's last world step (a ``TorchFunctionMode`` that records every operation that would
  synchronise a CUDA stream), and the per-step functions hold no such call nor a device branch
  (their source);
* the truncated episodes' bootstrap values, encoded once after the rollout, equal those of
  encoding each truncated world's final observation directly, and GAE gives the same advantages;
* the rollout written on static tensors (the structure a CUDA graph captures, run eagerly here)
  fills the buffer exactly as the former per-step loop did;
* ``--cuda-graph``: the world state the capture copies from replay to replay is found whole and
  refused when a replay could not carry it; the flag is a one-line error off CUDA or the toy world.

The capture itself is untested without a GPU: the one test that runs it is skipped here.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import re
import textwrap
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor
from torch.overrides import TorchFunctionMode

from benchmarks import throughput
from tests.cli_helpers import assert_one_line_error, run_cli
from tests.rl.conftest import BEV_SHAPE, NUM_WAYPOINTS, STATE_DIM, FakeSFT, policy_settings
from training.common.errors import UserError
from training.envs import protocol
from training.envs.mixed import MixedEnv
from training.envs.protocol import EnvSpec, EpisodeStats, Observation, StepInfo, StepResult
from training.envs.toy import ToyWaypointEnv, ToyWorldConfig
from training.rl import config as config_module
from training.rl import train_ppo_delta_waypoint
from training.rl.bootstrap import TruncationStore, truncation_capacity
from training.rl.buffer import RolloutBuffer, compute_gae
from training.rl.config import PPOConfig
from training.rl.cuda_graph import GraphCaptureError, StepGraph, state_feedback, world_tensors
from training.rl.episodes import EpisodeTally
from training.rl.policy import PPOPolicy
from training.rl.trainer import collect_rollout
from training.sft.model import SFTModelConfig, WaypointModel

NUM_ENVS = 6
ROLLOUT_STEPS = 12
TIME_LIMIT = 3  # policy steps before a truncation
TERMINATION_RATE = 0.2  # chance per step that a world's episode terminates


class SyncFreeWorlds(protocol.BatchedWaypointEnv):
    """Worlds with random observations, time-limit truncations and random terminations, whose
    ``step`` never reads a tensor back to the host (what a CUDA world must offer)."""

    def __init__(self, num_envs: int = NUM_ENVS, time_limit: int = TIME_LIMIT) -> None:
        self.num_envs = num_envs
        self.device = torch.device("cpu")
        self.spec = EnvSpec(
            bev_shape=BEV_SHAPE,
            state_dim=STATE_DIM,
            num_waypoints=NUM_WAYPOINTS,
            waypoint_dt=0.5,
            policy_dt=0.5,
            max_episode_steps=time_limit,
            bev_channels=("a", "b"),
            state_names=("x", "y", "z"),
        )
        self.time_limit = time_limit
        self.generator = torch.Generator().manual_seed(0)
        self.t = torch.zeros(num_envs, dtype=torch.int64)
        self.ret = torch.zeros(num_envs)
        self.obs = self._draw()
        self.steps_taken = 0

    def _draw(self) -> Observation:
        bev = (torch.rand((self.num_envs, *BEV_SHAPE), generator=self.generator) > 0.5).to(torch.uint8) * 255
        return Observation(bev, torch.randn((self.num_envs, STATE_DIM), generator=self.generator))

    def reset(self, seed: int | None = None) -> Observation:
        self.generator.manual_seed(0 if seed is None else seed)
        self.t.zero_()
        self.ret.zero_()
        self.obs = self._draw()
        return self.obs

    def expert_waypoints(self) -> Tensor:
        return torch.zeros(self.num_envs, NUM_WAYPOINTS, 2)

    def step(self, waypoints: Tensor) -> StepResult:
        reward = -waypoints.norm(dim=-1).mean(dim=-1)
        self.t += 1
        self.ret += reward
        terminated = torch.rand(self.num_envs, generator=self.generator) < TERMINATION_RATE
        truncated = (self.t >= self.time_limit) & ~terminated
        done = terminated | truncated
        final = self._draw()  # the finished episode's last observation (and, where not done, the next)
        fresh = self._draw()  # the next episode's first observation
        obs = Observation(
            torch.where(done[:, None, None, None], fresh.bev, final.bev),
            torch.where(done[:, None], fresh.state, final.state),
        )
        false = torch.zeros_like(done)
        episode = EpisodeStats(
            done=done,
            episode_return=self.ret.clone(),
            length=self.t.clone(),
            route_completion=torch.zeros(self.num_envs),
            collision=terminated,
            off_road=false,
            goal_reached=false,
            mean_abs_lateral_m=torch.zeros(self.num_envs),
            mean_abs_jerk=torch.zeros(self.num_envs),
            mean_abs_steer_rate=torch.zeros(self.num_envs),
            scenario_seed=torch.zeros(self.num_envs, dtype=torch.int64),
        )
        self.t = torch.where(done, torch.zeros_like(self.t), self.t)
        self.ret = torch.where(done, torch.zeros_like(self.ret), self.ret)
        self.obs = obs
        self.steps_taken += 1
        info = StepInfo(
            expert=self.expert_waypoints(),
            final_observation=final,
            episode=episode,
            lateral_deviation_m=torch.zeros(self.num_envs),
            speed_mps=torch.zeros(self.num_envs),
            ego_pose=torch.zeros(self.num_envs, 3),
        )
        return StepResult(obs, reward, terminated, truncated, info)

    def close(self) -> None:
        pass


# ---------------------------------------------------------------------------------------- host reads
# Tensor operations that make a CUDA stream wait for the host: reading values back, or an output
# whose size depends on the values (boolean-mask indexing, nonzero without a static size).
HOST_READS = {"__bool__", "__int__", "__float__", "__index__", "item", "tolist", "numpy", "cpu", "nonzero"}
HOST_READS |= {"masked_select", "unique", "unique_consecutive", "repeat_interleave"}


def _boolean_index(args: tuple[Any, ...]) -> bool:
    index = args[1] if len(args) > 1 else None
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(item, Tensor) and item.dtype == torch.bool for item in items)


class HostReadRecorder(TorchFunctionMode):
    """Records ``(world steps taken, operation)`` for every operation that would synchronise."""

    def __init__(self, env: SyncFreeWorlds) -> None:
        super().__init__()
        self.env = env
        self.reads: list[tuple[int, str]] = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        name = getattr(func, "__name__", "")
        if name in HOST_READS or (name in ("__getitem__", "__setitem__") and _boolean_index(args)):
            self.reads.append((self.env.steps_taken, name))
        return func(*args, **(kwargs or {}))


def _policy() -> PPOPolicy:
    torch.manual_seed(1)
    return PPOPolicy(FakeSFT(), policy_settings())


def _buffer() -> RolloutBuffer:
    sft = FakeSFT()
    return RolloutBuffer(ROLLOUT_STEPS, NUM_ENVS, sft.feature_dim, sft.num_waypoints)


def test_no_host_read_before_the_last_world_step() -> None:
    """Until the last world step of the rollout has returned, nothing is read back to the host
    (afterwards, one read sizes the truncations' encoder pass)."""
    env = SyncFreeWorlds()
    policy, buffer = _policy(), _buffer()
    obs = env.reset(seed=3)
    recorder = HostReadRecorder(env)
    with recorder:
        collect_rollout(policy, env, buffer, obs, torch.Generator().manual_seed(0), reward_scale=1.0)
    assert bool(buffer.truncated.any()) and bool(buffer.terminated.any())  # the test covers both
    early = [(step, name) for step, name in recorder.reads if step < ROLLOUT_STEPS]
    assert not early, f"host reads during the rollout (world steps taken, operation): {early}"


def test_the_per_step_code_reads_nothing_back_and_has_no_device_branch() -> None:
    """The source of every function a rollout step runs: no host read, and no branch on the
    device (which would leave the CUDA path untested by the CPU tests)."""
    banned = [
        r"\.item\(",
        r"\.tolist\(",
        r"\.cpu\(",
        r"\.numpy\(",
        r"\bbool\(",
        r"nonzero\(",
        r"device\.type",
    ]
    sources = {
        "trainer.collect_rollout.rollout_step": _nested_function_source(collect_rollout, "rollout_step")
    }
    for function in (
        TruncationStore.add,
        RolloutBuffer.add,
        EpisodeTally.add,
        PPOPolicy.act,
        PPOPolicy.distribution,
        PPOPolicy.std,
        PPOPolicy.value,
        PPOPolicy.final_waypoints,
    ):
        sources[function.__qualname__] = inspect.getsource(function)
    found = [
        (name, pattern) for name, text in sources.items() for pattern in banned if re.search(pattern, text)
    ]
    assert not found, found


def _nested_function_source(outer: Any, name: str) -> str:
    source = textwrap.dedent(inspect.getsource(outer))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.FunctionDef) and node.name == name:
            segment = ast.get_source_segment(source, node)
            assert segment is not None
            return segment
    raise AssertionError(f"{outer.__qualname__} defines no {name}")


# ---------------------------------------------------------------------------------------- toy worlds
TOY_WORLDS = 8
TOY_STEPS = 12
TOY_TIME_LIMIT = 3


def _toy_env(device: str = "cpu") -> ToyWaypointEnv:
    return ToyWaypointEnv(
        ToyWorldConfig(num_envs=TOY_WORLDS, max_episode_steps=TOY_TIME_LIMIT, difficulty=0.3), device
    )


def _toy_policy(spec: EnvSpec) -> PPOPolicy:
    """A small untrained SFT model whose plan drives straight ahead at about 8 m/s, with noise wide
    enough that some worlds leave the road (terminations) while the others reach the time limit."""
    torch.manual_seed(0)
    config = SFTModelConfig(
        bev_shape=spec.bev_shape,
        state_dim=spec.state_dim,
        num_waypoints=spec.num_waypoints,
        feature_dim=16,
        conv_channels=(4, 8),
        state_hidden_dim=8,
        head_hidden_dim=16,
    )
    model = WaypointModel(config)
    ahead = torch.arange(1, spec.num_waypoints + 1, dtype=torch.float32) * 2.0
    with torch.no_grad():
        model.waypoint_head[-1].bias.copy_(
            torch.stack([ahead, 0 * ahead], -1).flatten() / config.waypoint_scale
        )
    return PPOPolicy(model, policy_settings(init_log_std=-1.0))


def _toy_buffer(policy: PPOPolicy, device: str = "cpu", num_steps: int = TOY_STEPS) -> RolloutBuffer:
    return RolloutBuffer(num_steps, TOY_WORLDS, policy.sft_model.feature_dim, policy.num_waypoints, device)


@torch.no_grad()
def per_step_rollout(
    policy: PPOPolicy, env: Any, buffer: RolloutBuffer, obs: Observation, generator: torch.Generator
) -> tuple[Observation, EpisodeTally]:
    """The rollout as it was before the truncation store (the plain path): a Python loop over
    fresh tensors, and each step encodes its truncated worlds' final observations right away
    (``bool(truncated.any())`` and ``nonzero``, host reads that are free on the CPU)."""
    tally = EpisodeTally.zeros(env.device, env.num_envs, env.groups)
    z, sft_waypoints = policy.features(obs.bev, obs.state)
    for step in range(buffer.num_steps):
        delta, log_prob, value = policy.act(z, sft_waypoints, generator=generator)
        result = env.step(policy.final_waypoints(sft_waypoints, delta))
        next_z, next_sft = policy.features(result.obs.bev, result.obs.state)
        next_value = policy.value(next_z, next_sft)
        if bool(result.truncated.any()):
            index = result.truncated.nonzero()[:, 0]
            final = result.info.final_observation
            next_value = next_value.clone()
            next_value[index] = policy.value(*policy.features(final.bev[index], final.state[index]))
        buffer.add(
            step,
            z=z,
            sft_waypoints=sft_waypoints,
            delta=delta,
            log_prob=log_prob,
            value=value,
            reward=result.reward,
            terminated=result.terminated,
            truncated=result.truncated,
            next_value=next_value,
        )
        tally.add(result)
        obs, z, sft_waypoints = result.obs, next_z, next_sft
    return obs, tally


BUFFER_FIELDS = (
    "z",
    "sft_waypoints",
    "delta",
    "log_prob",
    "value",
    "reward",
    "terminated",
    "truncated",
    "next_value",
)


def test_the_static_rollout_fills_the_buffer_exactly_as_the_per_step_loop() -> None:
    """The rollout on static tensors (the structure a CUDA graph captures, run eagerly) against
    the plain per-step loop, from the same worlds, policy and noise: every stored tensor, the
    episode tally and the next observation are bit for bit the same over two rollouts."""
    static_env, plain_env = _toy_env(), _toy_env()
    policy = _toy_policy(static_env.spec)
    static_buffer, plain_buffer = _toy_buffer(policy), _toy_buffer(policy)
    static_gen, plain_gen = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    static_obs, plain_obs = static_env.reset(seed=11), plain_env.reset(seed=11)
    for _ in range(2):
        static_obs, static_tally = collect_rollout(
            policy, static_env, static_buffer, static_obs, static_gen, reward_scale=1.0
        )
        plain_obs, plain_tally = per_step_rollout(policy, plain_env, plain_buffer, plain_obs, plain_gen)
        assert bool(static_buffer.truncated.any()) and bool(static_buffer.terminated.any())
        for name in BUFFER_FIELDS:
            assert torch.equal(getattr(static_buffer, name), getattr(plain_buffer, name)), name
        assert torch.equal(static_tally.sums, plain_tally.sums)
        assert torch.equal(static_tally.nonfinite, plain_tally.nonfinite)
        assert torch.equal(static_obs.bev, plain_obs.bev) and torch.equal(static_obs.state, plain_obs.state)


class Recording:
    """Passes steps to a world and keeps every step's result (cloned)."""

    def __init__(self, env: ToyWaypointEnv) -> None:
        self.env = env
        self.num_envs, self.device, self.spec, self.groups = env.num_envs, env.device, env.spec, env.groups
        self.asynchronous = env.asynchronous
        self.results: list[StepResult] = []

    def step(self, waypoints: Tensor) -> StepResult:
        result = self.env.step(waypoints)
        final = result.info.final_observation
        self.results.append(
            StepResult(
                Observation(result.obs.bev.clone(), result.obs.state.clone()),
                result.reward.clone(),
                result.terminated.clone(),
                result.truncated.clone(),
                dataclasses.replace(
                    result.info, final_observation=Observation(final.bev.clone(), final.state.clone())
                ),
            )
        )
        return result


@torch.no_grad()
def test_deferred_bootstrap_matches_encoding_each_truncated_world_directly() -> None:
    """``next_value`` after the rollout: ``V(next observation)`` where the episode went on (bit for
    bit) and ``V(final observation)`` where it was truncated, equal to encoding that world's final
    observation alone; GAE then gives the advantages of those reference values. The one-batch
    encoding (CUDA's) agrees within float rounding."""
    env = Recording(_toy_env())
    policy = _toy_policy(env.spec)
    buffer = _toy_buffer(policy)
    obs = env.env.reset(seed=5)
    collect_rollout(policy, env, buffer, obs, torch.Generator().manual_seed(3), reward_scale=1.0)
    truncated, terminated = buffer.truncated, buffer.terminated
    assert int(truncated.sum()) >= 4 and bool(terminated.any())

    expected = torch.empty(TOY_STEPS, TOY_WORLDS)
    for t, result in enumerate(env.results):
        expected[t] = policy.value(*policy.features(result.obs.bev, result.obs.state))
        final = result.info.final_observation
        for world in result.truncated.nonzero()[:, 0].tolist():
            alone = policy.features(final.bev[world : world + 1], final.state[world : world + 1])
            expected[t, world] = policy.value(*alone)[0]
            # the bootstrap really is another observation's value
            assert not torch.equal(final.bev[world], result.obs.bev[world])
    went_on = ~truncated
    assert torch.equal(buffer.next_value[went_on], expected[went_on])
    torch.testing.assert_close(buffer.next_value, expected, rtol=0, atol=1e-5)

    buffer.compute_advantages(gamma=0.9, gae_lambda=0.8)
    advantages, _ = compute_gae(
        buffer.reward, buffer.value, expected, terminated, terminated | truncated, gamma=0.9, gae_lambda=0.8
    )
    torch.testing.assert_close(buffer.advantages, advantages, rtol=0, atol=1e-5)

    one_batch = _store_of(env.results, env)
    next_value = buffer.next_value.clone()
    next_value[truncated] = 0.0
    assert one_batch.bootstrap(policy, next_value, by_step=False) == int(truncated.sum())
    torch.testing.assert_close(next_value, buffer.next_value, rtol=0, atol=1e-5)


def _store_of(results: list[StepResult], env: Any) -> TruncationStore:
    store = TruncationStore.for_rollout(env, len(results))
    for t, result in enumerate(results):
        store.add(torch.tensor(t), result.truncated, result.info.final_observation)
    return store


@pytest.mark.parametrize(
    ("bev_shape", "contiguous"),
    [((4, 8, 8), True), ((3, 5, 5), True), ((4, 8, 8), False)],
    ids=["8-byte-rows", "odd-rows", "strided-images"],
)
def test_the_store_keeps_each_truncated_worlds_image_and_state(
    bev_shape: tuple[int, int, int], contiguous: bool
) -> None:
    """Rows fill in step order, worlds in index order, whatever the image's size in bytes (copied
    as 8-byte words when it allows) or layout; worlds that did not truncate leave no row."""
    worlds, generator = 5, torch.Generator().manual_seed(0)
    store = TruncationStore(4, worlds, bev_shape, STATE_DIM, torch.device("cpu"))
    expected: list[tuple[Tensor, Tensor, int]] = []
    for step, truncated_worlds in enumerate([[1, 3], [], [0]]):
        images = torch.randint(0, 256, (worlds, *bev_shape), dtype=torch.uint8, generator=generator)
        if not contiguous:
            images = images.transpose(2, 3).contiguous().transpose(2, 3)  # same values, other strides
        state = torch.randn(worlds, STATE_DIM, generator=generator)
        truncated = torch.zeros(worlds, dtype=torch.bool)
        truncated[truncated_worlds] = True
        store.add(torch.tensor(step), truncated, Observation(images, state))
        expected += [(images[w], state[w], step * worlds + w) for w in truncated_worlds]
    assert int(store.count) == len(expected) == 3
    for row, (image, state, position) in enumerate(expected):
        assert torch.equal(store.bev[row], image)
        assert torch.equal(store.state[row], state)
        assert int(store.position[row]) == position


def test_more_truncations_than_the_time_limit_allows_stop_the_rollout() -> None:
    """A world that truncates before its declared time limit overflows the store: the rollout
    fails with an error naming the cause instead of bootstrapping from missing values."""
    env = SyncFreeWorlds(time_limit=1)
    env.spec = dataclasses.replace(env.spec, max_episode_steps=ROLLOUT_STEPS)  # claims a longer limit
    with pytest.raises(RuntimeError, match="truncated in one rollout"):
        collect_rollout(
            _policy(), env, _buffer(), env.reset(seed=0), torch.Generator().manual_seed(0), reward_scale=1.0
        )


def test_a_mix_is_sized_by_its_shortest_time_limit() -> None:
    """A mix's spec carries its longest time limit; the store needs room for its shortest."""
    short = ToyWaypointEnv(ToyWorldConfig(num_envs=3, max_episode_steps=4))
    long = ToyWaypointEnv(ToyWorldConfig(num_envs=2, max_episode_steps=50))
    mix = MixedEnv([("short", short), ("long", long)])
    assert mix.spec.max_episode_steps == 50
    assert truncation_capacity(mix, 10) == 5 * 3  # ceil(10 / 4) truncations per world at most
    assert truncation_capacity(long, 10) == 2


# ---------------------------------------------------------------------------------------- the graph
def test_the_toy_worlds_state_is_found_and_can_be_fed_back() -> None:
    """The capture copies the world's new state to where the next replay reads it: the tensors it
    finds are every tensor the world saves for an exact resume, and a step's rebound tensors keep
    their shapes and share no memory."""
    env = _toy_env()
    env.reset(seed=2)
    env.step(env.expert_waypoints())  # a reset lets tensors share memory; a step gives each its own
    before = world_tensors(env)
    saved = env.state_dict()
    assert len([path for path in before if path.startswith("world.state.")]) == len(saved)
    for key, value in saved.items():
        assert torch.equal(before[f"world.state.{key}"], value), key
    env.step(env.expert_waypoints())
    pairs = state_feedback(before, world_tensors(env))
    assert pairs and all(old.shape == new.shape and old is not new for old, new in pairs)


@dataclasses.dataclass
class _World:
    speed: Tensor
    heading: Tensor


def test_state_feedback_refuses_what_a_replay_cannot_carry() -> None:
    """A new shape, one tensor under two names, or a new state that still uses a tensor the
    copies would overwrite: each would make replays compute something else than eager steps."""
    speed, heading = torch.zeros(3), torch.zeros(3)
    before = world_tensors(_World(speed, heading))
    with pytest.raises(GraphCaptureError, match=r"changes world\.speed"):
        state_feedback(before, world_tensors(_World(torch.zeros(4), heading)))
    with pytest.raises(GraphCaptureError, match="share memory"):  # both names for one tensor
        state_feedback(
            world_tensors(_World(speed, speed)), world_tensors(_World(torch.ones(3), torch.ones(3)))
        )
    with pytest.raises(GraphCaptureError, match="share memory"):  # heading takes the old speed
        state_feedback(before, world_tensors(_World(torch.ones(3), speed)))
    assert len(state_feedback(before, world_tensors(_World(torch.ones(3), heading)))) == 1
    empty = world_tensors(_World(torch.zeros(0), torch.zeros(0)))  # no memory to share, nothing to copy
    assert state_feedback(empty, world_tensors(_World(torch.zeros(0), torch.zeros(0)))) == []


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA: capture is untested without a GPU")
def test_rollouts_replayed_from_a_cuda_graph_match_eager_ones() -> None:
    """On a GPU: two rollouts replayed from CUDA graphs fill the buffer as eager rollouts do (the
    world's state must carry from replay to replay, and from one rollout's graph to the next)."""
    eager_env, graph_env = _toy_env("cuda"), _toy_env("cuda")
    policy = _toy_policy(eager_env.spec).to("cuda")
    eager, captured = _toy_buffer(policy, "cuda"), _toy_buffer(policy, "cuda")
    eager_gen, graph_gen = torch.Generator("cuda").manual_seed(7), torch.Generator("cuda").manual_seed(7)
    eager_obs, graph_obs = eager_env.reset(seed=11), graph_env.reset(seed=11)
    for _ in range(2):
        eager_obs, eager_tally = collect_rollout(
            policy, eager_env, eager, eager_obs, eager_gen, reward_scale=1.0
        )
        graph_obs, graph_tally = collect_rollout(
            policy, graph_env, captured, graph_obs, graph_gen, reward_scale=1.0, cuda_graph=True
        )
        assert bool(eager.truncated.any()) and bool(eager.terminated.any())
        for name in BUFFER_FIELDS:
            torch.testing.assert_close(getattr(captured, name), getattr(eager, name), msg=name)
        torch.testing.assert_close(graph_tally.sums, eager_tally.sums)
        assert torch.equal(graph_obs.bev, eager_obs.bev)


def _host_syncs_of_a_cuda_rollout(num_steps: int) -> int:
    """Synchronisations with the host that CUDA reports while ``collect_rollout`` fills a buffer
    of ``num_steps`` steps (``torch.cuda.set_sync_debug_mode``, which warns at every one)."""
    env = _toy_env("cuda")
    policy = _toy_policy(env.spec).to("cuda")
    buffer = _toy_buffer(policy, "cuda", num_steps)
    obs, generator = env.reset(seed=11), torch.Generator("cuda").manual_seed(7)
    collect_rollout(policy, env, buffer, obs, generator, reward_scale=1.0)  # lazy initialisation
    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            collect_rollout(policy, env, buffer, obs, generator, reward_scale=1.0)
        finally:
            torch.cuda.set_sync_debug_mode("default")
    # not the mode's own one-time notice ("Synchronization debug mode is a prototype feature ...")
    return sum("called a synchronizing" in str(warning.message) for warning in caught)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_a_cuda_rollout_step_never_waits_for_the_host() -> None:
    """On a GPU: a rollout reads the device once, the truncation count after its last step, however
    many steps it has (a per-step ``.item()``, ``nonzero`` or boolean mask would add one per step)."""
    assert _host_syncs_of_a_cuda_rollout(TOY_STEPS) == 1
    assert _host_syncs_of_a_cuda_rollout(2 * TOY_STEPS) == 1


def test_a_step_graph_needs_cuda_worlds() -> None:
    with pytest.raises(ValueError, match="CUDA device"):
        StepGraph(lambda: None, SyncFreeWorlds(), None)


def test_cuda_graph_on_the_cpu_is_a_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out_dir = tmp_path / "run"
    argv = ["--sft-checkpoint", str(tmp_path / "model.pt"), "--out-dir", str(out_dir), "--device", "cpu"]
    code, _, err = run_cli(train_ppo_delta_waypoint.main, [*argv, "--cuda-graph"], capsys)
    assert_one_line_error(code, err, "--cuda-graph", "CUDA device")
    assert not out_dir.exists()
    code, _, err = run_cli(throughput.main, ["--device", "cpu", "--cuda-graph"], capsys)
    assert_one_line_error(code, err, "--cuda-graph", "CUDA device")


def test_cuda_graph_needs_the_toy_world(monkeypatch: pytest.MonkeyPatch) -> None:
    """On a CUDA device: the simulators step on the host, so only the toy world can be captured."""
    monkeypatch.setattr(config_module, "resolve_device", lambda name: torch.device("cuda"))
    base = PPOConfig(sft_checkpoint="model.pt", num_envs=8, rollout_steps=16, cuda_graph=True, device="cuda")
    base.validate()
    with pytest.raises(UserError, match="--cuda-graph needs --env toy"):
        dataclasses.replace(base, env="carla").validate()
