"""``ToyWaypointEnv``: a batch of toy driving worlds as tensors on any device.

Each ``step`` converts the plan to the world frame, runs the controller and the kinematic
bicycle for ``policy_dt / sim_dt`` substeps (checking collision and off-road at every
substep), scores the step, autoresets finished worlds and renders the next observation.
There is no Python loop over worlds; on CUDA there is no host synchronisation in a step.
"""

from __future__ import annotations

import dataclasses
import typing
from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch

from training.common.compiling import with_graph_limit
from training.envs.protocol import BatchedWaypointEnv, EpisodeStats, Observation, StepInfo, StepResult
from training.envs.toy.config import COMPILE_ON_CPU_ONLY, ToyWorldConfig, shared_layout_spec
from training.envs.toy.dynamics import (
    PlanPolyline,
    VehicleState,
    bicycle_step,
    ego_to_world,
    plan_speeds,
    pure_pursuit_steer,
    setpoint_weights,
)
from training.envs.toy.expert import expert_plan
from training.envs.toy.render import RenderInputs, render_bev, render_layout
from training.envs.toy.scenario import (
    ScenarioBank,
    Scenarios,
    frenet_to_world,
    generate_scenarios,
    interpolate_profile,
    project_points_to_route,
    project_to_route,
)

_MAX_WAYPOINT_M = 200.0  # plans are clamped to this distance; non-finite plans mean "stop here"
_CPU_BANK_MIN = 64  # scenarios per bank refill on the CPU (at least; 4 per world)
_BANK_STEPS = 8  # with fixed shapes the bank holds num_envs seeds per step for this many steps
# Graphs one process may compile for the step (dynamo's default is 8, and with fullgraph a 9th raises):
# one per world count and config a process builds, as the tests and benchmarks build many.
_STEP_GRAPHS_PER_PROCESS = 64


@dataclasses.dataclass
class EpisodeSums:
    """Running sums ``[N]`` over each world's current episode, from which ``EpisodeStats`` averages."""

    ret: torch.Tensor  # reward
    lat: torch.Tensor  # |lateral offset of the car's centre| (m), one term per policy step
    jerk: torch.Tensor  # |jerk| (m/s^3), one term per live substep
    steer_rate: torch.Tensor  # |steering rate| (rad/s), one term per live substep
    substeps: torch.Tensor  # live substeps

    @classmethod
    def zeros(cls, num_envs: int, device: torch.device) -> EpisodeSums:
        return cls(*(torch.zeros(num_envs, device=device) for _ in dataclasses.fields(cls)))


class Comfort(NamedTuple):
    """One step's mean |jerk| (m/s^3) and |steering rate| (rad/s) over its driven substeps, ``[N]``."""

    jerk: torch.Tensor
    steer_rate: torch.Tensor


class _Advanced(NamedTuple):
    """What a step's tensor work (``ToyWaypointEnv._advance``) returns."""

    obs: Observation
    reward: torch.Tensor
    terminated: torch.Tensor
    truncated: torch.Tensor
    final_obs: Observation
    episode: EpisodeStats
    lateral: torch.Tensor  # lateral offset of the car's centre (m)
    speed: torch.Tensor


class Frenet(NamedTuple):
    """The rear axle in route coordinates, each ``[N]``."""

    s: torch.Tensor  # arc length along the route (m)
    d: torch.Tensor  # signed lateral offset, left > 0 (m)
    road_heading: torch.Tensor  # route heading at ``s`` (rad)


class _EpisodeStart(NamedTuple):
    """Where each scenario's episode starts (``ToyWaypointEnv._episode_starts``)."""

    vehicle: VehicleState
    frenet: Frenet
    route_hint: torch.Tensor  # [N] int64
    obs: Observation


@dataclasses.dataclass
class ToyWorldState:
    """Everything that changes as the worlds run: one entry per world along dim 0 (``next_seed``
    is one for all). ``state_dict`` saves every field under a dotted key (``vehicle.x``,
    ``acc.ret``, ``frenet.0``, ``obs.bev``, ``t``) and ``load_state_dict`` rebuilds the fields
    from those keys, so a resumed run continues exactly."""

    vehicle: VehicleState
    scenarios: Scenarios  # the scenario each world plays
    acc: EpisodeSums
    frenet: Frenet
    route_hint: torch.Tensor  # [N] int64: route index near the car, where the projection searches
    t: torch.Tensor  # [N] int64: policy steps into the episode
    time_s: torch.Tensor  # [N]: simulated seconds into the episode (where the oncoming cars are)
    best_s: torch.Tensor  # [N]: furthest arc length reached (m), for route completion
    scenario_seed: torch.Tensor  # [N] int64
    next_seed: torch.Tensor  # [] int64: the next unused scenario seed
    obs: Observation  # what the policy acts on next


