"""``ToyWaypointEnv``: a batch of toy driving worlds as tensors on any device.

Each ``step`` converts the plan to the world frame, runs the controller and the kinematic
bicycle for ``policy_dt / sim_dt`` substeps (checking collision and off-road at every
substep), scores the step, autoresets finished worlds and renders the next observation.
There is no Python loop over worlds; on CUDA there is no host synchronisation in a step.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from training.envs.protocol import BatchedWaypointEnv, EpisodeStats, Observation, StepInfo, StepResult
from training.envs.toy.config import ToyWorldConfig, shared_layout_spec
from training.envs.toy.dynamics import (
    VehicleState,
    bicycle_step,
    ego_to_world,
    plan_speeds,
    pure_pursuit_steer,
    speed_command,
)
from training.envs.toy.expert import expert_plan
from training.envs.toy.render import RenderInputs, render_bev
from training.envs.toy.scenario import (
    Scenarios,
    frenet_to_world,
    generate_scenarios,
    interpolate_profile,
    project_points_to_route,
    project_to_route,
)

_MAX_WAYPOINT_M = 200.0  # plans are clamped to this distance; non-finite plans mean "stop here"


class ToyWaypointEnv(BatchedWaypointEnv):
    """``num_envs`` toy driving worlds meeting ``BatchedWaypointEnv`` (``training/envs/protocol.py``)."""

    def __init__(self, config: ToyWorldConfig | None = None, device: str | torch.device = "cpu") -> None:
        self.config = config or ToyWorldConfig()
        self.config.validate()
        self.num_envs = self.config.num_envs
        self.device = torch.device(device)
        cfg = self.config
        self.spec = shared_layout_spec(
            cfg.bev_size_px, cfg.num_waypoints, cfg.waypoint_dt, cfg.policy_dt, cfg.max_episode_steps
        )
        self._next_seed = torch.zeros((), dtype=torch.int64, device=self.device)
        self._seeded = False
        self._start_index = int(round(cfg.lead_in_m / cfg.route_spacing_m))
        self._obs: Observation | None = None

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
        return True

    # ------------------------------------------------------------------ reset
    def reset(self, seed: int | None = None) -> Observation:
        if seed is not None:
            self._next_seed.fill_(int(seed))
        elif not self._seeded:
            self._next_seed.zero_()
        self._seeded = True
        seeds = self._next_seed + torch.arange(self.num_envs, device=self.device)
        self._next_seed += self.num_envs
        self.scenarios = generate_scenarios(seeds, self.config)
        self.scenario_seed = seeds
        self._start_episodes(
            torch.ones(self.num_envs, dtype=torch.bool, device=self.device), self.scenarios, seeds
        )
        self._obs = self._observe()
        return self._obs

    def _start_episodes(self, mask: torch.Tensor, scen: Scenarios, seeds: torch.Tensor) -> None:
        """(Re)initialise the worlds in ``mask`` from ``scen`` (already blended in)."""
        cfg = self.config
        zeros = torch.zeros(self.num_envs, device=self.device)
        start_s = zeros
        xy, road_heading = frenet_to_world(
            scen.route_xy, scen.route_heading, start_s[:, None], scen.start_lateral[:, None], cfg
        )
        fresh = VehicleState(
            x=xy[:, 0, 0],
            y=xy[:, 0, 1],
            yaw=road_heading[:, 0] + scen.start_heading_error,
            speed=scen.start_speed,
            steer=zeros,
            accel=zeros,
        )
        if not hasattr(self, "vehicle"):
            self.vehicle = fresh
            self.route_hint = torch.full((self.num_envs,), self._start_index, device=self.device)
            self.t = torch.zeros(self.num_envs, dtype=torch.int64, device=self.device)
            self.time_s = zeros.clone()
            self._acc = {name: zeros.clone() for name in ("ret", "lat", "jerk", "steer_rate", "substeps")}
            self.best_s = zeros.clone()
            self.scenario_seed = seeds.clone()
        else:
            self.vehicle = VehicleState(
                *(torch.where(mask, getattr(fresh, f), getattr(self.vehicle, f)) for f in fresh.fields())
            )
        self.route_hint = torch.where(
            mask, torch.full_like(self.route_hint, self._start_index), self.route_hint
        )
        self.t = torch.where(mask, torch.zeros_like(self.t), self.t)
        self.time_s = torch.where(mask, zeros, self.time_s)
        self.best_s = torch.where(mask, zeros, self.best_s)
        self.scenario_seed = torch.where(mask, seeds, self.scenario_seed)
        for name, value in self._acc.items():
            self._acc[name] = torch.where(mask, zeros, value)
        self._frenet = self._project()

    # ------------------------------------------------------------------ geometry
    def _project(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        v = self.vehicle
        s, d, road_heading, hint = project_to_route(
            self.scenarios.route_xy,
            self.scenarios.route_heading,
            torch.stack([v.x, v.y], -1),
            self.route_hint,
            self.config,
        )
        self.route_hint = hint
        return s, d, road_heading

    def _object_boxes(self) -> tuple[torch.Tensor, torch.Tensor]:
        """World boxes ``[N, B, 3]`` (centre x, y, heading) of oncoming cars and parked cars."""
        cfg, scen = self.config, self.scenarios
        veh_s = scen.vehicle_s0 - scen.vehicle_speed * self.time_s[:, None]
        veh_xy, veh_h = frenet_to_world(
            scen.route_xy, scen.route_heading, veh_s, torch.full_like(veh_s, cfg.vehicle_lateral_m), cfg
        )
        obs_xy, obs_h = frenet_to_world(
            scen.route_xy,
            scen.route_heading,
            scen.obstacle_s,
            torch.full_like(scen.obstacle_s, cfg.obstacle_lateral_m),
            cfg,
        )
        vehicles = torch.cat([veh_xy, (veh_h + torch.pi)[..., None]], dim=-1)
        obstacles = torch.cat([obs_xy, obs_h[..., None]], dim=-1)
        return vehicles, obstacles

    def _centre_frenet(
        self, s: torch.Tensor, d: torch.Tensor, heading_error: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        offset = self.config.length_m / 2 - self.config.rear_overhang_m
        return s + offset * torch.cos(heading_error), d + offset * torch.sin(heading_error)

    def _failures(
        self, s: torch.Tensor, d: torch.Tensor, road_heading: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Collision and off-road flags ``[N]`` for the current state (route-frame box overlap)."""
        cfg, scen = self.config, self.scenarios
        heading_error = self.vehicle.yaw - road_heading
        sc, dc = self._centre_frenet(s, d, heading_error)
        cos, sin = torch.cos(heading_error).abs(), torch.sin(heading_error).abs()
        half_s = cfg.length_m / 2 * cos + cfg.width_m / 2 * sin + cfg.length_m / 2
        half_d = cfg.length_m / 2 * sin + cfg.width_m / 2 * cos + cfg.width_m / 2
        veh_s = scen.vehicle_s0 - scen.vehicle_speed * self.time_s[:, None]
        hit_vehicle = (
            ((veh_s - sc[:, None]).abs() < half_s[:, None])
            & ((cfg.vehicle_lateral_m - dc[:, None]).abs() < half_d[:, None])
            & scen.vehicle_active
        ).any(dim=1)
        hit_obstacle = (
            ((scen.obstacle_s - sc[:, None]).abs() < half_s[:, None])
            & ((cfg.obstacle_lateral_m - dc[:, None]).abs() < half_d[:, None])
            & scen.obstacle_active
        ).any(dim=1)
        off_road = (dc < cfg.drivable_right_m) | (dc > cfg.drivable_left_m)
        return hit_vehicle | hit_obstacle, off_road

    # ------------------------------------------------------------------ observation
    def _observe(self, index: torch.Tensor | None = None) -> Observation:
        vehicles, obstacles = self._object_boxes()
        v = self.vehicle
        pose = torch.stack([v.x, v.y, v.yaw], dim=-1)
        inputs = RenderInputs(
            route_xy=self.scenarios.route_xy,
            route_heading=self.scenarios.route_heading,
            ego_pose=pose,
            ego_s=self._frenet[0],
            vehicle_boxes=vehicles,
            vehicle_active=self.scenarios.vehicle_active,
            obstacle_boxes=obstacles,
            obstacle_active=self.scenarios.obstacle_active,
        )
        if index is not None:
            inputs = RenderInputs(*(getattr(inputs, f.name)[index] for f in dataclasses.fields(inputs)))
        bev = render_bev(inputs, self.config)
        yaw_rate = v.speed * torch.tan(v.steer) / self.config.wheelbase_m
        to_goal = (self.config.route_length_m - self._frenet[0]).clamp(0.0, self.config.route_length_m)
        state = torch.stack([v.speed, v.steer, v.accel, yaw_rate, to_goal], dim=-1)
        if index is not None:
            state = state[index]
        return Observation(bev=bev, state=state.float())

    def expert_waypoints(self) -> torch.Tensor:
        v = self.vehicle
        return expert_plan(
            self.scenarios.route_xy,
            self.scenarios.route_heading,
            self.scenarios.target_speed,
            (v.x, v.y, v.yaw),
            v.speed,
            self._frenet,
            self.config,
        )

    def route_xy_for_seeds(self, seeds: Sequence[int]) -> torch.Tensor:
        """Route centre lines ``[M, P, 2]`` (world frame) of the scenarios with these seeds, for drawing."""
        seeds_t = torch.tensor(seeds, dtype=torch.int64, device=self.device)
        return generate_scenarios(seeds_t, self.config).route_xy

    def ego_pose(self) -> torch.Tensor:
        return torch.stack([self.vehicle.x, self.vehicle.y, self.vehicle.yaw], dim=-1)

    # ------------------------------------------------------------------ step
    def step(self, waypoints: torch.Tensor) -> StepResult:
        if self._obs is None:
            raise RuntimeError("call reset() before step()")
        cfg = self.config
        expected = (self.num_envs, cfg.num_waypoints, 2)
        if tuple(waypoints.shape) != expected:
            raise ValueError(f"waypoints must have shape {expected}, got {tuple(waypoints.shape)}")
        plan = waypoints.to(device=self.device, dtype=torch.float32)
        finite = torch.isfinite(plan).all(dim=-1).all(dim=-1)
        plan = torch.where(finite[:, None, None], plan, torch.zeros_like(plan)).clamp(
            -_MAX_WAYPOINT_M, _MAX_WAYPOINT_M
        )

        v0 = self.vehicle
        origin = torch.zeros_like(plan[:, :1])
        plan_world = ego_to_world(torch.cat([origin, plan], dim=1), v0.x, v0.y, v0.yaw)
        speeds = plan_speeds(plan_world, cfg)
        s_before = self._frenet[0]
        plan_terms = self._plan_quality(plan_world, speeds)
        collided = torch.zeros(self.num_envs, dtype=torch.bool, device=self.device)
        off_road = torch.zeros_like(collided)
        for sub in range(cfg.substeps):
            self._substep(plan_world, speeds, sub * cfg.sim_dt, collided | off_road)
            hit, off = self._failures(*self._frenet)
            collided |= hit
            off_road |= off
        return self._finish_step(s_before, collided, off_road, plan_terms)

    def _substep(
        self, plan_world: torch.Tensor, speeds: torch.Tensor, time_in_plan: float, frozen: torch.Tensor
    ) -> None:
        cfg, v = self.config, self.vehicle
        steer_cmd = pure_pursuit_steer(v, plan_world, cfg)
        accel_cmd = speed_command(v, speeds, time_in_plan, cfg)
        nxt = bicycle_step(v, steer_cmd, accel_cmd, cfg, cfg.sim_dt)
        nxt = VehicleState(*(torch.where(frozen, getattr(v, f), getattr(nxt, f)) for f in v.fields()))
        live = (~frozen).float()
        self._acc["jerk"] += live * ((nxt.accel - v.accel) / cfg.sim_dt).abs()
        self._acc["steer_rate"] += live * ((nxt.steer - v.steer) / cfg.sim_dt).abs()
        self._acc["substeps"] += live
        self.vehicle = nxt
        self.time_s = self.time_s + live * cfg.sim_dt
        self._frenet = self._project()

    def _plan_quality(
        self, plan_world: torch.Tensor, speeds: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean distance (m) of the plan's waypoints from the route centre line, and mean
        |planned speed - target speed| / v_road over its intervals, both ``[N]``."""
        cfg = self.config
        waypoints = plan_world[:, 1:]
        ahead = (waypoints - plan_world[:, :1]).norm(dim=-1).clamp(max=1e3) / cfg.route_spacing_m
        hint = self.route_hint[:, None] + ahead.long()
        s, d, _, _ = project_points_to_route(
            self.scenarios.route_xy, self.scenarios.route_heading, waypoints, hint, cfg, window=(-8, 8)
        )
        target = interpolate_profile(self.scenarios.target_speed, s, cfg)
        speed_error = (speeds - target).abs().mean(dim=1) / cfg.road_speed_mps
        return d.abs().mean(dim=1), speed_error

    def _reward(
        self,
        s_before: torch.Tensor,
        collided: torch.Tensor,
        off_road: torch.Tensor,
        plan_terms: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        cfg, w = self.config, self.config.reward
        plan_lateral, plan_speed = plan_terms
        s, d, road_heading = self._frenet
        heading_error = torch.atan2(
            torch.sin(self.vehicle.yaw - road_heading), torch.cos(self.vehicle.yaw - road_heading)
        )
        _, dc = self._centre_frenet(s, d, heading_error)
        target = interpolate_profile(self.scenarios.target_speed, s[:, None], cfg)[:, 0]
        progress = (s - s_before) / (cfg.road_speed_mps * cfg.policy_dt)
        speed_error = (self.vehicle.speed - target).abs() / cfg.road_speed_mps
        return (
            w.progress * progress
            - w.speed * speed_error
            - w.lateral * dc.abs()
            - w.heading * heading_error.abs()
            - w.plan_lateral * plan_lateral
            - w.plan_speed * plan_speed
            - w.collision * collided.float()
            - w.off_road * off_road.float()
        )

    def _finish_step(
        self,
        s_before: torch.Tensor,
        collided: torch.Tensor,
        off_road: torch.Tensor,
        plan_terms: tuple[torch.Tensor, torch.Tensor],
    ) -> StepResult:
        cfg = self.config
        reward = self._reward(s_before, collided, off_road, plan_terms)
        s, d, road_heading = self._frenet
        heading_error = self.vehicle.yaw - road_heading
        _, dc = self._centre_frenet(s, d, heading_error)
        self.t = self.t + 1
        self.best_s = torch.maximum(self.best_s, s)
        goal = s >= cfg.route_length_m
        terminated = collided | off_road | goal
        truncated = (self.t >= cfg.max_episode_steps) & ~terminated
        done = terminated | truncated
        self._acc["ret"] += reward
        self._acc["lat"] += dc.abs()
        substeps = self._acc["substeps"].clamp_min(1.0)
        episode = EpisodeStats(
            done=done,
            episode_return=self._acc["ret"].clone(),
            length=self.t.clone(),
            route_completion=(self.best_s / cfg.route_length_m).clamp(0.0, 1.0),
            collision=collided,
            off_road=off_road,
            goal_reached=goal & ~collided & ~off_road,
            mean_abs_lateral_m=self._acc["lat"] / self.t.clamp_min(1).float(),
            mean_abs_jerk=self._acc["jerk"] / substeps,
            mean_abs_steer_rate=self._acc["steer_rate"] / substeps,
            scenario_seed=self.scenario_seed.clone(),
        )
        speed = self.vehicle.speed.clone()
        final_obs = self._observe()
        obs = self._autoreset(done, final_obs)
        info = StepInfo(
            expert_waypoints=self.expert_waypoints(),
            final_observation=final_obs,
            episode=episode,
            lateral_deviation_m=dc,
            speed_mps=speed,
            ego_pose=self.ego_pose(),
        )
        self._obs = obs
        return StepResult(obs, reward, terminated, truncated, info)

    def _autoreset(self, done: torch.Tensor, final_obs: Observation) -> Observation:
        """Start new episodes in the finished worlds and return the observation to act on."""
        on_cpu = self.device.type == "cpu"
        if on_cpu and not bool(done.any()):
            return final_obs
        order = torch.cumsum(done.long(), dim=0) - 1
        seeds = torch.where(done, self._next_seed + order, self.scenario_seed)
        self._next_seed += done.long().sum()
        if on_cpu:  # generate only the finished worlds' scenarios (a scenario depends only on its seed)
            index = done.nonzero()[:, 0]
            fresh = generate_scenarios(seeds[index], self.config)
            for f in dataclasses.fields(Scenarios):
                getattr(self.scenarios, f.name)[index] = getattr(fresh, f.name)
        else:  # no host synchronisation: generate for every world and keep the finished ones'
            fresh = generate_scenarios(seeds, self.config)
            self.scenarios = Scenarios(
                *(
                    torch.where(
                        done.view(-1, *([1] * (getattr(fresh, f.name).dim() - 1))),
                        getattr(fresh, f.name),
                        getattr(self.scenarios, f.name),
                    )
                    for f in dataclasses.fields(Scenarios)
                )
            )
        self._start_episodes(done, self.scenarios, seeds)
        if on_cpu:
            fresh_obs = self._observe(index)
            bev, state = final_obs.bev.clone(), final_obs.state.clone()
            bev[index] = fresh_obs.bev
            state[index] = fresh_obs.state
            return Observation(bev, state)
        fresh_obs = self._observe()
        mask = done[:, None]
        return Observation(
            torch.where(mask[..., None, None], fresh_obs.bev, final_obs.bev),
            torch.where(mask, fresh_obs.state, final_obs.state),
        )

    def close(self) -> None:
        """Nothing to release: the worlds live in this process's tensors."""

    # ------------------------------------------------------------------ save and restore
    def state_dict(self) -> dict[str, torch.Tensor]:
        """Every tensor of the worlds' state (CPU copies), so a resumed run continues exactly."""
        if self._obs is None:
            raise RuntimeError("call reset() before state_dict()")
        state = {f"vehicle.{f}": getattr(self.vehicle, f) for f in self.vehicle.fields()}
        state |= {
            f"scenarios.{f.name}": getattr(self.scenarios, f.name) for f in dataclasses.fields(Scenarios)
        }
        state |= {f"acc.{k}": v for k, v in self._acc.items()}
        state |= {f"frenet.{i}": v for i, v in enumerate(self._frenet)}
        state |= {
            "route_hint": self.route_hint,
            "t": self.t,
            "time_s": self.time_s,
            "best_s": self.best_s,
            "scenario_seed": self.scenario_seed,
            "next_seed": self._next_seed,
            "obs.bev": self._obs.bev,
            "obs.state": self._obs.state,
        }
        return {k: v.detach().cpu().clone() for k, v in state.items()}

    def load_state_dict(self, state: dict[str, torch.Tensor]) -> Observation:
        """Restore what :meth:`state_dict` returned; returns the observation to act on next."""
        try:
            dev = {k: v.to(self.device) for k, v in state.items()}
            self.vehicle = VehicleState(*(dev[f"vehicle.{f}"] for f in VehicleState.fields()))
            self.scenarios = Scenarios(*(dev[f"scenarios.{f.name}"] for f in dataclasses.fields(Scenarios)))
            self._acc = {k[len("acc.") :]: v for k, v in dev.items() if k.startswith("acc.")}
            self._frenet = (dev["frenet.0"], dev["frenet.1"], dev["frenet.2"])
            self.route_hint, self.t, self.time_s = dev["route_hint"], dev["t"], dev["time_s"]
            self.best_s, self.scenario_seed = dev["best_s"], dev["scenario_seed"]
            self._next_seed = dev["next_seed"]
            self._obs = Observation(dev["obs.bev"], dev["obs.state"])
        except KeyError as missing:
            raise ValueError(f"world state lacks {missing}") from None
        if self.t.shape[0] != self.num_envs:
            raise ValueError(f"world state holds {self.t.shape[0]} worlds, this env has {self.num_envs}")
        self._seeded = True
        return self._obs
