"""The batched toy world: expert success, determinism, autoreset and truncation, bad input."""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.rl.test_rollout_device_path import HostReadRecorder
from training.envs.options import EnvOptions
from training.envs.protocol import BatchedWaypointEnv, StepResult
from training.envs.registry import make_env
from training.envs.toy import STATE_NAMES, ToyWaypointEnv, ToyWorldConfig
from training.envs.toy import world as world_module
from training.envs.toy.scenario import Scenarios, generate_scenarios

K = ToyWorldConfig().num_waypoints


def _env(num_envs: int, device: str = "cpu", **overrides: object) -> ToyWaypointEnv:
    return ToyWaypointEnv(ToyWorldConfig(num_envs=num_envs, **overrides), device=device)  # type: ignore[arg-type]


def _stop_plan(n: int) -> torch.Tensor:
    """All waypoints at the origin: the plan of a car that wants to stand still."""
    return torch.zeros(n, K, 2)


def test_meets_the_protocol() -> None:
    env = _env(2)
    assert isinstance(env, BatchedWaypointEnv)
    assert env.spec.bev_shape == (4, 64, 64)
    assert env.spec.state_dim == len(STATE_NAMES) and env.spec.num_waypoints == K


@pytest.mark.parametrize(("difficulty", "num_envs"), [(0.0, 16), (1.0, 64)])
def test_expert_finishes_every_episode_without_failures(difficulty: float, num_envs: int) -> None:
    env = _env(num_envs, difficulty=difficulty)
    env.reset(seed=1000)
    expert = env.expert_waypoints()
    first: dict[str, torch.Tensor] = {}
    finished = torch.zeros(num_envs, dtype=torch.bool)
    for _ in range(env.spec.max_episode_steps):
        result = env.step(expert)
        expert = result.info.expert_waypoints
        ep = result.info.episode
        new = ep.done & ~finished
        for name in ("goal_reached", "collision", "off_road", "route_completion", "length"):
            value = getattr(ep, name)
            first[name] = torch.where(new, value, first.get(name, torch.zeros_like(value)))
        finished |= ep.done
        if bool(finished.all()):
            break
    assert bool(finished.all())
    assert not bool(first["collision"].any()), "the expert crashed"
    assert not bool(first["off_road"].any()), "the expert left the road"
    assert bool(first["goal_reached"].all())
    assert float(first["route_completion"].min()) >= 0.999
    assert int(first["length"].max()) < env.spec.max_episode_steps


def _rollout(env: ToyWaypointEnv, seed: int, steps: int) -> list[StepResult]:
    env.reset(seed=seed)
    results = []
    for step in range(steps):
        # The expert's plan, a little perturbed in a fixed way so that not every step is the expert's.
        plan = env.expert_waypoints() + 0.3 * np.sin(step)
        results.append(env.step(plan))
    return results


def test_same_seed_gives_bit_identical_observations_and_rewards() -> None:
    a = _rollout(_env(4, max_episode_steps=6), seed=5, steps=9)  # crosses an autoreset
    b = _rollout(_env(4, max_episode_steps=6), seed=5, steps=9)
    for ra, rb in zip(a, b, strict=True):
        assert torch.equal(ra.obs.bev, rb.obs.bev)
        assert torch.equal(ra.obs.state, rb.obs.state)
        assert torch.equal(ra.reward, rb.reward)
        assert torch.equal(ra.terminated, rb.terminated) and torch.equal(ra.truncated, rb.truncated)
        assert torch.equal(ra.info.expert_waypoints, rb.info.expert_waypoints)
    c = _rollout(_env(4, max_episode_steps=6), seed=6, steps=1)
    assert not torch.equal(a[0].obs.state, c[0].obs.state)


def test_a_scenario_depends_only_on_its_seed() -> None:
    big, small = _env(5), _env(1)
    obs_big = big.reset(seed=20)
    for i in (0, 3):
        obs_small = small.reset(seed=20 + i)
        assert torch.equal(obs_big.bev[i], obs_small.bev[0])
        assert torch.equal(obs_big.state[i], obs_small.state[0])
        for field in dataclasses.fields(big.state.scenarios):
            torch.testing.assert_close(
                getattr(big.state.scenarios, field.name)[i], getattr(small.state.scenarios, field.name)[0]
            )
        torch.testing.assert_close(big.expert_waypoints()[i], small.expert_waypoints()[0])
        # And the world stays the same under the same plans, whatever the other worlds do.
        plan = big.expert_waypoints()
        plan[[j for j in range(5) if j != i]] = torch.randn(4, K, 2) * 20
        r_big = big.step(plan)
        r_small = small.step(plan[i : i + 1])
        torch.testing.assert_close(r_big.obs.state[i], r_small.obs.state[0])
        torch.testing.assert_close(r_big.reward[i], r_small.reward[0])
        big.reset(seed=20)


