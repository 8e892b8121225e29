"""One MetaDrive world behind the waypoint protocol, as plain numpy in and out (runs in a worker).

Each ``step`` turns the plan (ego frame at the observation) into the world frame, runs the toy
world's tracking controller (pure pursuit + speed control) at MetaDrive's 10 Hz decision rate for
``policy_dt`` seconds, mapping its steering angle and acceleration to MetaDrive's
``[steering, throttle_brake]`` action, then scores the step the way the toy world does. The ego's
reference point is the rear axle, as in the toy world.

The expert drives like MetaDrive's ``IDMPolicy``: the IDM's routing and lane-change logic picks the
lane, and the plan follows that lane's centre line along the route (the toy expert's plan, with its
critically damped return to the centre line), at MetaDrive's IDM cruise speed (30 km/h), slowed for
curves and to stop behind the nearest vehicle or obstacle ahead in that lane.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
from metadrive.component.vehicle.base_vehicle import BaseVehicle
from metadrive.policy.idm_policy import IDMPolicy

from training.envs.metadrive.config import MetaDriveWorldConfig
from training.envs.metadrive.frames import WorldFrame, WorldStep
from training.envs.metadrive.headless import SCENARIO_SEED_SPACE, HeadlessMetaDriveEnv
from training.envs.metadrive.raster import BevRasteriser, build_drivable_grid
from training.envs.metadrive.route import build_local_route, speed_profile
from training.envs.toy.dynamics import (
    VehicleState,
    ego_to_world,
    plan_speeds,
    pure_pursuit_steer,
    speed_command,
)
from training.envs.toy.expert import expert_plan
from training.envs.toy.scenario import interpolate_profile, project_points_to_route

_MAX_WAYPOINT_M = 200.0  # as in the toy world: plans are clamped; non-finite plans mean "stop here"
_COLLISION_KEYS = ("crash_vehicle", "crash_object", "crash_building", "crash_human")


@dataclass
class _Motion:
    """Ego kinematics read after each MetaDrive decision step."""

    speed: float = 0.0
    yaw: float = 0.0
    steer: float = 0.0  # front wheel angle, rad
    accel: float = 0.0
    yaw_rate: float = 0.0


class MetaDriveWorld:
    """A ``HeadlessMetaDriveEnv`` with the adapter's controller, expert, BEV and reward."""

    def __init__(self, config: MetaDriveWorldConfig) -> None:
        config.validate()
        self.config = config
        self.geometry = config.geometry
        self.env = HeadlessMetaDriveEnv(config.metadrive_config())
        self.rasteriser = BevRasteriser(self.geometry, config.subpixels)
        self.ego_index = round(self.geometry.lead_in_m / self.geometry.route_spacing_m)
        self.rear_offset_m = self.geometry.length_m / 2 - self.geometry.rear_overhang_m
        # A fresh engine's first episode spawns its traffic differently from every later one (measured:
        # the same seed drove differently); one throw-away episode makes every scenario a later one.
        self.env.reset(seed=0)

    # ------------------------------------------------------------------ episode
    def reset(self, seed: int) -> WorldFrame:
        metadrive_seed = int(seed) % SCENARIO_SEED_SPACE
        self.env.reset(seed=metadrive_seed)
        self.ego = self.env.agent
        self.navigation = self.ego.navigation
        self.idm = IDMPolicy(control_object=self.ego, random_seed=metadrive_seed)
        self.grid = build_drivable_grid(
            self.navigation.map.road_network.get_all_lanes(), self.config.drivable_grid_m
        )
        self.motion = _Motion(speed=float(self.ego.speed), yaw=float(self.ego.heading_theta))
        self.t = 0
        self.totals = dict.fromkeys(("return", "lateral", "jerk", "steer_rate", "substeps"), 0.0)
        self.best_completion = 0.0
        self._refresh()
        return self.frame

    def close(self) -> None:
        self.env.close()

    # ------------------------------------------------------------------ geometry
    def _pose(self) -> np.ndarray:
        x, y = self.ego.position
        yaw = self.motion.yaw
        return np.array(
            [x - self.rear_offset_m * math.cos(yaw), y - self.rear_offset_m * math.sin(yaw), yaw], np.float32
        )

    def _route_tensors(self) -> tuple[torch.Tensor, torch.Tensor]:
        return torch.from_numpy(self.route.xy)[None], torch.from_numpy(self.route.heading)[None]

    def _project(self, points_world: np.ndarray) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route coordinates ``s, d, heading`` ``[Q]`` of world points ``[Q, 2]`` (any distance along)."""
        route_xy, route_heading = self._route_tensors()
        points = torch.as_tensor(points_world, dtype=torch.float32)[None]
        hint = torch.full(points.shape[:2], self.ego_index, dtype=torch.int64)
        window = (-self.ego_index, route_xy.shape[1] - self.ego_index)
        s, d, heading, _ = project_points_to_route(
            route_xy, route_heading, points, hint, self.geometry, window
        )
        return s[0], d[0], heading[0]

    def _nearby_objects(self) -> tuple[np.ndarray, np.ndarray, list[float]]:
        """Boxes ``[B, 5]`` (x, y, heading, length, width) of other vehicles and of static
        objects within the search radius, and each vehicle's speed (m/s)."""
        found = self.ego.lidar.get_surrounding_objects(self.ego, radius=self.config.object_search_radius_m)
        vehicles, obstacles, speeds = [], [], []
        for obj in sorted(found, key=lambda o: o.name):  # a set: sort for determinism
            box = [*obj.position, obj.heading_theta, obj.LENGTH, obj.WIDTH]
            if isinstance(obj, BaseVehicle):
                vehicles.append(box)
                speeds.append(float(obj.speed))
            else:
                obstacles.append(box)
        as_boxes = lambda rows: np.asarray(rows, dtype=np.float64).reshape(-1, 5)  # noqa: E731
        return as_boxes(vehicles), as_boxes(obstacles), speeds

    def _expert_lane(self) -> object:
        """The lane MetaDrive's IDM policy steers to now (``IDMPolicy.act`` without acting)."""
        idm = self.idm
        # Called once per 0.1 s, the IDM spends one call on a lane of the new road that merely
        # connects to its old lane before re-syncing to the ego's own lane on the next call; at our
        # 0.5 s that one call would plan a spurious lane change, so the first call only catches up.
        idm.move_to_next_road()
        on_route = idm.move_to_next_road()
        if not (on_route and idm.enable_lane_change):
            return idm.routing_target_lane
        try:
            return idm.lane_change_policy(idm.control_object.lidar.get_surrounding_objects(self.ego))[2]
        except Exception:  # IDMPolicy.act falls back to its routing lane on any error; so do we
            return idm.routing_target_lane

    # ------------------------------------------------------------------ observation
    def _refresh(self) -> None:
        """Rebuild the local route, the BEV, the expert plan and the state for the current moment."""
        g, cfg = self.geometry, self.config
        pose = self._pose()
        self.route = build_local_route(
            self._expert_lane(),
            pose[:2].astype(np.float64),
            self.navigation.checkpoints,
            self.navigation.map.road_network.graph,
            g.lead_in_m,
            cfg.route_ahead_m,
            g.route_spacing_m,
        )
        vehicles, obstacles, vehicle_speeds = self._nearby_objects()
        bev = self.rasteriser.render(pose.astype(np.float64), self.grid, self.route.xy, vehicles, obstacles)
        s, d, heading = self._project(np.stack([pose[:2], np.asarray(self.ego.position)]))
        self.frenet = (s[:1], d[:1], heading[:1])  # rear axle
        self.centre_d = float(d[1])
        self.centre_heading = float(heading[1])
        self.road_speed = speed_profile(
            self.route, g.route_spacing_m, g.road_speed_mps, g.max_lateral_accel, g.comfort_decel
        )
        expert = self._expert(pose, vehicles, obstacles, vehicle_speeds)
        to_goal = max(0.0, self.navigation.total_length - self.navigation.travelled_length)
        m = self.motion
        state = np.array([m.speed, m.steer, m.accel, m.yaw_rate, to_goal], dtype=np.float32)
        self.frame = WorldFrame(bev, state, expert, pose, self.centre_d, m.speed)

    def _expert(
        self, pose: np.ndarray, vehicles: np.ndarray, obstacles: np.ndarray, vehicle_speeds: list[float]
    ) -> np.ndarray:
        g = self.geometry
        stop_index, lead_speed = self._stop_point(vehicles, obstacles, vehicle_speeds)
        target = speed_profile(
            self.route,
            g.route_spacing_m,
            g.road_speed_mps,
            g.max_lateral_accel,
            g.comfort_decel,
            stop_index,
            lead_speed,
        )
        route_xy, route_heading = self._route_tensors()
        x, y, yaw = (torch.tensor([float(v)]) for v in pose)
        plan = expert_plan(
            route_xy,
            route_heading,
            torch.from_numpy(target)[None],
            (x, y, yaw),
            torch.tensor([self.motion.speed]),
            self.frenet,
            g,
        )
        return plan[0].numpy().astype(np.float32)

    def _stop_point(
        self, vehicles: np.ndarray, obstacles: np.ndarray, vehicle_speeds: list[float]
    ) -> tuple[float | None, float]:
        """Route index where the rear axle must stop behind the nearest object ahead in the
        expert's lane, and that object's speed along the route; ``(None, 0)`` when the lane is clear."""
        g, cfg = self.geometry, self.config
        boxes = np.concatenate([vehicles, obstacles])
        if len(boxes) == 0:
            return None, 0.0
        speeds = np.concatenate([np.asarray(vehicle_speeds), np.zeros(len(obstacles))])
        # Where each object is now and, at constant velocity, in the next seconds: a car crossing
        # at an intersection blocks the lane where it will cross, with no speed along the route.
        horizon = np.arange(0.0, cfg.conflict_horizon_s + 1e-9, g.waypoint_dt)
        direction = np.stack([np.cos(boxes[:, 2]), np.sin(boxes[:, 2])], axis=-1)
        future = boxes[None, :, :2] + horizon[:, None, None] * speeds[None, :, None] * direction[None]
        s, d, heading = (v.numpy().reshape(len(horizon), -1) for v in self._project(future.reshape(-1, 2)))
        ahead = (s > self.frenet[0].item() + self.rear_offset_m) & (np.abs(d) < cfg.lead_search_half_width_m)
        if not ahead.any():
            return None, 0.0
        s_blocked = np.where(ahead, s, np.inf).min(axis=0)  # [B]: nearest blocked place per object
        lead = int(np.argmin(s_blocked))
        now_in_lane = bool(ahead[0, lead])
        along = math.cos(boxes[lead, 2] - heading[0, lead])
        lead_speed = max(0.0, float(speeds[lead] * along)) if now_in_lane else 0.0
        s = s_blocked
        front_m = g.length_m - g.rear_overhang_m  # rear axle to front bumper
        stop_s = s[lead] - boxes[lead, 3] / 2 - front_m - cfg.lead_gap_m - cfg.lead_time_gap_s * lead_speed
        return (stop_s + g.lead_in_m) / g.route_spacing_m, lead_speed

    # ------------------------------------------------------------------ step
    def step(self, waypoints: np.ndarray) -> WorldStep:
        g, cfg = self.geometry, self.config
        plan = np.asarray(waypoints, dtype=np.float32)
        if not np.isfinite(plan).all():
            plan = np.zeros_like(plan)
        plan = np.clip(plan, -_MAX_WAYPOINT_M, _MAX_WAYPOINT_M)
        pose = self._pose()
        x, y, yaw = (torch.tensor([float(v)]) for v in pose)
        origin = torch.zeros(1, 1, 2)
        plan_world = ego_to_world(torch.cat([origin, torch.from_numpy(plan)[None]], dim=1), x, y, yaw)
        speeds = plan_speeds(plan_world, g)
        plan_terms = self._plan_quality(plan_world, speeds)
        travelled_before = self.navigation.travelled_length
        flags = dict.fromkeys(("collision", "off_road", "goal"), False)
        for sub in range(cfg.substeps):
            _, _, done, _, info = self.env.step(self._control(plan_world, speeds, sub * cfg.sim_dt))
            self._read_motion()
            flags["collision"] |= any(bool(info.get(key, False)) for key in _COLLISION_KEYS)
            flags["off_road"] |= bool(info.get("out_of_road", False))
            flags["goal"] |= bool(info.get("arrive_dest", False))
            if done:
                # every MetaDrive termination we configure is one of the three; name it off-road otherwise
                flags["off_road"] |= not (flags["collision"] or flags["goal"])
                break
        self._refresh()
        progress_m = self.navigation.travelled_length - travelled_before
        reward = self._reward(progress_m, flags, plan_terms)
        return self._finish(reward, flags)

    def _control(self, plan_world: torch.Tensor, speeds: torch.Tensor, time_in_plan: float) -> list[float]:
        """MetaDrive action ``[steering, throttle_brake]`` tracking the plan (toy controller)."""
        g, cfg, m = self.geometry, self.config, self.motion
        pose = self._pose()
        state = VehicleState(*(torch.tensor([float(v)]) for v in (*pose, m.speed, m.steer, m.accel)))
        steer = float(pure_pursuit_steer(state, plan_world, g)[0])
        max_change = g.max_steer_rate * cfg.sim_dt
        steer = min(max(steer, m.steer - max_change, -g.max_steer_rad), m.steer + max_change, g.max_steer_rad)
        accel = float(speed_command(state, speeds, time_in_plan, g)[0])
        accel = min(max(accel, -g.max_decel), g.max_accel)
        throttle = accel / cfg.throttle_accel_mps2 if accel >= 0 else accel / cfg.brake_decel_mps2
        return [steer / g.max_steer_rad, min(max(throttle, -1.0), 1.0)]

    def _read_motion(self) -> None:
        g, cfg, m = self.geometry, self.config, self.motion
        speed, yaw = float(self.ego.speed), float(self.ego.heading_theta)
        steer = float(self.ego.steering) * g.max_steer_rad
        accel = (speed - m.speed) / cfg.sim_dt
        self.totals["jerk"] += abs(accel - m.accel) / cfg.sim_dt
        self.totals["steer_rate"] += abs(steer - m.steer) / cfg.sim_dt
        self.totals["substeps"] += 1
        yaw_rate = math.atan2(math.sin(yaw - m.yaw), math.cos(yaw - m.yaw)) / cfg.sim_dt
        self.motion = _Motion(speed=speed, yaw=yaw, steer=steer, accel=accel, yaw_rate=yaw_rate)

    def _plan_quality(self, plan_world: torch.Tensor, speeds: torch.Tensor) -> tuple[float, float]:
        """Mean distance (m) of the plan's waypoints from the route, and mean |planned speed -
        road target speed| / road speed over its intervals (the toy world's plan terms)."""
        g = self.geometry
        s, d, _ = self._project(plan_world[0, 1:].numpy())
        target = interpolate_profile(torch.from_numpy(self.road_speed)[None], s[None], g)[0]
        return float(d.abs().mean()), float((speeds[0] - target).abs().mean() / g.road_speed_mps)

    def _reward(self, progress_m: float, flags: dict[str, bool], plan_terms: tuple[float, float]) -> float:
        g, w = self.geometry, self.config.reward
        ego_s = float(self.frenet[0][0])
        target = float(
            interpolate_profile(torch.from_numpy(self.road_speed)[None], torch.tensor([[ego_s]]), g)[0, 0]
        )
        heading_error = math.atan2(
            math.sin(self.motion.yaw - self.centre_heading), math.cos(self.motion.yaw - self.centre_heading)
        )
        return (
            w.progress * progress_m / (g.road_speed_mps * g.policy_dt)
            - w.speed * abs(self.motion.speed - target) / g.road_speed_mps
            - w.lateral * abs(self.centre_d)
            - w.heading * abs(heading_error)
            - w.plan_lateral * plan_terms[0]
            - w.plan_speed * plan_terms[1]
            - w.collision * flags["collision"]
            - w.off_road * flags["off_road"]
        )

    def _finish(self, reward: float, flags: dict[str, bool]) -> WorldStep:
        self.t += 1
        self.totals["return"] += reward
        self.totals["lateral"] += abs(self.centre_d)
        self.best_completion = max(self.best_completion, float(self.navigation.route_completion))
        terminated = flags["collision"] or flags["off_road"] or flags["goal"]
        truncated = self.t >= self.config.max_episode_steps and not terminated
        result = WorldStep(self.frame, reward, terminated, truncated)
        if terminated or truncated:
            goal = flags["goal"] and not (flags["collision"] or flags["off_road"])
            substeps = max(self.totals["substeps"], 1.0)
            result.episode = {
                "episode_return": self.totals["return"],
                "length": self.t,
                # MetaDrive declares arrival within 5 m of the route's end: count it as complete
                "route_completion": 1.0 if goal else min(max(self.best_completion, 0.0), 1.0),
                "collision": flags["collision"],
                "off_road": flags["off_road"],
                "goal_reached": goal,
                "mean_abs_lateral_m": self.totals["lateral"] / self.t,
                "mean_abs_jerk": self.totals["jerk"] / substeps,
                "mean_abs_steer_rate": self.totals["steer_rate"] / substeps,
            }
        return result
