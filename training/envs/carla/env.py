"""``CarlaWaypointEnv``: ``num_envs`` CARLA worlds, one server each, behind the batched protocol.

Each world is a ``CarlaSession`` (``session.py``); the worlds step in parallel threads (the
CARLA client releases the GIL while it waits for its server). A policy step converts the plan to
the world frame, then for ``policy_dt / sim_dt`` server ticks runs the waypoint controller and
checks the collision sensor and the road; it scores the step, autoresets finished worlds and
rasterises the next observation from the map's lanes and the actors' boxes.

A scenario (spawn point, route branches, traffic spawn points and models, start speed) is drawn
from ``numpy.random.default_rng(scenario_seed)`` and the map alone; CARLA's physics and traffic
manager (seeded with the scenario seed) are deterministic only as far as CARLA itself is.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, TypeVar

import numpy as np
import torch

from training.common.errors import UserError
from training.envs.carla.config import CarlaConfig
from training.envs.carla.connection import DOCS, ServerAddress
from training.envs.carla.controller import WaypointController
from training.envs.carla.raster import BevGrid, SceneGeometry, ego_to_world, render_bev
from training.envs.carla.reward import StepOutcome, step_reward
from training.envs.carla.route import (
    Route,
    RoutePosition,
    build_route,
    expert_plan,
    interpolate,
    plan_quality,
    project,
    target_speed_at,
)
from training.envs.carla.session import EgoReading, MapGeometry, SensorEvents
from training.envs.protocol import BatchedWaypointEnv, EpisodeStats, Observation, StepInfo, StepResult
from training.envs.toy.config import shared_layout_spec

_MAX_WAYPOINT_M = 200.0  # plans are clamped to this distance; non-finite plans mean "stop here"
_LEAD_IN_M = 20.0  # route drawn behind the start
_PROJECTION_BACK_M, _PROJECTION_AHEAD_M = 5.0, 40.0  # search window around the last arc length
_EXPERT_LOOKAHEAD_M = 40.0  # the expert looks this far beyond its gap for vehicles on the route
_RED_LIGHT_STOP_M = 2.0  # inside a red light's trigger volume the expert plans to stop this far ahead

T = TypeVar("T")


class WorldBackend(Protocol):
    """What the environment needs from one simulator world (``CarlaSession`` in production)."""

    address: ServerAddress
    cfg: CarlaConfig
    geometry: MapGeometry
    spawn_points: Sequence[Any]
    events: SensorEvents
    wheelbase_m: float
    max_steer_rad: float

    def open(self) -> None: ...
    def route_points(self, spawn_index: int, rng: np.random.Generator, lead_in_m: float) -> np.ndarray: ...
    def start_episode(
        self,
        spawn_order: np.ndarray,
        traffic_order: Callable[[int], np.ndarray],
        rng: np.random.Generator,
        seed: int,
    ) -> int: ...
    def spawn_xy(self) -> np.ndarray: ...
    def apply(self, command: Any) -> None: ...
    def tick(self) -> None: ...
    def read_ego(self) -> EgoReading: ...
    def other_boxes(self) -> tuple[np.ndarray, np.ndarray]: ...
    def off_road(self, centre: np.ndarray) -> bool: ...
    def red_light(self) -> bool: ...
    def close(self) -> None: ...


@dataclass
class _View:
    """One world's latest observation and what the expert needs from the same instant."""

    bev: np.ndarray
    state: np.ndarray
    ego: EgoReading
    position: RoutePosition
    stop_s: float


@dataclass
class _Episode:
    """One world's running episode."""

    seed: int
    route: Route
    start_s: float
    s: float
    best_s: float
    controller: WaypointController
    steps: int = 0
    ret: float = 0.0
    lateral_sum: float = 0.0
    jerk_sum: float = 0.0
    steer_rate_sum: float = 0.0
    ticks: int = 0
    speed: float = 0.0
    accel: float = 0.0
    steer: float = 0.0
    view: _View | None = field(default=None, repr=False)

    def distance_to_goal(self, s: float, route_length_m: float) -> float:
        return min(max(route_length_m - (s - self.start_s), 0.0), route_length_m)