def test_scenario_tensors_are_bit_identical_whatever_the_batch() -> None:
    cfg = ToyWorldConfig()
    for n in (2, 5):
        batch = generate_scenarios(torch.arange(20, 20 + n), cfg)
        for i in (0, n - 1):
            alone = generate_scenarios(torch.tensor([20 + i]), cfg)
            for field in dataclasses.fields(batch):
                assert torch.equal(getattr(batch, field.name)[i], getattr(alone, field.name)[0]), field.name


def test_time_limit_truncates_and_autoresets_with_the_next_seeds() -> None:
    n, limit = 3, 4
    env = _env(n, difficulty=0.0, max_episode_steps=limit)
    env.reset(seed=100)
    assert env.state.scenario_seed.tolist() == [100, 101, 102]
    for step in range(1, limit + 1):
        result = env.step(_stop_plan(n))
        if step < limit:
            assert not bool(result.truncated.any()) and not bool(result.terminated.any())
            assert not bool(result.info.episode.done.any())
            # Without an episode end, the final observation is the returned one.
            assert torch.equal(result.info.final_observation.bev, result.obs.bev)
    assert result.truncated.tolist() == [True] * n
    assert result.terminated.tolist() == [False] * n
    ep = result.info.episode
    assert ep.done.all() and ep.length.tolist() == [limit] * n
    assert ep.scenario_seed.tolist() == [100, 101, 102]
    assert not bool(ep.goal_reached.any() | ep.collision.any() | ep.off_road.any())
    assert float(result.info.speed_mps.max()) < 0.5  # the stop plan braked the car
    # The returned observation is the next episode's first one; the finished one's is kept.
    final = result.info.final_observation
    for i in range(n):
        assert not torch.equal(final.bev[i], result.obs.bev[i])
        assert not torch.equal(final.state[i], result.obs.state[i])
    assert float(final.state[:, 0].max()) < 0.5
    assert float(result.obs.state[:, 0].min()) >= ToyWorldConfig().start_speed_range[0]
    assert env.state.t.tolist() == [0] * n
    assert env.state.scenario_seed.tolist() == [103, 104, 105]
    # The new first observation is exactly a fresh reset's.
    fresh = _env(1, difficulty=0.0).reset(seed=104)
    assert torch.equal(result.obs.bev[1], fresh.bev[0])
    assert torch.equal(result.obs.state[1], fresh.state[0])


def test_off_road_terminates_with_the_penalty_and_seeds_follow_the_finishing_order() -> None:
    n, limit = 3, 6
    env = _env(n, difficulty=0.0, max_episode_steps=limit)
    env.reset(seed=200)
    hard_left = torch.zeros(n, K, 2)
    hard_left[..., 0] = torch.linspace(2.0, 8.0, K)
    hard_left[..., 1] = torch.linspace(3.0, 30.0, K)
    rewards = []
    off_step = None
    for step in range(1, limit + 1):
        plan = env.expert_waypoints()
        if off_step is None:
            plan[1] = hard_left[1]  # world 1 steers off the road, the others follow the expert
        result = env.step(plan)
        rewards.append(result.reward)
        if off_step is None and bool(result.terminated[1]):
            off_step = step
            ep = result.info.episode
            assert bool(ep.off_road[1]) and not bool(ep.goal_reached[1]) and bool(ep.done[1])
            assert not bool(result.truncated[1])
            assert not bool(ep.done[0]) and not bool(ep.done[2])
            w = ToyWorldConfig().reward
            assert float(result.reward[1]) < -w.off_road + 2.0  # the penalty, barely offset by progress
            assert float(result.reward[0]) > -2.0 and float(result.reward[2]) > -2.0
            assert env.state.scenario_seed.tolist() == [200, 203, 202]  # world 1 took the next seed
            assert int(env.state.t[1]) == 0
    assert off_step is not None and off_step < limit
    # Worlds 0 and 2 hit the time limit together: seeds by world index; world 1 runs on.
    assert result.truncated[[0, 2]].tolist() == [True, True]
    assert env.state.scenario_seed.tolist() == [204, 203, 205]
    assert int(env.state.t[1]) == limit - off_step


def test_bad_shapes_and_step_before_reset_raise() -> None:
    env = _env(2)
    with pytest.raises(RuntimeError):
        env.step(torch.zeros(2, K, 2))
    env.reset(seed=0)
    for shape in [(2, K, 3), (1, K, 2), (2, K + 1, 2), (2, K * 2), (K, 2)]:
        with pytest.raises(ValueError, match="shape"):
            env.step(torch.zeros(shape))


