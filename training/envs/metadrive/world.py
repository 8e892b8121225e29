"""One MetaDrive world behind the waypoint protocol, as plain numpy in and out (runs in a worker).

Each ``step`` turns the plan (ego frame at the observation) into the world frame, runs the toy
world's tracking controller (pure pursuit + speed control; its one-world numpy twin in ``single.py``:
1-element torch tensors cost more than the arithmetic) at MetaDrive's 10 Hz decision rate for
``policy_dt`` seconds, mapping its steering angle and acceleration to MetaDrive's
``[steering, throttle_brake]`` action, then scores the step the way the toy world does. The ego's
reference point is the rear axle, as in the toy world.

The expert drives like MetaDrive's ``IDMPolicy``: the IDM's routing and lane-change logic picks the
lane, and the plan follows that lane's centre line along the route (the toy expert's plan, with its
critically damped return to the centre line), at MetaDrive's IDM cruise speed (30 km/h), slowed for
curves, behind the object ahead in its corridor and before cars that will cross or merge into it
(``expert.py``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from metadrive.component.vehicle.base_vehicle import BaseVehicle
from metadrive.policy.idm_policy import IDMPolicy

from training.envs.metadrive.collisions import box_gap, closed_by, closing_speeds
from training.envs.metadrive.config import MetaDriveWorldConfig
from training.envs.metadrive.expert import Traffic, expert_stops
from training.envs.metadrive.frames import WorldFrame, WorldStep
from training.envs.metadrive.headless import SCENARIO_SEED_SPACE, HeadlessMetaDriveEnv
from training.envs.metadrive.raster import BevRasteriser, build_drivable_grid
from training.envs.metadrive.route import build_local_route, speed_profile
from training.envs.metadrive.single import (
    ego_to_world,
    expert_plan,
    interpolate_profile,
    plan_speeds,
    project_to_route,
    pure_pursuit_steer,
    speed_command,
)

_MAX_WAYPOINT_M = 200.0  # as in the toy world: plans are clamped; non-finite plans mean "stop here"
_COLLISION_KEYS = ("crash_vehicle", "crash_object", "crash_building", "crash_human")


def _distance(a: object, b: object) -> float:
    (ax, ay), (bx, by) = a.position, b.position
    return math.hypot(ax - bx, ay - by)


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
        self.env = HeadlessMetaDriveEnv(config.metadrive_config(), config.remove_crossing_lines)
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
        self.successors: dict = {}  # next_route_lane by lane index, for this episode's route
        self.lane_change: tuple[object, int] | None = None  # target lane, policy steps it is held
        self._refresh()
        return self.frame

    def close(self) -> None:
        self.env.close()

    def collision_report(self, radius_m: float = 12.0) -> dict[str, object] | None:
        """The object nearest the ego's box now (within ``radius_m``; None if none) and who was moving
        into whom (``collisions.py``): call it right after a step that ended in a collision."""
        ego = np.array([*self.ego.position, self.ego.heading_theta, self.ego.LENGTH, self.ego.WIDTH])
        nearest = None
        for obj in self.ego.lidar.get_surrounding_objects(self.ego, radius=radius_m):
            box = np.array([*obj.position, obj.heading_theta, obj.LENGTH, obj.WIDTH])
            gap = box_gap(ego, box)
            if nearest is None or gap < nearest[0]:
                nearest = (gap, obj, box)
        if nearest is None:
            return None
        gap, obj, box = nearest
        ego_speed, other_speed = float(self.ego.speed), float(getattr(obj, "speed", 0.0))
        ego_closing, other_closing = closing_speeds(ego, ego_speed, box, other_speed)
        heading, (dx, dy) = float(ego[2]), box[:2] - ego[:2]
        return {
            "closed_by": closed_by(ego_speed, ego_closing, other_closing),
            "other": type(obj).__name__,
            "ego_speed_mps": round(ego_speed, 2),
            "other_speed_mps": round(other_speed, 2),
            "other_heading_deg": round(math.degrees(math.remainder(float(box[2]) - heading, math.tau))),
            "other_ahead_m": round(math.cos(heading) * dx + math.sin(heading) * dy, 2),
            "other_left_m": round(-math.sin(heading) * dx + math.cos(heading) * dy, 2),
            "gap_m": round(gap, 2),
        }

    # ------------------------------------------------------------------ geometry
    def _pose(self) -> tuple[float, float, float]:
        """Rear-axle ``x, y`` (m) and yaw (rad), world frame."""
        x, y = self.ego.position
        yaw = self.motion.yaw
        return x - self.rear_offset_m * math.cos(yaw), y - self.rear_offset_m * math.sin(yaw), yaw

    def _project(self, points_world: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Route coordinates ``s, d, heading`` ``[Q]`` of world points ``[Q, 2]`` (any distance along)."""
        return project_to_route(self.route.xy, self.route.heading, points_world, self.geometry)

    def _traffic(self, found: set) -> tuple[Traffic, np.ndarray, np.ndarray]:
        """What the expert and the BEV need of the objects ``found`` near the ego: the expert's
        view (boxes, speeds, predicted paths; vehicles first) and the vehicle and obstacle boxes
        ``[B, 5]`` (x, y, heading, length, width)."""
        vehicles, obstacles, speeds, paths, waiting = [], [], [], [], []
        # MetaDrive's trigger-mode traffic: a block's cars stand until the ego enters the block
        started = {id(v) for v in getattr(self.env.engine.traffic_manager, "_traffic_vehicles", [])}
        # a set, of objects named by random UUIDs: sort by where they are, the same in every run
        for obj in sorted(found, key=lambda o: (*o.position, o.heading_theta)):
            box = [*obj.position, obj.heading_theta, obj.LENGTH, obj.WIDTH]
            if isinstance(obj, BaseVehicle):
                vehicles.append(box)
                speeds.append(float(obj.speed))
                waiting.append(id(obj) not in started)
                predicted = speeds[-1] >= self.config.moving_mps or waiting[-1]
                paths.append(self._vehicle_path(obj) if predicted else None)
            else:
                obstacles.append(box)
        as_boxes = lambda rows: np.asarray(rows, dtype=np.float64).reshape(-1, 5)  # noqa: E731
        vehicles, obstacles = as_boxes(vehicles), as_boxes(obstacles)
        traffic = Traffic(
            boxes=np.concatenate([vehicles, obstacles]),
            speeds=np.concatenate([np.asarray(speeds, dtype=np.float64), np.zeros(len(obstacles))]),
            paths=paths + [None] * len(obstacles),
            waiting=np.asarray(waiting + [False] * len(obstacles), dtype=bool),
            vehicle=np.arange(len(vehicles) + len(obstacles)) < len(vehicles),
        )
        return traffic, vehicles, obstacles

    def _vehicle_path(self, vehicle: BaseVehicle) -> np.ndarray | None:
        """The polyline ``[P, 2]`` a traffic car will drive from where it is: the lane its IDM
        policy steers to, then the lanes of its own route; None when it is on no lane."""
        g, cfg = self.geometry, self.config
        policy = self.env.engine.get_policy(vehicle.name)
        lane = getattr(policy, "routing_target_lane", None) or vehicle.lane
        navigation = getattr(vehicle, "navigation", None)
        if lane is None or navigation is None:
            return None
        ahead_m = (max(float(vehicle.speed), g.road_speed_mps) + 1.0) * cfg.yield_horizon_s
        graph = self.navigation.map.road_network.graph
        path = build_local_route(
            lane, np.asarray(vehicle.position), navigation.checkpoints, graph, 0.0, ahead_m, g.route_spacing_m
        )
        return path.xy.astype(np.float64)

    def _expert_lane(self, found: set) -> object:
        """The lane the expert drives to: the IDM's choice (``_idm_lane``), except that a lane change
        it started is held for ``lane_change_hold_s`` or until the ego is on the new lane. The IDM
        re-syncs its target to the lane the ego is on at every call, so while the ego is still
        crossing, it could switch back and forth at every policy step (measured along a taper of
        cones, which the ego then hit)."""
        # asked even while a change is held: each call moves the IDM's own target lane along the route
        chosen = self._idm_lane(found)
        held = self._held_lane_change()
        if held is not None:
            return held
        if chosen is not self.ego.lane and chosen in self.navigation.current_ref_lanes:
            hold = round(self.config.lane_change_hold_s / self.geometry.policy_dt)
            self.lane_change = (chosen, hold)
        return chosen

    def _held_lane_change(self) -> object | None:
        """The target of the lane change in progress (on the road the ego is on now), or None."""
        if self.lane_change is None:
            return None
        lane, steps = self.lane_change
        lanes = self.navigation.current_ref_lanes
        if lane not in lanes:  # the ego entered the next road: the same lane number there
            number = lane.index[-1]
            lane = lanes[number] if number < len(lanes) else None
        if lane is None or steps <= 0 or self.ego.lane is lane:
            self.lane_change = None
            return None
        self.lane_change = (lane, steps - 1)
        return lane

    def _idm_lane(self, found: set) -> object:
        """The lane MetaDrive's IDM policy steers to now (``IDMPolicy.act`` without acting), given
        the objects ``found`` around the ego (what ``act`` asks the ego's lidar for)."""
        idm = self.idm
        # Called once per 0.1 s, the IDM spends one call on a lane of the new road that merely
        # connects to its old lane before re-syncing to the ego's own lane on the next call; at our
        # 0.5 s that one call would plan a spurious lane change, so the first call only catches up.
        idm.move_to_next_road()
        on_route = idm.move_to_next_road()
        if not (on_route and idm.enable_lane_change):
            return idm.routing_target_lane
        try:
            near = {o for o in found if _distance(o, self.ego) <= self.config.idm_search_radius_m}
            return idm.lane_change_policy(near)[2]
        except Exception:  # IDMPolicy.act falls back to its routing lane on any error; so do we
            return idm.routing_target_lane

    # ------------------------------------------------------------------ observation
    def _refresh(self) -> None:
        """Rebuild the local route, the BEV, the expert plan and the state for the current moment."""
        g, cfg = self.geometry, self.config
        pose = self._pose()
        found = self.ego.lidar.get_surrounding_objects(self.ego, radius=cfg.object_search_radius_m)
        self.route = build_local_route(
            self._expert_lane(found),
            np.array(pose[:2]),
            self.navigation.checkpoints,
            self.navigation.map.road_network.graph,
            g.lead_in_m,
            cfg.route_ahead_m,
            g.route_spacing_m,
            self.successors,
        )
        traffic, vehicles, obstacles = self._traffic(found)
        bev = self.rasteriser.render(np.array(pose), self.grid, self.route.xy, vehicles, obstacles)
        s, d, heading = self._project(np.array([pose[:2], self.ego.position]))
        self.frenet = (float(s[0]), float(d[0]), float(heading[0]))  # rear axle
        self.centre_d = float(d[1])
        self.centre_heading = float(heading[1])
        self.road_speed = speed_profile(
            self.route, g.route_spacing_m, g.road_speed_mps, g.max_lateral_accel, g.comfort_decel
        )
        expert = self._expert(pose, traffic)
        to_goal = max(0.0, self.navigation.total_length - self.navigation.travelled_length)
        m = self.motion
        state = np.array([m.speed, m.steer, m.accel, m.yaw_rate, to_goal], dtype=np.float32)
        self.frame = WorldFrame(bev, state, expert, np.array(pose, np.float32), self.centre_d, m.speed)

    def _expert(self, pose: tuple[float, float, float], traffic: Traffic) -> np.ndarray:
        """The expert's plan ``[K, 2]`` (ego frame): the route at the road speed profile, lowered
        to stop behind the lead and before cars it must yield to (``expert.py``)."""
        g = self.geometry
        target = self.road_speed
        stops = expert_stops(
            self.route.xy,
            self.route.heading,
            self.frenet[0],
            self.motion.speed,
            traffic,
            g,
            self.config.yield_settings(),
        )
        for stop in stops:
            limited = speed_profile(
                self.route,
                g.route_spacing_m,
                g.road_speed_mps,
                g.max_lateral_accel,
                g.comfort_decel,
                (stop.s + g.lead_in_m) / g.route_spacing_m,
                stop.speed_mps,
            )
            target = np.minimum(target, limited)
        plan = expert_plan(self.route.xy, self.route.heading, target, pose, self.motion.speed, self.frenet, g)
        return plan.astype(np.float32)

    # ------------------------------------------------------------------ step
    def step(self, waypoints: np.ndarray) -> WorldStep:
        g, cfg = self.geometry, self.config
        plan = np.asarray(waypoints, dtype=np.float32)
        if not np.isfinite(plan).all():
            plan = np.zeros_like(plan)
        plan = np.clip(plan, -_MAX_WAYPOINT_M, _MAX_WAYPOINT_M)
        plan_world = ego_to_world(np.concatenate([np.zeros((1, 2)), plan]), self._pose())  # [K+1, 2]
        speeds = plan_speeds(plan_world, g)
        plan_terms = self._plan_quality(plan_world, speeds)
        travelled_before = self.navigation.travelled_length
        totals_before = dict(self.totals)
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
        driven = max(self.totals["substeps"] - totals_before["substeps"], 1)
        comfort = tuple((self.totals[key] - totals_before[key]) / driven for key in ("jerk", "steer_rate"))
        reward = self._reward(progress_m, flags, plan_terms, comfort)
        return self._finish(reward, flags)

    def _control(self, plan_world: np.ndarray, speeds: np.ndarray, time_in_plan: float) -> list[float]:
        """MetaDrive action ``[steering, throttle_brake]`` tracking the plan (toy controller)."""
        g, cfg, m = self.geometry, self.config, self.motion
        steer = pure_pursuit_steer(self._pose(), m.speed, plan_world, g)
        max_change = g.max_steer_rate * cfg.sim_dt
        steer = min(max(steer, m.steer - max_change, -g.max_steer_rad), m.steer + max_change, g.max_steer_rad)
        accel = speed_command(m.speed, speeds, time_in_plan, g)
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

    def _plan_quality(self, plan_world: np.ndarray, speeds: np.ndarray) -> tuple[float, float]:
        """Mean distance (m) of the plan's waypoints from the route, and mean |planned speed -
        road target speed| / road speed over its intervals (the toy world's plan terms)."""
        g = self.geometry
        s, d, _ = self._project(plan_world[1:])
        target = interpolate_profile(self.road_speed, s, g)
        return float(np.abs(d).mean()), float(np.abs(speeds - target).mean() / g.road_speed_mps)

    def _reward(
        self,
        progress_m: float,
        flags: dict[str, bool],
        plan_terms: tuple[float, float],
        comfort: tuple[float, float],
    ) -> float:
        """The toy world's reward terms; ``comfort`` is the step's mean |jerk| and |steering rate|."""
        g, w = self.geometry, self.config.reward
        target = float(interpolate_profile(self.road_speed, np.array([self.frenet[0]]), g)[0])
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
            - w.jerk * comfort[0]
            - w.steer_rate * comfort[1]
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
            if flags["collision"]:
                result.episode["collision_report"] = self.collision_report()
        return result