def _flatten(key: str, value: object) -> dict[str, torch.Tensor]:
    """``{dotted key: tensor}`` of a tensor, a tuple (keys by position) or a dataclass (by field)."""
    if isinstance(value, torch.Tensor):
        return {key: value}
    if isinstance(value, tuple):
        items = {str(index): item for index, item in enumerate(value)}
    else:
        items = {field.name: getattr(value, field.name) for field in dataclasses.fields(value)}  # type: ignore[arg-type]
    return {k: v for name, item in items.items() for k, v in _flatten(f"{key}.{name}", item).items()}


def _unflatten(kind: type, key: str, flat: dict[str, torch.Tensor]) -> object:
    """Rebuild a value of ``kind`` (a tensor, a named tuple or a dataclass) saved by :func:`_flatten`."""
    if kind is torch.Tensor:
        return flat[key]
    hints = typing.get_type_hints(kind)
    if issubclass(kind, tuple):
        return kind(*(_unflatten(hint, f"{key}.{i}", flat) for i, hint in enumerate(hints.values())))
    fields = dataclasses.fields(kind)
    return kind(**{f.name: _unflatten(hints[f.name], f"{key}.{f.name}", flat) for f in fields})


def _flat_of_state(state: ToyWorldState) -> dict[str, torch.Tensor]:
    """Every tensor of ``state`` under its dotted key (see ``ToyWorldState``)."""
    flat: dict[str, torch.Tensor] = {}
    for field in dataclasses.fields(ToyWorldState):
        flat |= _flatten(field.name, getattr(state, field.name))
    return flat


def _state_of_flat(flat: dict[str, torch.Tensor]) -> ToyWorldState:
    """The state whose tensors :func:`_flat_of_state` gave (``KeyError`` for a missing key)."""
    hints = typing.get_type_hints(ToyWorldState)
    fields = {f.name: _unflatten(hints[f.name], f.name, flat) for f in dataclasses.fields(ToyWorldState)}
    return ToyWorldState(**fields)  # type: ignore[arg-type]


def _owned_state(flat: dict[str, torch.Tensor]) -> ToyWorldState:
    """The state of ``flat`` with every field its own contiguous copy: a step writes into some of
    them (the episode sums), so none may share memory with the caller or with another field, and a
    compiled step (whose guards check strides and aliasing) keeps the graph it compiled."""
    return _state_of_flat(
        {key: value.clone(memory_format=torch.contiguous_format) for key, value in flat.items()}
    )


def capturing_cuda_graph(device: torch.device) -> bool:
    """Whether the step running now is being captured into a CUDA graph (``--cuda-graph``)."""
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