_BAD_VALUES = st.sampled_from([0.0, float("nan"), float("inf"), -float("inf"), 1e30, -1e30, 1e6, 250.0])


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    values=st.lists(_BAD_VALUES | st.floats(-300, 300), min_size=2 * K * 2, max_size=2 * K * 2),
    all_origin=st.booleans(),
    seed=st.integers(0, 10_000),
)
def test_wild_waypoints_keep_the_world_finite_and_episodes_end_cleanly(
    values: list[float], all_origin: bool, seed: int
) -> None:
    limit = 3
    env = _env(2, max_episode_steps=limit)
    env.reset(seed=seed)
    plan = torch.zeros(2, K, 2) if all_origin else torch.tensor(values, dtype=torch.float32).view(2, K, 2)
    ended = torch.zeros(2, dtype=torch.bool)
    for _ in range(limit):
        result = env.step(plan)
        assert torch.isfinite(result.obs.state).all()
        assert torch.isfinite(result.reward).all()
        assert torch.isfinite(result.info.expert_waypoints).all()
        assert torch.isfinite(result.info.final_observation.state).all()
        for field in env.state.vehicle.fields():
            assert torch.isfinite(getattr(env.state.vehicle, field)).all(), field
        ep = result.info.episode
        done = ep.done
        assert torch.equal(done, result.terminated | result.truncated)
        assert not bool((result.terminated & result.truncated).any())
        if bool(done.any()):
            assert torch.isfinite(ep.episode_return[done]).all()
            assert bool(((ep.route_completion[done] >= 0) & (ep.route_completion[done] <= 1)).all())
            assert bool(((ep.length[done] >= 1) & (ep.length[done] <= limit)).all())
        ended |= done
    assert bool(ended.all()), "every episode ends by the time limit"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cpu_and_cuda_worlds_agree() -> None:
    cpu, cuda = _env(4, "cpu", max_episode_steps=3), _env(4, "cuda", max_episode_steps=3)
    obs_cpu, obs_cuda = cpu.reset(seed=42), cuda.reset(seed=42)
    for step in range(5):  # crosses an autoreset
        bev_cpu, bev_cuda = obs_cpu.bev, obs_cuda.bev.cpu()
        for channel in (0, 2, 3):
            mismatch = (bev_cpu[:, channel] != bev_cuda[:, channel]).float().mean()
            assert float(mismatch) < 0.002, f"step {step}, channel {channel}"
        route_diff = (bev_cpu[:, 1].int() - bev_cuda[:, 1].int()).abs()
        assert int(route_diff.max()) <= 3, f"step {step}: anti-aliased route differs too much"
        torch.testing.assert_close(obs_cuda.state.cpu(), obs_cpu.state, atol=1e-4, rtol=1e-4)
        plan = cpu.expert_waypoints()
        r_cpu, r_cuda = cpu.step(plan), cuda.step(plan.cuda())
        torch.testing.assert_close(r_cuda.reward.cpu(), r_cpu.reward, atol=1e-4, rtol=1e-4)
        assert torch.equal(r_cuda.terminated.cpu(), r_cpu.terminated)
        assert torch.equal(r_cuda.truncated.cpu(), r_cpu.truncated)
        obs_cpu, obs_cuda = r_cpu.obs, r_cuda.obs


# The checkpoint format of the toy world: resumable runs saved it under exactly these keys.
_STATE_KEYS = [
    *(f"vehicle.{name}" for name in ("x", "y", "yaw", "speed", "steer", "accel")),
    *(f"scenarios.{field.name}" for field in dataclasses.fields(Scenarios)),
    *(f"acc.{name}" for name in ("ret", "lat", "jerk", "steer_rate", "substeps")),
    *("frenet.0", "frenet.1", "frenet.2"),
    *("route_hint", "t", "time_s", "best_s", "scenario_seed", "next_seed", "obs.bev", "obs.state"),
]