@dataclass
class _StepRecord:
    reward: float
    outcome: StepOutcome
    lateral_m: float
    goal: bool


def scenario_orders(
    seed: int, spawn_xy: np.ndarray, traffic_radius_m: float
) -> tuple[np.random.Generator, np.ndarray, Callable[[int], np.ndarray]]:
    """The scenario's random stream, the ego's spawn-point preference order and, given the spawn
    point the ego took, the traffic's spawn points (within ``traffic_radius_m``, random order)."""
    rng = np.random.default_rng(seed % 2**63)
    spawn_order = rng.permutation(len(spawn_xy))
    traffic_shuffle = rng.permutation(len(spawn_xy))

    def traffic_order(ego_index: int) -> np.ndarray:
        distance = np.linalg.norm(spawn_xy[traffic_shuffle] - spawn_xy[ego_index], axis=-1)
        keep = (traffic_shuffle != ego_index) & (distance <= traffic_radius_m)
        return traffic_shuffle[keep]

    return rng, spawn_order, traffic_order


class CarlaWaypointEnv(BatchedWaypointEnv):
    """``len(worlds)`` CARLA worlds meeting ``BatchedWaypointEnv`` (``training/envs/protocol.py``)."""

    def __init__(
        self,
        worlds: Sequence[WorldBackend],
        cfg: CarlaConfig,
        device: torch.device | str = "cpu",
        on_close: Callable[[], None] | None = None,
    ) -> None:
        cfg.validate()
        self.worlds, self.config = list(worlds), cfg
        self.num_envs = len(self.worlds)
        self.device = torch.device(device)
        self.grid = BevGrid.from_config(cfg)
        self.spec = shared_layout_spec(
            cfg.bev_size_px, cfg.num_waypoints, cfg.waypoint_dt, cfg.policy_dt, cfg.max_episode_steps
        )
        self._pool = ThreadPoolExecutor(max_workers=self.num_envs, thread_name_prefix="carla-world")
        self._on_close = on_close
        self._episodes: list[_Episode | None] = [None] * self.num_envs
        self._next_seed: int | None = None
        self._closed = False

    # ------------------------------------------------------------------ lifecycle
    def open(self) -> None:
        """Set every world up (synchronous mode, map geometry); on failure everything is closed."""
        self._in_every_world(lambda index: self.worlds[index].open())

    def close(self) -> None:
        """Destroy every spawned actor and restore every server's settings (idempotent)."""
        if self._closed:
            return
        self._closed = True
        try:
            list(self._pool.map(lambda world: world.close(), self.worlds))
        finally:
            self._pool.shutdown(wait=True)
            if self._on_close is not None:
                self._on_close()

    def set_difficulty(self, level: float) -> bool:
        """Traffic density for the episodes started from now on (``level`` in [0, 1])."""
        if not 0.0 <= level <= 1.0:
            raise ValueError(f"difficulty must be in [0, 1], got {level}")
        self.config = replace(self.config, difficulty=level)
        for world in self.worlds:
            world.cfg = self.config
        return True

    def _in_every_world(self, work: Callable[[int], T], worlds: Sequence[int] | None = None) -> list[T]:
        """``work(world_index)`` in parallel for the given worlds (all by default), results in order.

        A failure closes the whole environment first (actors destroyed, settings restored), then
        surfaces as one ``UserError`` naming the server.
        """
        if self._closed:
            raise RuntimeError("the CARLA environment is closed")
        indices = list(range(self.num_envs)) if worlds is None else list(worlds)
        futures = [self._pool.submit(work, i) for i in indices]
        results, failure = [], None
        for index, future in zip(indices, futures, strict=True):
            try:
                results.append(future.result())
            except Exception as error:
                failure = failure or (index, error)
        if failure is not None:
            self.close()
            index, error = failure
            if isinstance(error, UserError):
                raise error
            address = self.worlds[index].address
            raise UserError(
                f"CARLA server at {address} failed: {error} (is it still running? see {DOCS})"
            ) from None
        return results

    # ------------------------------------------------------------------ reset
    def reset(self, seed: int | None = None) -> Observation:
        if seed is not None:
            self._next_seed = int(seed)
        elif self._next_seed is None:
            self._next_seed = 0
        seeds = [self._next_seed + i for i in range(self.num_envs)]
        self._next_seed += self.num_envs
        self._start(list(range(self.num_envs)), seeds)
        return self._stack_observations()

    def _start(self, indices: list[int], seeds: list[int]) -> None:
        by_world = dict(zip(indices, seeds, strict=True))

        def start(index: int) -> _Episode:
            return self._start_episode(self.worlds[index], by_world[index])

        for index, episode in zip(indices, self._in_every_world(start, indices), strict=True):
            self._episodes[index] = episode

    def _start_episode(self, world: WorldBackend, seed: int) -> _Episode:
        cfg = self.config
        rng, spawn_order, traffic_order = scenario_orders(seed, world.spawn_xy(), cfg.traffic_radius_m)
        spawn_index = world.start_episode(spawn_order, traffic_order, rng, seed)
        route = build_route(world.route_points(spawn_index, rng, _LEAD_IN_M), cfg)
        ego = world.read_ego()
        start = project(route, ego.pose[:2])
        controller = WaypointController(cfg.controller, world.wheelbase_m, world.max_steer_rad)
        episode = _Episode(seed, route, start.s, start.s, start.s, controller, speed=ego.speed_mps)
        episode.steer = ego.steer_rad
        episode.view = self._view(world, episode)
        return episode

    # ------------------------------------------------------------------ observation and expert
    def _view(self, world: WorldBackend, episode: _Episode) -> _View:
        cfg = self.config
        ego = world.read_ego()
        window = (episode.s - _PROJECTION_BACK_M, episode.s + _PROJECTION_AHEAD_M)
        position = project(episode.route, ego.pose[:2], window)
        vehicles, obstacles = world.other_boxes()
        geometry: MapGeometry = world.geometry
        scene = SceneGeometry(
            geometry.lane_start,
            geometry.lane_end,
            geometry.lane_half_width,
            episode.route.xy,
            vehicles,
            obstacles,
        )
        bev = render_bev(scene, ego.pose, self.grid)
        state = np.array(
            [
                ego.speed_mps,
                ego.steer_rad,
                episode.accel,
                ego.yaw_rate_radps,
                episode.distance_to_goal(position.s, cfg.route_length_m),
            ],
            dtype=np.float32,
        )
        stop_s = self._stop_s(
            episode.route, position, np.concatenate([vehicles, obstacles]), world.red_light()
        )
        return _View(bev=bev, state=state, ego=ego, position=position, stop_s=stop_s)

    def _stop_s(self, route: Route, position: RoutePosition, boxes: np.ndarray, red_light: bool) -> float:
        """Arc length where the expert must stop: before a box on the route ahead, or at once
        (within comfortable braking) for a red light."""
        cfg = self.config
        stop = position.s + _RED_LIGHT_STOP_M if red_light else math.inf
        horizon = cfg.expert_gap_m + _EXPERT_LOOKAHEAD_M
        ego_xy = interpolate(route, np.array(position.s))[0]
        for box in boxes[np.linalg.norm(boxes[:, :2] - ego_xy, axis=-1) <= horizon]:
            ahead = project(route, box[:2], (position.s, position.s + horizon))
            if ahead.s > position.s and abs(ahead.d) < cfg.expert_route_halfwidth_m + box[4]:
                stop = min(stop, ahead.s - box[3] - cfg.expert_gap_m)
        return stop

    def _stack_observations(self) -> Observation:
        views = [episode.view for episode in self._episodes]
        bev = torch.from_numpy(np.stack([v.bev for v in views])).to(self.device)
        state = torch.from_numpy(np.stack([v.state for v in views])).to(self.device)
        return Observation(bev=bev, state=state)

    def expert_waypoints(self) -> torch.Tensor:
        plans = []
        for episode in self._episodes:
            view = episode.view
            plan = expert_plan(
                episode.route, view.ego.pose, view.ego.speed_mps, view.position, self.config, view.stop_s
            )
            plans.append(plan.astype(np.float32))
        return torch.from_numpy(np.stack(plans)).to(self.device)

    def ego_pose(self) -> torch.Tensor:
        poses = np.stack([episode.view.ego.pose for episode in self._episodes]).astype(np.float32)
        return torch.from_numpy(poses).to(self.device)

    # ------------------------------------------------------------------ step
    def step(self, waypoints: torch.Tensor) -> StepResult:
        if any(episode is None for episode in self._episodes):
            raise RuntimeError("call reset() before step()")
        expected = (self.num_envs, self.config.num_waypoints, 2)
        if tuple(waypoints.shape) != expected:
            raise ValueError(f"waypoints must have shape {expected}, got {tuple(waypoints.shape)}")
        plans = waypoints.detach().to("cpu", torch.float64).numpy()
        finite = np.isfinite(plans).all(axis=(1, 2))
        plans = np.where(finite[:, None, None], plans, 0.0).clip(-_MAX_WAYPOINT_M, _MAX_WAYPOINT_M)

        def drive(index: int) -> _StepRecord:
            return self._drive(self.worlds[index], self._episodes[index], plans[index])

        records = self._in_every_world(drive)
        return self._finish_step(records)

    def _drive(self, world: WorldBackend, episode: _Episode, plan_ego: np.ndarray) -> _StepRecord:
        """Track one plan for ``policy_dt`` seconds; score it."""
        cfg = self.config
        start_pose = episode.view.ego.pose
        plan_world = ego_to_world(np.concatenate([np.zeros((1, 2)), plan_ego]), start_pose)
        plan_lateral, plan_speed_error = plan_quality(episode.route, plan_world, episode.s, cfg.waypoint_dt)
        s_before, ticks_before = episode.s, episode.ticks
        jerk_before, steer_rate_before = episode.jerk_sum, episode.steer_rate_sum
        collisions, invasions, off_road = 0, 0, False
        ego = episode.view.ego
        for tick in range(cfg.ticks_per_step):
            command = episode.controller.command(
                plan_world, ego.pose, ego.speed_mps, tick * cfg.sim_dt, cfg.waypoint_dt, cfg.sim_dt
            )
            world.apply(command)
            world.tick()
            ego = world.read_ego()
            self._account_motion(episode, ego)
            hits, crossed = world.events.take()
            collisions, invasions = collisions + hits, invasions + crossed
            off_road = world.off_road(ego.centre)
            if collisions or off_road:
                break
        ticks = max(episode.ticks - ticks_before, 1)
        episode.view = self._view(world, episode)
        position = episode.view.position
        episode.s = position.s
        episode.best_s = max(episode.best_s, position.s)
        centre = project(episode.route, ego.centre, (position.s - _PROJECTION_BACK_M, position.s + 10.0))
        heading_error = math.atan2(
            math.sin(ego.pose[2] - position.heading), math.cos(ego.pose[2] - position.heading)
        )
        outcome = StepOutcome(
            progress_m=position.s - s_before,
            speed_mps=ego.speed_mps,
            target_speed_mps=float(target_speed_at(episode.route, position.s)),
            lateral_m=centre.d,
            heading_error_rad=heading_error,
            plan_lateral_m=plan_lateral,
            plan_speed_error_mps=plan_speed_error,
            jerk_mps3=(episode.jerk_sum - jerk_before) / ticks,
            steer_rate_radps=(episode.steer_rate_sum - steer_rate_before) / ticks,
            lane_invasions=invasions,
            collision=collisions > 0,
            off_road=off_road,
        )
        reward = step_reward(outcome, cfg.reward, cfg.target_speed_mps, cfg.policy_dt)
        goal = position.s - episode.start_s >= cfg.route_length_m
        return _StepRecord(reward=reward, outcome=outcome, lateral_m=centre.d, goal=goal)

    def _account_motion(self, episode: _Episode, ego: EgoReading) -> None:
        dt = self.config.sim_dt
        accel = (ego.speed_mps - episode.speed) / dt
        episode.jerk_sum += abs(accel - episode.accel) / dt
        episode.steer_rate_sum += abs(ego.steer_rad - episode.steer) / dt
        episode.ticks += 1
        episode.speed, episode.accel, episode.steer = ego.speed_mps, accel, ego.steer_rad

    def _finish_step(self, records: list[_StepRecord]) -> StepResult:
        cfg = self.config
        for episode, record in zip(self._episodes, records, strict=True):
            episode.steps += 1
            episode.ret += record.reward
            episode.lateral_sum += abs(record.lateral_m)
        collided = [r.outcome.collision for r in records]
        off_road = [r.outcome.off_road for r in records]
        goal = [r.goal for r in records]
        terminated = [c or o or g for c, o, g in zip(collided, off_road, goal, strict=True)]
        truncated = [
            e.steps >= cfg.max_episode_steps and not t
            for e, t in zip(self._episodes, terminated, strict=True)
        ]
        done = [t or u for t, u in zip(terminated, truncated, strict=True)]
        episode_stats = self._episode_stats(done, collided, off_road, goal)
        final_obs = self._stack_observations()
        speed = [r.outcome.speed_mps for r in records]
        lateral = [r.lateral_m for r in records]
        finished = [i for i, d in enumerate(done) if d]
        if finished:
            seeds = [self._next_seed + k for k in range(len(finished))]
            self._next_seed += len(finished)
            self._start(finished, seeds)
        obs = self._stack_observations() if finished else final_obs
        info = StepInfo(
            expert=self.expert_waypoints(),
            final_observation=final_obs,
            episode=episode_stats,
            lateral_deviation_m=self._tensor(lateral, torch.float32),
            speed_mps=self._tensor(speed, torch.float32),
            ego_pose=self.ego_pose(),
        )
        reward = self._tensor([r.reward for r in records], torch.float32)
        return StepResult(
            obs, reward, self._tensor(terminated, torch.bool), self._tensor(truncated, torch.bool), info
        )

    def _episode_stats(
        self, done: list[bool], collided: list[bool], off_road: list[bool], goal: list[bool]
    ) -> EpisodeStats:
        cfg, episodes = self.config, self._episodes
        steps = [max(e.steps, 1) for e in episodes]
        ticks = [max(e.ticks, 1) for e in episodes]
        return EpisodeStats(
            done=self._tensor(done, torch.bool),
            episode_return=self._tensor([e.ret for e in episodes], torch.float32),
            length=self._tensor([e.steps for e in episodes], torch.int64),
            route_completion=self._tensor(
                [min(max((e.best_s - e.start_s) / cfg.route_length_m, 0.0), 1.0) for e in episodes],
                torch.float32,
            ),
            collision=self._tensor(collided, torch.bool),
            off_road=self._tensor(off_road, torch.bool),
            goal_reached=self._tensor(
                [g and not c and not o for g, c, o in zip(goal, collided, off_road, strict=True)], torch.bool
            ),
            mean_abs_lateral_m=self._tensor(
                [e.lateral_sum / n for e, n in zip(episodes, steps, strict=True)], torch.float32
            ),
            mean_abs_jerk=self._tensor(
                [e.jerk_sum / n for e, n in zip(episodes, ticks, strict=True)], torch.float32
            ),
            mean_abs_steer_rate=self._tensor(
                [e.steer_rate_sum / n for e, n in zip(episodes, ticks, strict=True)], torch.float32
            ),
            scenario_seed=self._tensor([e.seed for e in episodes], torch.int64),
        )

    def _tensor(self, values: list[Any], dtype: torch.dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, device=self.device)
