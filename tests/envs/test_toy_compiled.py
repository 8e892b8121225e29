"""The toy world's step compiled into one graph (``--compile-world``): its op budget, and the same
world as the eager step within the tolerance stated in docs/benchmarks.md.

A compiled step runs the eager step's operations as generated kernels, which round some float
operations differently (fused multiply-adds, vectorised sines), so states agree to rounding and
images of the same state differ only where a pixel's centre lies on a surface's edge or in a route
line's anti-aliased weight. Scenarios do not change: the bank that feeds the autoreset is
generated eagerly, so a seed gives bit for bit the same scenario in both.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from torch._dynamo.utils import counters

from benchmarks.op_count import count_step_ops, world_ops_per_step
from training.envs.protocol import EpisodeStats, Observation
from training.envs.toy import ToyWaypointEnv, ToyWorldConfig
from training.envs.toy.scenario import Scenarios

COMPILED_OPS_BUDGET = 150  # top-level aten ops per step without a bank refill
REFILL_OPS_BUDGET = 600  # a step that also generates the next 8 scenarios per world and their first images
SURFACE_CHANNELS = (0, 2, 3)  # drivable area, oncoming vehicles, parked obstacles
ROUTE_CHANNEL = 1
MAX_EDGE_PIXELS_PER_IMAGE = 2  # surface pixels of one image that may differ, all of them on an edge
MAX_ROUTE_LEVELS = 2  # of 255: the route line's anti-aliased weights


def _worlds(num_envs: int, **overrides: object) -> tuple[ToyWaypointEnv, ToyWaypointEnv]:
    config = ToyWorldConfig(num_envs=num_envs, **overrides)
    return ToyWaypointEnv(config), ToyWaypointEnv(config, compile_step=True)


def assert_within_render_tolerance(
    got: torch.Tensor, want: torch.Tensor, *, per_image: int | None = MAX_EDGE_PIXELS_PER_IMAGE
) -> None:
    """``got`` and ``want`` (``[N, C, H, W]`` uint8) are images of the same states: every surface
    pixel that differs lies on an edge of ``want``'s surface (its 3 x 3 neighbourhood holds both
    values), at most ``per_image`` of them in any one image (``None``: no count), and the route line
    differs by at most ``MAX_ROUTE_LEVELS``."""
    diff = (got.int() - want.int()).abs()
    route = diff[:, ROUTE_CHANNEL]
    assert int(route.max()) <= MAX_ROUTE_LEVELS, f"route line off by {int(route.max())} levels"
    surfaces = want[:, SURFACE_CHANNELS].float()
    padded = F.pad(surfaces, (1, 1, 1, 1), mode="replicate")
    highest = F.max_pool2d(padded, 3, stride=1)
    lowest = -F.max_pool2d(-padded, 3, stride=1)
    differs = diff[:, SURFACE_CHANNELS] > 0
    assert not (differs & (highest == lowest)).any(), "a surface pixel away from any edge differs"
    if per_image is not None:
        most = int(differs.flatten(1).sum(dim=1).max())
        assert most <= per_image, f"{most} surface pixels of one image differ"


def _eager_image_of(env: ToyWaypointEnv, twin: ToyWaypointEnv) -> Observation:
    """``env``'s current state rendered by ``twin``'s eager renderer."""
    st = env.state
    return twin._render(st.vehicle, st.scenarios, st.frenet, st.time_s)


def test_the_compiled_world_plays_the_eager_one_within_the_tolerance() -> None:
    """Same plans, 80 steps of 16 worlds with crashes and time limits (episodes of 20 steps): the
    same scenario seeds and scenarios, the same episode ends, states within a millimetre, rewards
    within 1e-3, and each observation within the render tolerance of the eager image of its state."""
    eager, compiled = _worlds(16, max_episode_steps=20)
    eager.reset(seed=321)
    compiled.reset(seed=321)
    generator = torch.Generator().manual_seed(321)
    ended = 0
    for step in range(80):
        plan = eager.expert_waypoints() + 1.0 * torch.randn(16, 8, 2, generator=generator)
        want, got = eager.step(plan), compiled.step(plan)
        assert torch.equal(got.terminated, want.terminated) and torch.equal(got.truncated, want.truncated)
        assert torch.equal(compiled.state.scenario_seed, eager.state.scenario_seed), f"step {step}"
        assert torch.allclose(got.reward, want.reward, atol=1e-3), f"step {step}"
        for name in ("x", "y", "yaw", "speed"):
            gap = (getattr(compiled.state.vehicle, name) - getattr(eager.state.vehicle, name)).abs()
            assert float(gap.max()) < 1e-3, f"{name} differs by {float(gap.max())} at step {step}"
        assert_within_render_tolerance(got.obs.bev, _eager_image_of(compiled, eager).bev)
        assert torch.allclose(got.obs.state, _eager_image_of(compiled, eager).state, atol=1e-4)
        # the final observations (what a truncated episode bootstraps from) are of states 1 mm apart
        final, final_want = got.info.final_observation, want.info.final_observation
        assert_within_render_tolerance(final.bev, final_want.bev, per_image=None)
        assert torch.allclose(final.state, final_want.state, atol=1e-3)
        _assert_same_episodes(got.info.episode, want.info.episode)
        ended += int((want.terminated | want.truncated).sum())
    assert ended >= 40, "too few episodes ended to exercise the autoreset"
    assert bool(torch.equal(compiled.state.next_seed, eager.state.next_seed))
    for field in dataclasses.fields(Scenarios):
        got_field, want_field = (
            getattr(compiled.state.scenarios, field.name),
            getattr(eager.state.scenarios, field.name),
        )
        assert torch.equal(got_field, want_field), field.name


def _assert_same_episodes(got: EpisodeStats, want: EpisodeStats) -> None:
    assert torch.equal(got.done, want.done)
    for name in ("length", "collision", "off_road", "goal_reached", "scenario_seed"):
        assert torch.equal(getattr(got, name)[got.done], getattr(want, name)[want.done]), name
    for name in ("episode_return", "route_completion", "mean_abs_lateral_m", "mean_abs_jerk"):
        assert torch.allclose(getattr(got, name)[got.done], getattr(want, name)[want.done], atol=1e-3), name


def test_the_tolerance_check_rejects_a_box_grown_by_a_column_in_one_world() -> None:
    """The check is not vacuous on a real batch: 16 worlds at difficulty 1, the boxes of one world
    grown by a pixel column fail it, so does a box pixel that appears away from any box, and a
    route line off by 3 levels; the unchanged batch passes."""
    env = ToyWaypointEnv(ToyWorldConfig(num_envs=16, difficulty=1.0))
    images = env.reset(seed=11).bev
    assert_within_render_tolerance(images.clone(), images)
    world, rows, cols = (images[:, 2] > 0).nonzero().unbind(-1)  # vehicle pixels
    assert len(world) > 0, "no vehicle in view"
    first = world[0]
    in_world = world == first
    grown = images.clone()
    for row in rows[in_world].unique():  # the boxes' right sides move out by one pixel column
        right = int(cols[in_world & (rows == row)].max())
        grown[first, 2, row, min(right + 1, images.shape[-1] - 1)] = 255
    with pytest.raises(AssertionError, match="of one image differ"):
        assert_within_render_tolerance(grown, images)
    assert not images[:, 3, 0:3, 0:3].any(), "an obstacle in a corner: pick another seed"
    appeared = images.clone()
    appeared[0, 3, 1, 1] = 255  # an obstacle pixel in a corner without obstacles
    with pytest.raises(AssertionError, match="away from any edge"):
        assert_within_render_tolerance(appeared, images)
    route = images.clone()
    route[0, 1] = route[0, 1].int().add(3).clamp(max=255).to(torch.uint8)
    with pytest.raises(AssertionError, match="route line"):
        assert_within_render_tolerance(route, images)


def test_the_step_compiles_once_whatever_the_callers_grad_mode() -> None:
    """One graph over steps with and without autograd, a reset, a restored state and a new
    difficulty: the trainer steps under ``no_grad``, a benchmark with autograd on."""
    counters.clear()
    _, compiled = _worlds(4, max_episode_steps=3)
    compiled.reset(seed=2)
    compiled.step(compiled.expert_waypoints())
    with torch.no_grad():
        compiled.step(compiled.expert_waypoints())
    saved = compiled.state_dict()
    compiled.load_state_dict(saved)
    compiled.step(compiled.expert_waypoints())
    compiled.set_difficulty(0.9)
    compiled.reset(seed=3)
    for _ in range(5):
        compiled.step(compiled.expert_waypoints())
    assert counters["stats"]["unique_graphs"] == 1


@pytest.mark.parametrize(("num_envs", "steps"), [(8, 60), (1024, 20)])
def test_a_compiled_step_stays_within_the_op_budget(num_envs: int, steps: int) -> None:
    counts = world_ops_per_step(num_envs, steps=steps, compile_step=True)
    assert 0 < counts["step_max"] <= COMPILED_OPS_BUDGET, f"{counts['step_max']} aten ops in one step"


def test_a_compiled_step_that_refills_the_bank_stays_within_its_budget() -> None:
    """One-step episodes take a seed per world per step, so the bank (8 per world) runs out; the
    worlds take the same seeds and scenarios as eager ones across the refills."""
    eager, compiled = _worlds(8, max_episode_steps=1)
    eager.reset(seed=5)
    compiled.reset(seed=5)
    eager.step(eager.expert_waypoints())
    compiled.step(compiled.expert_waypoints())  # compiles
    refills = []
    for step in range(20):
        want = eager.step(eager.expert_waypoints())
        ops, refilled = count_step_ops(compiled, compiled.expert_waypoints())
        if refilled:
            refills.append(ops)
        else:
            assert ops <= COMPILED_OPS_BUDGET, f"{ops} aten ops at step {step}"
        assert torch.equal(compiled.state.scenario_seed, eager.state.scenario_seed), f"step {step}"
        assert torch.equal(compiled.state.scenarios.route_xy, eager.state.scenarios.route_xy)
        assert torch.equal(compiled.state.t, eager.state.t)
        assert bool(want.truncated.all())
    assert len(refills) >= 2, "the bank was not refilled twice"
    assert max(refills) <= REFILL_OPS_BUDGET, f"{max(refills)} aten ops in a refilling step"