def test_saved_state_has_the_checkpoint_keys_and_restores_the_worlds_exactly() -> None:
    limit = 4
    env = _env(3, max_episode_steps=limit)
    env.reset(seed=70)
    generator = torch.Generator().manual_seed(0)
    plans = [0.5 * torch.randn(3, K, 2, generator=generator) for _ in range(2 * limit)]
    for plan in plans[:limit]:  # crosses an autoreset
        env.step(env.expert_waypoints() + plan)
    saved = env.state_dict()
    assert list(saved) == _STATE_KEYS
    assert all(tensor.device.type == "cpu" for tensor in saved.values())

    restored = _env(3, max_episode_steps=limit)
    obs = restored.load_state_dict(saved)
    assert torch.equal(obs.bev, env.state.obs.bev) and torch.equal(obs.state, env.state.obs.state)
    for plan in plans[limit:]:
        a = env.step(env.expert_waypoints() + plan)
        b = restored.step(restored.expert_waypoints() + plan)
        assert torch.equal(a.reward, b.reward) and torch.equal(a.obs.bev, b.obs.bev)
        assert torch.equal(a.info.episode.scenario_seed, b.info.episode.scenario_seed)
    after_a, after_b = env.state_dict(), restored.state_dict()
    assert all(torch.equal(after_a[key], after_b[key]) for key in _STATE_KEYS)


def test_a_saved_state_that_lacks_a_field_or_has_other_worlds_is_refused() -> None:
    env = _env(2)
    with pytest.raises(RuntimeError, match="reset"):
        env.state_dict()
    env.reset(seed=0)
    saved = env.state_dict()
    with pytest.raises(ValueError, match=r"lacks 'acc\.jerk'"):
        _env(2).load_state_dict({k: v for k, v in saved.items() if k != "acc.jerk"})
    with pytest.raises(ValueError, match="holds 2 worlds"):
        _env(3).load_state_dict(saved)


def test_the_expert_plan_in_a_step_info_is_the_one_of_that_step_even_when_read_later() -> None:
    """The toy world computes ``info.expert_waypoints`` on first use: read after later steps and
    autoresets, it must still be the plan for the observation that step returned."""
    eager, lazy = _env(6, max_episode_steps=3), _env(6, max_episode_steps=3)
    eager.reset(seed=40)
    lazy.reset(seed=40)
    plans, infos = [], []
    for _ in range(7):  # two autoresets of every world
        plan = eager.expert_waypoints() + 0.3
        plans.append(eager.step(plan).info.expert_waypoints.clone())
        infos.append(lazy.step(plan).info)
    for step, (want, info) in enumerate(zip(plans, infos, strict=True)):
        torch.testing.assert_close(info.expert_waypoints, want, rtol=0, atol=0, msg=f"step {step}")


