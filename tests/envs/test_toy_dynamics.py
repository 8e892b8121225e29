"""The kinematic bicycle against closed-form motion, and its steering and acceleration limits."""

from __future__ import annotations

import math

import pytest
import torch

from training.envs.toy.config import ToyWorldConfig
from training.envs.toy.dynamics import VehicleState, bicycle_step

CFG = ToyWorldConfig()


def _state(n: int = 1, **values: float) -> VehicleState:
    """A batch of ``n`` identical float64 states (zeros unless given)."""
    fields = {
        name: torch.full((n,), float(values.get(name, 0.0)), dtype=torch.float64)
        for name in ("x", "y", "yaw", "speed", "steer", "accel")
    }
    return VehicleState(**fields)


def _run(state: VehicleState, steer: float, accel: float, dt: float, steps: int) -> VehicleState:
    n = state.x.shape[0]
    steer_cmd = torch.full((n,), steer, dtype=torch.float64)
    accel_cmd = torch.full((n,), accel, dtype=torch.float64)
    for _ in range(steps):
        state = bicycle_step(state, steer_cmd, accel_cmd, CFG, dt)
    return state


@pytest.mark.parametrize("yaw", [0.0, 0.7, -2.5])
def test_straight_line_at_constant_speed_covers_exact_distance(yaw: float) -> None:
    speed, dt, steps = 8.0, 0.1, 37
    end = _run(_state(x=3.0, y=-1.0, yaw=yaw, speed=speed), steer=0.0, accel=0.0, dt=dt, steps=steps)
    distance = speed * dt * steps
    torch.testing.assert_close(end.x, torch.tensor([3.0 + distance * math.cos(yaw)], dtype=torch.float64))
    torch.testing.assert_close(end.y, torch.tensor([-1.0 + distance * math.sin(yaw)], dtype=torch.float64))
    torch.testing.assert_close(end.yaw, torch.tensor([yaw], dtype=torch.float64))
    torch.testing.assert_close(end.speed, torch.tensor([speed], dtype=torch.float64))


@pytest.mark.parametrize("steer", [0.3, -0.2, 0.05])
def test_constant_steer_drives_a_circle_of_radius_wheelbase_over_tan_steer(steer: float) -> None:
    speed, x0, y0, yaw0 = 6.0, 2.0, 5.0, 0.4
    radius = CFG.wheelbase_m / math.tan(steer)  # signed: left turns positive
    period = 2 * math.pi * abs(radius) / speed
    steps = 200
    dt = period / steps
    centre_x, centre_y = x0 - radius * math.sin(yaw0), y0 + radius * math.cos(yaw0)
    state = _state(x=x0, y=y0, yaw=yaw0, speed=speed, steer=steer)
    for step in range(1, steps + 1):
        state = _run(state, steer=steer, accel=0.0, dt=dt, steps=1)
        distance = math.hypot(float(state.x[0]) - centre_x, float(state.y[0]) - centre_y)
        assert distance == pytest.approx(abs(radius), rel=1e-9), f"left the circle at step {step}"
    # After one period the car is back where it started, heading turned by a full circle.
    assert float(state.x[0]) == pytest.approx(x0, abs=1e-8)
    assert float(state.y[0]) == pytest.approx(y0, abs=1e-8)
    assert float(state.yaw[0]) == pytest.approx(yaw0 + math.copysign(2 * math.pi, steer), abs=1e-9)


def test_steering_moves_at_most_the_steering_rate_and_stays_within_the_limit() -> None:
    dt = 0.1
    state = _state(speed=5.0)
    for step in range(1, 20):
        state = _run(state, steer=2.0, accel=0.0, dt=dt, steps=1)  # asks for far more than allowed
        expected = min(step * CFG.max_steer_rate * dt, CFG.max_steer_rad)
        assert float(state.steer[0]) == pytest.approx(expected, abs=1e-12)
    assert float(state.steer[0]) == pytest.approx(CFG.max_steer_rad)
    # And back the other way at the same rate.
    state = _run(state, steer=-2.0, accel=0.0, dt=dt, steps=1)
    assert float(state.steer[0]) == pytest.approx(CFG.max_steer_rad - CFG.max_steer_rate * dt)


def test_acceleration_is_clipped_to_the_limits() -> None:
    dt = 0.1
    up = _run(_state(speed=5.0), steer=0.0, accel=100.0, dt=dt, steps=1)
    assert float(up.speed[0]) == pytest.approx(5.0 + CFG.max_accel * dt)
    assert float(up.accel[0]) == pytest.approx(CFG.max_accel)
    down = _run(_state(speed=5.0), steer=0.0, accel=-100.0, dt=dt, steps=1)
    assert float(down.speed[0]) == pytest.approx(5.0 - CFG.max_decel * dt)
    assert float(down.accel[0]) == pytest.approx(-CFG.max_decel)


def test_speed_never_goes_negative_and_reported_accel_matches_the_speed_change() -> None:
    generator = torch.Generator().manual_seed(0)
    n, dt = 256, 0.1
    state = _state(n)
    state.speed = torch.rand(n, generator=generator, dtype=torch.float64) * 3.0
    for _ in range(30):
        steer_cmd = (torch.rand(n, generator=generator, dtype=torch.float64) - 0.5) * 4.0
        accel_cmd = (torch.rand(n, generator=generator, dtype=torch.float64) - 0.7) * 40.0
        nxt = bicycle_step(state, steer_cmd, accel_cmd, CFG, dt)
        assert bool((nxt.speed >= 0).all())
        torch.testing.assert_close(nxt.accel, (nxt.speed - state.speed) / dt)
        assert bool((nxt.accel <= CFG.max_accel + 1e-9).all())
        assert bool((nxt.accel >= -CFG.max_decel - 1e-9).all())
        assert bool(((nxt.steer - state.steer).abs() <= CFG.max_steer_rate * dt + 1e-12).all())
        state = nxt
    # A car braking hard from a crawl stops exactly and does not roll backwards.
    stopped = _run(_state(speed=0.2, x=1.0), steer=0.0, accel=-100.0, dt=dt, steps=3)
    assert float(stopped.speed[0]) == 0.0
    assert float(stopped.x[0]) == pytest.approx(1.0 + 0.5 * 0.2 * dt)


def test_float32_step_matches_float64_to_micrometres_on_nearly_straight_arcs() -> None:
    """The world runs in float32: the arc's displacement must not cancel catastrophically when
    the heading barely changes (``R * (sin(yaw1) - sin(yaw0))`` lost millimetres per substep)."""
    generator = torch.Generator().manual_seed(1)
    n = 4096

    def draw(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(n, generator=generator, dtype=torch.float64)

    exact = VehicleState(
        draw(-50, 50), draw(-50, 50), draw(-3, 3), draw(0, 12), draw(-5e-4, 5e-4), draw(-3, 3)
    )
    steer_cmd, accel_cmd = draw(-1e-3, 1e-3), draw(-7, 4)
    single = VehicleState(*(getattr(exact, name).float() for name in VehicleState.fields()))
    want = bicycle_step(exact, steer_cmd, accel_cmd, CFG, 0.1)
    got = bicycle_step(single, steer_cmd.float(), accel_cmd.float(), CFG, 0.1)
    for name in ("x", "y"):
        error = (getattr(got, name).double() - getattr(want, name)).abs().max().item()
        assert error < 1e-5, f"{name} off by {error * 1e3:.3f} mm"
