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

from benchmarks.op_count import count_step_ops, world_ops_per_step
from training.envs.protocol import Observation
from training.envs.toy import ToyWaypointEnv, ToyWorldConfig
from training.envs.toy.scenario import Scenarios

COMPILED_OPS_BUDGET = 150  # top-level aten ops per step without a bank refill
REFILL_OPS_BUDGET = 300  # a step that also generates the next 8 scenarios per world
SURFACE_CHANNELS = (0, 2, 3)  # drivable area, oncoming vehicles, parked obstacles
ROUTE_CHANNEL = 1
MAX_EDGE_PIXEL_SHARE = 1e-4  # surface pixels that may differ, all of them on an edge
MAX_ROUTE_LEVELS = 2  # of 255: the route line's anti-aliased weights


def _worlds(num_envs: int, **overrides: object) -> tuple[ToyWaypointEnv, ToyWaypointEnv]:
    config = ToyWorldConfig(num_envs=num_envs, **overrides)
    return ToyWaypointEnv(config), ToyWaypointEnv(config, compile_step=True)


def assert_within_render_tolerance(got: torch.Tensor, want: torch.Tensor) -> None:
    """``got`` and ``want`` (``[N, C, H, W]`` uint8) are images of the same states: every surface
    pixel that differs lies on an edge of ``want``'s surface (its 3 x 3 neighbourhood holds both
    values) and they are at most ``MAX_EDGE_PIXEL_SHARE`` of the surface pixels; the route line
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
    share = int(differs.sum()) / differs.numel()
    assert share <= MAX_EDGE_PIXEL_SHARE, f"{share:.1e} of the surface pixels differ"


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
        ended += int((want.terminated | want.truncated).sum())
    assert ended >= 40, "too few episodes ended to exercise the autoreset"
    assert bool(torch.equal(compiled.state.next_seed, eager.state.next_seed))
    for field in dataclasses.fields(Scenarios):
        got_field, want_field = (
            getattr(compiled.state.scenarios, field.name),
            getattr(eager.state.scenarios, field.name),
        )
        assert torch.equal(got_field, want_field), field.name


def test_the_tolerance_check_rejects_a_shifted_box() -> None:
    """The check is not vacuous: a box moved by one pixel changes pixels inside nothing but
    edges, yet a box that appears or a route line off by a few levels fails."""
    image = torch.zeros(1, 4, 16, 16, dtype=torch.uint8)
    image[0, 2, 4:8, 4:8] = 255
    moved = image.clone()
    moved[0, 2, 4:8, 8] = 255  # one column grown: edge pixels only
    with pytest.raises(AssertionError, match="of the surface pixels"):
        assert_within_render_tolerance(moved, image)  # 4 of 768 surface pixels is too many here
    appeared = image.clone()
    appeared[0, 3, 12, 12] = 255
    with pytest.raises(AssertionError, match="away from any edge"):
        assert_within_render_tolerance(appeared, image)
    route = image.clone()
    route[0, 1, 3, 3] = 3
    with pytest.raises(AssertionError, match="route line"):
        assert_within_render_tolerance(route, image)


@pytest.mark.parametrize(("num_envs", "steps"), [(8, 60), (1024, 20)])
def test_a_compiled_step_stays_within_the_op_budget(num_envs: int, steps: int) -> None:
    counts = world_ops_per_step(num_envs, steps=steps, compile_step=True)
    assert 0 < counts["step_max"] <= COMPILED_OPS_BUDGET, f"{counts['step_max']} aten ops in one step"


def test_a_compiled_step_that_refills_the_bank_stays_within_its_budget() -> None:
    """One-step episodes take a seed per world per step, so the bank (8 per world) runs out."""
    _, compiled = _worlds(8, max_episode_steps=1)
    compiled.reset(seed=5)
    compiled.step(compiled.expert_waypoints())  # compiles
    refills = []
    for _ in range(12):
        bank = compiled.scenario_bank_start()
        ops = count_step_ops(compiled, compiled.expert_waypoints())
        if compiled.scenario_bank_start() is not bank:
            refills.append(ops)
        else:
            assert ops <= COMPILED_OPS_BUDGET
    assert refills, "no step refilled the bank"
    assert max(refills) <= REFILL_OPS_BUDGET, f"{max(refills)} aten ops in a refilling step"