@pytest.mark.parametrize("captured", [False, True])
def test_the_sync_free_autoreset_gives_the_same_worlds_as_the_cpu_one(
    captured: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The CUDA path (every world takes from the scenario bank, refilled on a fixed schedule, no
    host read) run on the CPU: same scenarios, seeds, observations and rewards as the CPU path,
    across several bank refills: one-step episodes use seeds at the largest rate the bank's
    schedule allows (every world, every step). ``captured``: as inside a CUDA graph capture,
    where the step refills a one-step bank every time (a replay repeats the captured step)."""
    monkeypatch.setattr(world_module, "capturing_cuda_graph", lambda device: captured)
    cpu, sync_free = _env(5, max_episode_steps=1), _env(5, max_episode_steps=1)
    sync_free.sync_free = True
    sync_free._new_bank()
    cpu.reset(seed=7)
    sync_free.reset(seed=7)
    bank = sync_free._bank.start, sync_free._bank.scenarios.route_xy
    generator = torch.Generator().manual_seed(7)
    for step in range(30):  # 150 seeds: the bank of 40 refilled 3 times
        plan = cpu.expert_waypoints() + 2.0 * torch.randn(
            5, ToyWorldConfig().num_waypoints, 2, generator=generator
        )
        want, got = cpu.step(plan), sync_free.step(plan)
        assert torch.equal(got.obs.bev, want.obs.bev), f"step {step}"
        assert torch.equal(got.reward, want.reward) and torch.equal(got.terminated, want.terminated)
        assert torch.equal(got.info.episode.scenario_seed, want.info.episode.scenario_seed)
    assert int(sync_free.state.next_seed) > 5 + sync_free._bank.size  # the bank was refilled
    if captured:  # a graph replays into the tensors it captured: the bank is written in place
        assert sync_free._bank.start is bank[0] and sync_free._bank.scenarios.route_xy is bank[1]
    assert torch.equal(sync_free.state.scenario_seed, cpu.state.scenario_seed)
    for field in dataclasses.fields(Scenarios):
        assert torch.equal(
            getattr(sync_free.state.scenarios, field.name), getattr(cpu.state.scenarios, field.name)
        )


def test_the_sync_free_step_reads_nothing_back_to_the_host() -> None:
    """The world's path off the CPU (run here on the CPU) never reads a tensor back to the host:
    every operation that would synchronise a CUDA stream is recorded over steps with autoresets,
    bank refills, crashes and time limits."""
    env = _env(5, max_episode_steps=2)
    env.sync_free = True
    env.reset(seed=9)
    generator = torch.Generator().manual_seed(9)
    plans = [env.expert_waypoints() + 1.5 * torch.randn(5, 8, 2, generator=generator) for _ in range(20)]
    counter = SimpleNamespace(steps_taken=0)
    with HostReadRecorder(counter) as recorder:
        for plan in plans:  # 20 steps: 100 world steps, beyond the first bank of 40 seeds
            env.step(plan)
            counter.steps_taken += 1
    assert recorder.reads == [], f"host reads (steps taken, operation): {recorder.reads[:5]}"
    assert int(env.state.next_seed) > 5 + env._bank.size


def test_the_penalty_flags_change_what_leaving_the_road_costs_and_nothing_else() -> None:
    """``--off-road-penalty 25`` / ``--collision-penalty`` reach the world: the same off-road exit
    costs 15 more than with the default 10, every other step's reward is the same."""
    plain = make_env("toy", 3, options=EnvOptions(difficulty=0.0))
    harsh = make_env(
        "toy", 3, options=EnvOptions(difficulty=0.0, off_road_penalty=25.0, collision_penalty=40.0)
    )
    assert (harsh.config.reward.off_road, harsh.config.reward.collision) == (25.0, 40.0)
    plain.reset(seed=200)
    harsh.reset(seed=200)
    hard_left = torch.zeros(3, K, 2)
    hard_left[..., 0] = torch.linspace(2.0, 8.0, K)
    hard_left[..., 1] = torch.linspace(3.0, 30.0, K)
    for _ in range(6):
        plan = plain.expert_waypoints()
        plan[1] = hard_left[1]
        want, got = plain.step(plan), harsh.step(plan)
        expected = want.reward - 15.0 * want.info.episode.off_road.float()
        torch.testing.assert_close(got.reward, expected)
        if bool(want.info.episode.off_road[1]):
            return
    raise AssertionError("world 1 never left the road")


def test_comfort_terms_cost_the_steps_mean_jerk_and_steering_rate() -> None:
    """The reward's comfort terms charge each step the mean |jerk| and |steering rate| of the
    substeps it drove: the same plans in a world without them differ by exactly that, read back
    from the episode's running means (which average over every substep so far)."""
    weights = dataclasses.replace(ToyWorldConfig().reward, jerk=0.0, steer_rate=0.0)
    comfy_weights = dataclasses.replace(weights, jerk=0.3, steer_rate=2.0)
    plain = ToyWaypointEnv(ToyWorldConfig(num_envs=4, difficulty=0.0, reward=weights))
    comfy = ToyWaypointEnv(ToyWorldConfig(num_envs=4, difficulty=0.0, reward=comfy_weights))
    plain.reset(seed=300)
    comfy.reset(seed=300)
    generator = torch.Generator().manual_seed(3)
    substeps = ToyWorldConfig().substeps
    jerk_so_far, steer_so_far = torch.zeros(4), torch.zeros(4)
    for t in range(1, 6):
        plan = plain.expert_waypoints() + 0.5 * torch.randn(4, K, 2, generator=generator)
        want, got = plain.step(plan), comfy.step(plan)
        episode = want.info.episode
        assert not bool(episode.done.any()), "a world ended: the running means below assume it did not"
        step_jerk = episode.mean_abs_jerk * substeps * t - jerk_so_far
        step_steer = episode.mean_abs_steer_rate * substeps * t - steer_so_far
        jerk_so_far, steer_so_far = jerk_so_far + step_jerk, steer_so_far + step_steer
        assert (step_jerk > 0).all() and (step_steer > 0).all()
        expected = want.reward - (0.3 * step_jerk + 2.0 * step_steer) / substeps
        torch.testing.assert_close(got.reward, expected, atol=1e-4, rtol=1e-5)


def test_a_restored_state_shares_no_memory_with_the_saved_one() -> None:
    """A step adds into the episode sums in place: after ``load_state_dict`` it must not write into
    the caller's tensors (loading the same saved state twice then gives the same run)."""
    env = _env(4)
    env.reset(seed=1)
    env.step(env.expert_waypoints())
    saved = env.state_dict()
    before = {key: value.clone() for key, value in saved.items()}
    rewards = []
    for _ in range(2):
        env.load_state_dict(saved)
        rewards.append(env.step(env.expert_waypoints()).reward)
    assert all(torch.equal(saved[key], before[key]) for key in saved)
    assert torch.equal(rewards[0], rewards[1])