class ToyWaypointEnv(BatchedWaypointEnv):
    """``num_envs`` toy driving worlds meeting ``BatchedWaypointEnv`` (``training/envs/protocol.py``).

    The worlds live in :attr:`state` (``None`` until the first ``reset``).
    """

    def __init__(
        self,
        config: ToyWorldConfig | None = None,
        device: str | torch.device = "cpu",
        *,
        compile_step: bool = False,
    ) -> None:
        self.config = config or ToyWorldConfig()
        self.config.validate()
        self.num_envs = self.config.num_envs
        self.device = torch.device(device)
        cfg = self.config
        self.spec = shared_layout_spec(
            cfg.bev_size_px, cfg.num_waypoints, cfg.waypoint_dt, cfg.policy_dt, cfg.max_episode_steps
        )
        self._start_index = int(round(cfg.lead_in_m / cfg.route_spacing_m))
        substep_times = [sub * cfg.sim_dt for sub in range(cfg.substeps)]
        self._setpoint_weights = setpoint_weights(cfg.num_waypoints, substep_times, cfg, self.device)
        self._substep_numbers = torch.arange(1, cfg.substeps + 1, device=self.device)
        # lateral offset and heading turn of every object: oncoming cars, then parked cars
        objects = [(cfg.vehicle_lateral_m, torch.pi)] * cfg.max_vehicles + [
            (cfg.obstacle_lateral_m, 0.0)
        ] * cfg.max_obstacles
        self._object_lateral, self._object_turn = torch.tensor(objects, device=self.device).unbind(-1)
        self.state: ToyWorldState | None = None
        # Off the CPU a step never reads a tensor back to the host (the autoreset then works on
        # every world); on the CPU reading is free and lets it work on the finished worlds only.
        self.sync_free = self.device.type != "cpu"
        if compile_step and self.device.type != "cpu":
            raise ValueError(f"{COMPILE_ON_CPU_ONLY} (device {self.device})")
        self.compile_step = compile_step
        self._new_bank()
        self._render_layout = render_layout(cfg, self.device, cfg.max_vehicles, cfg.max_obstacles)
        if compile_step:
            compiled = torch.compile(self._advance, fullgraph=True, dynamic=False)
            self._advance = with_graph_limit(compiled, _STEP_GRAPHS_PER_PROCESS)

    def _new_bank(self, first_seed: torch.Tensor | None = None) -> None:
        """A scenario bank for the current config, filled from ``first_seed`` if given (else on
        the next autoreset), so that steps do not pay for it."""
        size = self.num_envs * _BANK_STEPS if self.fixed_shapes else max(_CPU_BANK_MIN, 4 * self.num_envs)
        self._bank = ScenarioBank(self.config, size)
        self._bank_frames: Observation | None = None
        self._bank_steps_left = 0
        if first_seed is not None:
            self._refill_bank(first_seed)
            self._bank_steps_left = _BANK_STEPS

    def _refill_bank(self, first_seed: torch.Tensor) -> None:
        """Fill the bank from ``first_seed``; a compiled step's bank also holds each scenario's
        first observation, rendered here once (eagerly), so that its step renders every world once."""
        self._bank.refill(first_seed)
        if self.compile_step:
            self._bank_frames = self._episode_starts(self._bank.scenarios).obs

    def _episode_starts(self, scen: Scenarios) -> _EpisodeStart:
        """The car, its route coordinates and hint, and what it sees at the start of each scenario
        of ``scen`` (as ``reset``, or ``_start_episodes`` then ``_observe``, make them)."""
        vehicle = self._start_vehicle(scen)
        start_hint = torch.full_like(scen.start_speed, self._start_index, dtype=torch.int64)
        frenet, route_hint = self._project(scen, vehicle, start_hint)
        obs = self._render(vehicle, scen, frenet, torch.zeros_like(scen.start_speed))
        return _EpisodeStart(vehicle, frenet, route_hint, obs)

    @property
    def fixed_shapes(self) -> bool:
        """Whether every world autoresets through the same tensors at every step: where no host
        read is allowed, and where the step is compiled into one graph."""
        return self.sync_free or self.compile_step

    @property
    def difficulty(self) -> float:
        return self.config.difficulty

    def set_difficulty(self, difficulty: float) -> bool:
        """Scenarios generated from now on (resets and autoresets) use ``difficulty`` (0..1).

        Episodes under way keep their scenario; a curriculum raises the level between rollouts.
        """
        config = dataclasses.replace(self.config, difficulty=float(difficulty))
        config.validate()
        self.config = config
        self._new_bank()
        return True

    # ------------------------------------------------------------------ reset
    def reset(self, seed: int | None = None) -> Observation:
        """World ``i`` plays scenario ``seed + i``; without ``seed`` the next unused seeds (0 at first)."""
        if seed is not None:
            next_seed = torch.full((), int(seed), dtype=torch.int64, device=self.device)
        elif self.state is None:
            next_seed = torch.zeros((), dtype=torch.int64, device=self.device)
        else:
            next_seed = self.state.next_seed
        seeds = next_seed + torch.arange(self.num_envs, device=self.device)
        scenarios = generate_scenarios(seeds, self.config)
        self._new_bank(first_seed=next_seed + self.num_envs)
        vehicle, frenet, route_hint, obs = self._episode_starts(scenarios)
        zeros = torch.zeros(self.num_envs, device=self.device)
        state = ToyWorldState(
            vehicle=vehicle,
            scenarios=scenarios,
            acc=EpisodeSums.zeros(self.num_envs, self.device),
            frenet=frenet,
            route_hint=route_hint,
            t=torch.zeros(self.num_envs, dtype=torch.int64, device=self.device),
            time_s=zeros,
            best_s=zeros.clone(),
            scenario_seed=seeds,
            next_seed=next_seed + self.num_envs,
            obs=obs,
        )
        self.state = _owned_state(_flat_of_state(state))
        return obs

    def _start_vehicle(self, scen: Scenarios) -> VehicleState:
        """The car at the start of each world's scenario ``scen``: arc length 0, the scenario's
        lateral offset, heading error and speed."""
        zeros = torch.zeros_like(scen.start_speed)
        xy, road_heading = frenet_to_world(
            scen.route_xy, scen.route_heading, zeros[:, None], scen.start_lateral[:, None], self.config
        )
        return VehicleState(
            x=xy[:, 0, 0],
            y=xy[:, 0, 1],
            yaw=road_heading[:, 0] + scen.start_heading_error,
            speed=scen.start_speed,
            steer=zeros,
            accel=zeros,
        )

    def _start_episodes(self, mask: torch.Tensor, seeds: torch.Tensor) -> None:
        """Restart the worlds in ``mask`` on their scenario (already in ``state.scenarios``)."""
        st = self.state
        zeros = torch.zeros(self.num_envs, device=self.device)
        fresh = self._start_vehicle(st.scenarios)
        st.vehicle = VehicleState(
            *(torch.where(mask, getattr(fresh, f), getattr(st.vehicle, f)) for f in fresh.fields())
        )
        route_hint = torch.where(mask, torch.full_like(st.route_hint, self._start_index), st.route_hint)
        st.t = torch.where(mask, torch.zeros_like(st.t), st.t)
        st.time_s = torch.where(mask, zeros, st.time_s)
        st.best_s = torch.where(mask, zeros, st.best_s)
        st.scenario_seed = torch.where(mask, seeds, st.scenario_seed)
        st.acc = EpisodeSums(
            *(torch.where(mask, zeros, getattr(st.acc, f.name)) for f in dataclasses.fields(st.acc))
        )
        st.frenet, st.route_hint = self._project(st.scenarios, st.vehicle, route_hint)

    # ------------------------------------------------------------------ geometry
    def _project(
        self, scen: Scenarios, vehicle: VehicleState, route_hint: torch.Tensor
    ) -> tuple[Frenet, torch.Tensor]:
        """The rear axle of ``vehicle`` on the routes of ``scen``, and the new route index hint."""
        s, d, road_heading, hint = project_to_route(
            scen.route_xy,
            scen.route_heading,
            torch.stack([vehicle.x, vehicle.y], -1),
            route_hint,
            self.config,
        )
        return Frenet(s, d, road_heading), hint

    def _object_boxes(self, scen: Scenarios, time_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """World boxes ``[N, B, 3]`` (centre x, y, heading) of oncoming cars and parked cars."""
        cfg = self.config
        num_vehicles = scen.vehicle_s0.shape[1]
        veh_s = scen.vehicle_s0 - scen.vehicle_speed * time_s[:, None]
        s = torch.cat([veh_s, scen.obstacle_s], dim=1)
        xy, heading = frenet_to_world(
            scen.route_xy, scen.route_heading, s, self._object_lateral.expand_as(s), cfg
        )
        heading = heading + self._object_turn  # oncoming cars face the other way
        boxes = torch.cat([xy, heading[..., None]], dim=-1)
        return boxes[:, :num_vehicles], boxes[:, num_vehicles:]

    def _centre_frenet(
        self, s: torch.Tensor, d: torch.Tensor, heading_error: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        offset = self.config.length_m / 2 - self.config.rear_overhang_m
        return s + offset * torch.cos(heading_error), d + offset * torch.sin(heading_error)

    def _failures(
        self, frenet: Frenet, yaw: torch.Tensor, time_s: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Collision and off-road flags ``[N, T]`` of the car at ``T`` moments (route-frame box
        overlap); every argument is ``[N, T]``."""
        cfg, scen = self.config, self.state.scenarios
        s, d, road_heading = frenet
        heading_error = yaw - road_heading
        sc, dc = self._centre_frenet(s, d, heading_error)
        cos, sin = torch.cos(heading_error).abs(), torch.sin(heading_error).abs()
        half_s = (cfg.length_m / 2 * cos + cfg.width_m / 2 * sin + cfg.length_m / 2)[..., None]
        half_d = (cfg.length_m / 2 * sin + cfg.width_m / 2 * cos + cfg.width_m / 2)[..., None]
        sc, dc = sc[..., None], dc[..., None]
        veh_s = scen.vehicle_s0[:, None] - scen.vehicle_speed[:, None] * time_s[..., None]  # [N, T, V]
        hit_vehicle = (
            ((veh_s - sc).abs() < half_s)
            & ((cfg.vehicle_lateral_m - dc).abs() < half_d)
            & scen.vehicle_active[:, None]
        ).any(dim=-1)
        hit_obstacle = (
            ((scen.obstacle_s[:, None] - sc).abs() < half_s)
            & ((cfg.obstacle_lateral_m - dc).abs() < half_d)
            & scen.obstacle_active[:, None]
        ).any(dim=-1)
        off_road = (dc[..., 0] < cfg.drivable_right_m) | (dc[..., 0] > cfg.drivable_left_m)
        return hit_vehicle | hit_obstacle, off_road

    # ------------------------------------------------------------------ observation
    def _observe(self, index: torch.Tensor | None = None) -> Observation:
        """The observation of the current state (of the worlds in ``index`` only, when given)."""
        st = self.state
        return self._render(st.vehicle, st.scenarios, st.frenet, st.time_s, index)

    def _render(
        self,
        v: VehicleState,
        scen: Scenarios,
        frenet: Frenet,
        time_s: torch.Tensor,
        index: torch.Tensor | None = None,
    ) -> Observation:
        vehicles, obstacles = self._object_boxes(scen, time_s)
        pose = torch.stack([v.x, v.y, v.yaw], dim=-1)
        inputs = RenderInputs(
            route_xy=scen.route_xy,
            route_heading=scen.route_heading,
            ego_pose=pose,
            ego_s=frenet.s,
            vehicle_boxes=vehicles,
            vehicle_active=scen.vehicle_active,
            obstacle_boxes=obstacles,
            obstacle_active=scen.obstacle_active,
        )
        if index is not None:
            inputs = RenderInputs(*(getattr(inputs, f.name)[index] for f in dataclasses.fields(inputs)))
        bev = render_bev(inputs, self.config, self._render_layout)
        yaw_rate = v.speed * torch.tan(v.steer) / self.config.wheelbase_m
        to_goal = (self.config.route_length_m - frenet.s).clamp(0.0, self.config.route_length_m)
        state = torch.stack([v.speed, v.steer, v.accel, yaw_rate, to_goal], dim=-1)
        if index is not None:
            state = state[index]
        return Observation(bev=bev, state=state.float())

    def expert_waypoints(self) -> torch.Tensor:
        return self._expert_plan_of_now()()

    def _expert_plan_of_now(self) -> Callable[[], torch.Tensor]:
        """The expert's plan for the current state, computed when called (even after later steps:
        a step replaces the state's tensors, it never writes into them)."""
        v, scen, frenet, cfg = self.state.vehicle, self.state.scenarios, self.state.frenet, self.config
        return lambda: expert_plan(
            scen.route_xy, scen.route_heading, scen.target_speed, (v.x, v.y, v.yaw), v.speed, frenet, cfg
        )

    def route_xy_for_seeds(self, seeds: Sequence[int]) -> torch.Tensor:
        """Route centre lines ``[M, P, 2]`` (world frame) of the scenarios with these seeds, for drawing."""
        seeds_t = torch.tensor(seeds, dtype=torch.int64, device=self.device)
        return generate_scenarios(seeds_t, self.config).route_xy

    def ego_pose(self) -> torch.Tensor:
        v = self.state.vehicle
        return torch.stack([v.x, v.y, v.yaw], dim=-1)

    # ------------------------------------------------------------------ step
    def step(self, waypoints: torch.Tensor) -> StepResult:
        if self.state is None:
            raise RuntimeError("call reset() before step()")
        expected = (self.num_envs, self.config.num_waypoints, 2)
        if tuple(waypoints.shape) != expected:
            raise ValueError(f"waypoints must have shape {expected}, got {tuple(waypoints.shape)}")
        bank_start = self._bank_for_this_step() if self.fixed_shapes else None
        # the world is not differentiable; and a compiled step keeps one graph whatever the caller's mode
        with torch.no_grad():
            out = self._advance(waypoints.to(device=self.device, dtype=torch.float32), bank_start)
        info = StepInfo(
            expert=self._expert_plan_of_now(),
            final_observation=out.final_obs,
            episode=out.episode,
            lateral_deviation_m=out.lateral,
            speed_mps=out.speed,
            ego_pose=self.ego_pose(),
        )
        self.state.obs = out.obs
        return StepResult(out.obs, out.reward, out.terminated, out.truncated, info)

    def _advance(self, plan: torch.Tensor, bank_start: torch.Tensor | None) -> _Advanced:
        """The step's tensor work, from the plan to the next observation (state updated in place).

        No host bookkeeping happens here (the bank is refilled before), so with ``compile_step``
        it runs as one compiled graph of fixed shapes."""
        cfg = self.config
        finite = torch.isfinite(plan).all(dim=-1).all(dim=-1)
        plan = torch.where(finite[:, None, None], plan, torch.zeros_like(plan)).clamp(
            -_MAX_WAYPOINT_M, _MAX_WAYPOINT_M
        )
        v0 = self.state.vehicle
        origin = torch.zeros_like(plan[:, :1])
        plan_world = ego_to_world(torch.cat([origin, plan], dim=1), v0.x, v0.y, v0.yaw)
        speeds = plan_speeds(plan_world, cfg)
        s_before = self.state.frenet.s
        plan_terms = self._plan_quality(plan_world, speeds)
        collided, off_road, comfort = self._drive(plan_world, speeds)
        return self._finish_step(s_before, collided, off_road, plan_terms, comfort, bank_start)

    def _drive(
        self, plan_world: torch.Tensor, speeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, Comfort]:
        """Track the plan for ``substeps`` controller steps; a world stops at its first failure.

        The controller and the bicycle run substep by substep; where the car was at each substep
        (route coordinates, failures) is then computed for all substeps at once, and each world
        keeps the state of its first failing substep (its last when none failed). Returns the
        collision and off-road flags ``[N]`` and the step's comfort (means over the substeps driven).
        """
        cfg, st = self.config, self.state
        polyline = PlanPolyline.of(plan_world)
        setpoints = speeds @ self._setpoint_weights  # [N, T]: the speed set-point at each substep
        path = [st.vehicle]
        for sub in range(cfg.substeps):
            v = path[-1]
            steer_cmd = pure_pursuit_steer(v, polyline, cfg)
            accel_cmd = cfg.speed_gain * (setpoints[:, sub] - v.speed)
            path.append(bicycle_step(v, steer_cmd, accel_cmd, cfg, cfg.sim_dt))
        fields = VehicleState.fields()
        # [N, T + 1, F]: the state before the step, then after each substep
        track = torch.stack([getattr(v, f) for v in path for f in fields], dim=-1).view(
            self.num_envs, cfg.substeps + 1, len(fields)
        )
        after = track[:, 1:]
        time_s = st.time_s[:, None] + cfg.sim_dt * self._substep_numbers
        frenet, hints = self._project_track(after[..., :2])
        hit, off = self._failures(frenet, after[..., fields.index("yaw")], time_s)
        failed = hit | off
        # the substep each world ends at: its first failure, else the last
        last = torch.where(failed.any(dim=1), failed.int().argmax(dim=1), cfg.substeps - 1)
        live = self._substep_numbers <= last[:, None] + 1  # substeps driven
        comfort = self._add_comfort(track, live)
        pick = last[:, None]
        end = track.gather(1, (pick + 1)[..., None].expand(-1, -1, len(fields)))[:, 0]
        st.vehicle = VehicleState(*end.unbind(-1))
        st.time_s = time_s.gather(1, pick)[:, 0]
        st.frenet = Frenet(*(part.gather(1, pick)[:, 0] for part in frenet))
        st.route_hint = hints.gather(1, pick)[:, 0]
        return hit.gather(1, pick)[:, 0], off.gather(1, pick)[:, 0], comfort

    def _project_track(self, xy: torch.Tensor) -> tuple[Frenet, torch.Tensor]:
        """Route coordinates of the rear axle at ``T`` substeps (``xy`` ``[N, T, 2]``), each searched
        from the step's route hint moved on by the straight distance from the step's start."""
        st = self.state
        start = torch.stack([st.vehicle.x, st.vehicle.y], dim=-1)[:, None]
        moved = ((xy - start).norm(dim=-1) / self.config.route_spacing_m).long()
        s, d, heading, hints = project_points_to_route(
            st.scenarios.route_xy, st.scenarios.route_heading, xy, st.route_hint[:, None] + moved, self.config
        )
        return Frenet(s, d, heading), hints

    def _add_comfort(self, track: torch.Tensor, live: torch.Tensor) -> Comfort:
        """Add the driven substeps' |jerk| and |steering rate| to the episode sums; returns this
        step's means."""
        fields = VehicleState.fields()
        rates = (track[:, 1:] - track[:, :-1]).abs() / self.config.sim_dt  # [N, T, F]
        rates = rates * live[..., None]
        acc = self.state.acc
        jerk = rates[..., fields.index("accel")].sum(dim=1)
        steer_rate = rates[..., fields.index("steer")].sum(dim=1)
        driven = live.sum(dim=1)
        acc.jerk += jerk
        acc.steer_rate += steer_rate
        acc.substeps += driven
        return Comfort(jerk / driven, steer_rate / driven)

    def _plan_quality(
        self, plan_world: torch.Tensor, speeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean distance (m) of the plan's waypoints from the route centre line, and mean
        |planned speed - target speed| / v_road over its intervals, both ``[N]``."""
        cfg, scen = self.config, self.state.scenarios
        waypoints = plan_world[:, 1:]
        ahead = (waypoints - plan_world[:, :1]).norm(dim=-1).clamp(max=1e3) / cfg.route_spacing_m
        hint = self.state.route_hint[:, None] + ahead.long()
        s, d, _, _ = project_points_to_route(
            scen.route_xy, scen.route_heading, waypoints, hint, cfg, window=(-8, 8)
        )
        target = interpolate_profile(scen.target_speed, s, cfg)
        speed_error = (speeds - target).abs().mean(dim=1) / cfg.road_speed_mps
        return d.abs().mean(dim=1), speed_error

    def _reward(
        self,
        s_before: torch.Tensor,
        collided: torch.Tensor,
        off_road: torch.Tensor,
        plan_terms: tuple[torch.Tensor, torch.Tensor],
        comfort: Comfort,
    ) -> torch.Tensor:
        cfg, w, st = self.config, self.config.reward, self.state
        plan_lateral, plan_speed = plan_terms
        s, d, road_heading = st.frenet
        heading_error = torch.atan2(
            torch.sin(st.vehicle.yaw - road_heading), torch.cos(st.vehicle.yaw - road_heading)
        )
        _, dc = self._centre_frenet(s, d, heading_error)
        target = interpolate_profile(st.scenarios.target_speed, s[:, None], cfg)[:, 0]
        progress = (s - s_before) / (cfg.road_speed_mps * cfg.policy_dt)
        speed_error = (st.vehicle.speed - target).abs() / cfg.road_speed_mps
        return (
            w.progress * progress
            - w.speed * speed_error
            - w.lateral * dc.abs()
            - w.heading * heading_error.abs()
            - w.plan_lateral * plan_lateral
            - w.plan_speed * plan_speed
            - w.jerk * comfort.jerk
            - w.steer_rate * comfort.steer_rate
            - w.collision * collided.float()
            - w.off_road * off_road.float()
        )

    def _finish_step(
        self,
        s_before: torch.Tensor,
        collided: torch.Tensor,
        off_road: torch.Tensor,
        plan_terms: tuple[torch.Tensor, torch.Tensor],
        comfort: Comfort,
        bank_start: torch.Tensor | None,
    ) -> _Advanced:
        cfg, st = self.config, self.state
        reward = self._reward(s_before, collided, off_road, plan_terms, comfort)
        s, d, road_heading = st.frenet
        heading_error = st.vehicle.yaw - road_heading
        _, dc = self._centre_frenet(s, d, heading_error)
        st.t = st.t + 1
        st.best_s = torch.maximum(st.best_s, s)
        goal = s >= cfg.route_length_m
        terminated = collided | off_road | goal
        truncated = (st.t >= cfg.max_episode_steps) & ~terminated
        done = terminated | truncated
        st.acc.ret += reward
        st.acc.lat += dc.abs()
        substeps = st.acc.substeps.clamp_min(1.0)
        episode = EpisodeStats(
            done=done,
            episode_return=st.acc.ret.clone(),
            length=st.t.clone(),
            route_completion=(st.best_s / cfg.route_length_m).clamp(0.0, 1.0),
            collision=collided,
            off_road=off_road,
            goal_reached=goal & ~collided & ~off_road,
            mean_abs_lateral_m=st.acc.lat / st.t.clamp_min(1).float(),
            mean_abs_jerk=st.acc.jerk / substeps,
            mean_abs_steer_rate=st.acc.steer_rate / substeps,
            scenario_seed=st.scenario_seed.clone(),
        )
        speed = st.vehicle.speed.clone()
        final_obs = self._observe()
        obs = self._autoreset(done, final_obs, bank_start)
        return _Advanced(obs, reward, terminated, truncated, final_obs, episode, dc, speed)

    def _autoreset(
        self, done: torch.Tensor, final_obs: Observation, bank_start: torch.Tensor | None
    ) -> Observation:
        """Start new episodes in the finished worlds and return the observation to act on
        (``bank_start``: the bank's first seed on the fixed-shape path, else ``None``)."""
        if bank_start is not None:
            return self._autoreset_every_world(done, final_obs, bank_start)
        if not bool(done.any()):
            return final_obs
        return self._autoreset_finished_worlds(done, final_obs)

    def _autoreset_finished_worlds(self, done: torch.Tensor, final_obs: Observation) -> Observation:
        """The CPU path: reading ``done`` is free, so only the finished worlds get a new scenario
        and a new observation."""
        st = self.state
        seeds = self._next_seeds(done)
        index = done.nonzero()[:, 0]
        if not self._bank.holds(int(st.next_seed), len(index)):
            self._bank.refill(st.next_seed)
        fresh = self._bank.take(seeds[index])
        st.scenarios = Scenarios(
            *(
                getattr(st.scenarios, f.name).index_put((index,), getattr(fresh, f.name))
                for f in dataclasses.fields(Scenarios)
            )
        )
        self._restart(done, seeds)
        fresh_obs = self._observe(index)
        bev, state = final_obs.bev.clone(), final_obs.state.clone()
        bev[index] = fresh_obs.bev
        state[index] = fresh_obs.state
        return Observation(bev, state)

    def _autoreset_every_world(
        self, done: torch.Tensor, final_obs: Observation, bank_start: torch.Tensor
    ) -> Observation:
        """The fixed-shape path (off the CPU, with no host read, and in a compiled step): every
        world takes a scenario from the bank and its first observation (from the bank when it holds
        them, else every world is observed again); the finished worlds keep what they took."""
        st = self.state
        seeds = self._next_seeds(done)
        taken = torch.where(done, seeds, bank_start)
        fresh = self._bank.take(taken)
        st.scenarios = Scenarios(
            *(
                torch.where(
                    done.view(-1, *([1] * (getattr(fresh, f.name).dim() - 1))),
                    getattr(fresh, f.name),
                    getattr(st.scenarios, f.name),
                )
                for f in dataclasses.fields(st.scenarios)
            )
        )
        self._restart(done, seeds)
        if self._bank_frames is None:
            fresh_obs = self._observe()
        else:  # the finished worlds' first observations, rendered with the bank
            fresh_obs = self._bank_frames.index(self._bank.index_of(taken))
        mask = done[:, None]
        # final + done * (fresh - final), exact in uint8 (modulo 256): a compiled CPU kernel
        # runs it several times faster than a ``where`` whose condition is broadcast
        change = fresh_obs.bev.sub(final_obs.bev).mul_(mask.to(torch.uint8)[..., None, None])
        return Observation(final_obs.bev.add(change), torch.where(mask, fresh_obs.state, final_obs.state))

    def scenario_bank_start(self) -> torch.Tensor | None:
        """The scenario bank's first seed (a new tensor after each refill; ``None`` before the first)."""
        return self._bank.start

    def _bank_for_this_step(self) -> torch.Tensor:
        """Make sure the bank holds the seeds this step may take (at most ``num_envs``) and return
        its first seed: on the CPU refilled when it runs short (reading the next seed is free), off
        it on a fixed schedule."""
        st = self.state
        if not self.sync_free:
            if not self._bank.holds(int(st.next_seed), self.num_envs):
                self._refill_bank(st.next_seed)
        elif capturing_cuda_graph(self.device):
            # every replay of a captured step repeats it: its bank covers one step's seeds, and
            # the next eager step refills a whole bank
            self._bank.refill_front(st.next_seed, self.num_envs)
            self._bank_steps_left = 0
        elif self._bank_steps_left == 0:
            self._bank.refill(st.next_seed)
            self._bank_steps_left = _BANK_STEPS - 1  # this step uses it too
        else:
            self._bank_steps_left -= 1
        return self._bank.start

    def _next_seeds(self, done: torch.Tensor) -> torch.Tensor:
        """Each world's scenario seed after this step: the next unused seeds for the finished
        worlds, in world order; the others keep theirs."""
        order = torch.cumsum(done.long(), dim=0) - 1
        return torch.where(done, self.state.next_seed + order, self.state.scenario_seed)

    def _restart(self, done: torch.Tensor, seeds: torch.Tensor) -> None:
        """Count the seeds the finished worlds took and start their episodes (scenarios in place)."""
        self.state.next_seed = self.state.next_seed + done.long().sum()
        self._start_episodes(done, seeds)

    def close(self) -> None:
        """Nothing to release: the worlds live in this process's tensors."""

    # ------------------------------------------------------------------ save and restore
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of :attr:`state` (CPU copies) under its dotted key, so a resumed run
        continues exactly."""
        if self.state is None:
            raise RuntimeError("call reset() before state_dict()")
        return {k: v.detach().cpu().clone() for k, v in _flat_of_state(self.state).items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Observation:
        """Restore what :meth:`state_dict` returned; returns the observation to act on next."""
        dev = {k: v.to(self.device) for k, v in state.items()}
        try:
            restored = _owned_state(dev)
        except KeyError as missing:
            raise ValueError(f"world state lacks {missing}") from None
        if restored.t.shape[0] != self.num_envs:
            raise ValueError(f"world state holds {restored.t.shape[0]} worlds, this env has {self.num_envs}")
        self.state = restored
        self._new_bank()
        return restored.obs
