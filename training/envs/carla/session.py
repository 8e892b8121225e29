"""One CARLA server holding one world: settings, spawning, reading the world, teardown.

This is the only module that touches CARLA objects. It converts CARLA's left-handed frame
(x forward, y right, yaw clockwise in degrees, centimetres for wheel positions) to the
right-handed frame the rest of the package uses (see ``config.py``) and hands out numpy arrays.

Teardown (``close``), in this order, each step attempted even when an earlier one fails:
stop the sensors, destroy the sensors and then every other actor we spawned in one batch,
take the traffic manager out of synchronous mode, restore the world settings found on connect.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np

from training.common.errors import UserError
from training.envs.carla.config import CarlaConfig
from training.envs.carla.connection import DOCS, ServerAddress
from training.envs.carla.controller import PedalCommand
from training.envs.carla.raster import empty_boxes

_LANE_STEP_M = 2.0  # lane centre lines are sampled this often for the raster
_LOAD_WORLD_TIMEOUT_S = 120.0  # loading a town takes far longer than an RPC
_PARKED_LABELS = ("Car", "Truck", "Bus", "Motorcycle", "Bicycle")


def to_right_handed(x: float, y: float, yaw_deg: float) -> tuple[float, float, float]:
    """A CARLA position and yaw in the right-handed world frame (metres, radians)."""
    return x, -y, -math.radians(yaw_deg)


def box_from_carla(transform: Any, bounding_box: Any) -> tuple[float, float, float, float, float]:
    """``centre x, centre y, yaw, half length, half width`` of an actor's bounding box."""
    yaw = math.radians(transform.rotation.yaw)
    offset_x, offset_y = bounding_box.location.x, bounding_box.location.y
    cx = transform.location.x + offset_x * math.cos(yaw) - offset_y * math.sin(yaw)
    cy = transform.location.y + offset_x * math.sin(yaw) + offset_y * math.cos(yaw)
    x, y, heading = to_right_handed(cx, cy, transform.rotation.yaw)
    return x, y, heading, bounding_box.extent.x, bounding_box.extent.y


@dataclass(frozen=True)
class EgoReading:
    """The ego now: rear-axle pose and body centre (right-handed world frame), motion."""

    pose: np.ndarray  # [3] rear axle x, y (m), yaw (rad)
    centre: np.ndarray  # [2] body centre x, y (m)
    speed_mps: float
    steer_rad: float  # front-wheel angle, left > 0
    yaw_rate_radps: float  # left > 0


@dataclass(frozen=True)
class MapGeometry:
    """What the raster needs from the map, read once per session."""

    lane_start: np.ndarray  # [M, 2]
    lane_end: np.ndarray  # [M, 2]
    lane_half_width: np.ndarray  # [M]
    parked_boxes: np.ndarray  # [B, 5] the map's parked vehicles


class SensorEvents:
    """Collision and lane-invasion events, filled by CARLA's sensor threads."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.collisions = 0
        self.lane_invasions = 0

    def on_collision(self, _event: Any) -> None:
        with self._lock:
            self.collisions += 1

    def on_lane_invasion(self, _event: Any) -> None:
        with self._lock:
            self.lane_invasions += 1

    def take(self) -> tuple[int, int]:
        """Events since the last call: ``(collisions, lane invasions)``."""
        with self._lock:
            counts = (self.collisions, self.lane_invasions)
            self.collisions = self.lane_invasions = 0
        return counts


class CarlaSession:
    """One server: synchronous mode at ``cfg.sim_dt``, one ego with its sensors, traffic."""

    def __init__(
        self, carla: ModuleType, client: Any, address: ServerAddress, cfg: CarlaConfig, rpc_timeout_s: float
    ) -> None:
        self.carla, self.client, self.address, self.cfg = carla, client, address, cfg
        self.rpc_timeout_s = rpc_timeout_s
        self.world: Any = None
        self.map: Any = None
        self.traffic_manager: Any = None
        self.original_settings: Any = None
        self.sensors: list[Any] = []
        self.actors: list[Any] = []  # ego and traffic, destroyed after the sensors
        self.ego: Any = None
        self.events = SensorEvents()
        self.rear_axle_offset_m = -cfg.wheelbase_m / 2
        self.wheelbase_m = cfg.wheelbase_m
        self.max_steer_rad = cfg.max_steer_rad
        self.teardown_errors: list[str] = []

    # ------------------------------------------------------------------ set-up
    def open(self) -> None:
        """Load the town if needed, switch to synchronous mode, read the map's geometry."""
        self.world = self._load_town()
        self.original_settings = self.world.get_settings()
        settings = self.world.get_settings()
        settings.synchronous_mode = True
        settings.fixed_delta_seconds = self.cfg.sim_dt
        self.world.apply_settings(settings)
        self.traffic_manager = self.client.get_trafficmanager(self.address.traffic_manager_port)
        self.traffic_manager.set_synchronous_mode(True)
        self.map = self.world.get_map()
        self.geometry = self._read_geometry()
        self.spawn_points = self.map.get_spawn_points()
        if not self.spawn_points:
            raise UserError(f"town {self.cfg.town} on CARLA server {self.address} has no spawn points")

    def _load_town(self) -> Any:
        world = self.client.get_world()
        if world.get_map().name.split("/")[-1] == self.cfg.town:
            return world
        available = sorted(name.split("/")[-1] for name in self.client.get_available_maps())
        if self.cfg.town not in available:
            raise UserError(
                f"--town {self.cfg.town} is not on the CARLA server at {self.address} "
                f"(available: {', '.join(available)})"
            )
        self.client.set_timeout(max(_LOAD_WORLD_TIMEOUT_S, self.rpc_timeout_s))
        try:
            return self.client.load_world(self.cfg.town)
        finally:
            self.client.set_timeout(self.rpc_timeout_s)

    def _read_geometry(self) -> MapGeometry:
        starts, ends, widths = [], [], []
        for waypoint in self.map.generate_waypoints(_LANE_STEP_M):
            here = waypoint.transform.location
            for successor in waypoint.next(_LANE_STEP_M):
                there = successor.transform.location
                starts.append((here.x, -here.y))
                ends.append((there.x, -there.y))
                widths.append(0.5 * waypoint.lane_width)
        parked = [
            box_from_level(bb)
            for label in _PARKED_LABELS
            for bb in self.world.get_level_bbs(getattr(self.carla.CityObjectLabel, label))
        ]
        return MapGeometry(
            lane_start=np.asarray(starts, dtype=np.float64).reshape(-1, 2),
            lane_end=np.asarray(ends, dtype=np.float64).reshape(-1, 2),
            lane_half_width=np.asarray(widths, dtype=np.float64),
            parked_boxes=np.asarray(parked, dtype=np.float64).reshape(-1, 5),
        )

    # ------------------------------------------------------------------ episodes
    def route_points(self, spawn_index: int, rng: np.random.Generator, lead_in_m: float) -> np.ndarray:
        """Route centre line ``[P, 2]`` from ``lead_in_m`` behind spawn point ``spawn_index`` to
        ``route_length_m + route_lead_out_m`` ahead; ``rng`` picks the branch at each fork."""
        cfg = self.cfg
        start = self.map.get_waypoint(self.spawn_points[spawn_index].location)
        behind = [start]
        for _ in range(round(lead_in_m / cfg.route_spacing_m)):
            previous = behind[-1].previous(cfg.route_spacing_m)
            if not previous:
                break
            behind.append(previous[0])
        ahead = [start]
        for _ in range(round((cfg.route_length_m + cfg.route_lead_out_m) / cfg.route_spacing_m)):
            options = ahead[-1].next(cfg.route_spacing_m)
            if not options:
                break
            ahead.append(options[int(rng.integers(len(options)))] if len(options) > 1 else options[0])
        waypoints = behind[:0:-1] + ahead
        points = [(w.transform.location.x, -w.transform.location.y) for w in waypoints]
        return _drop_repeats(np.asarray(points, dtype=np.float64))

    def spawn_xy(self) -> np.ndarray:
        """Spawn points ``[S, 2]`` of the map (right-handed frame)."""
        return np.array([(p.location.x, -p.location.y) for p in self.spawn_points], dtype=np.float64)

    def start_episode(
        self,
        spawn_order: np.ndarray,
        traffic_order: Callable[[int], np.ndarray],
        rng: np.random.Generator,
        seed: int,
    ) -> int:
        """Clear the last episode, spawn the ego at the first free spawn point of ``spawn_order``
        with sensors and a start speed, and traffic at the points ``traffic_order(ego's point)``.

        Returns the spawn point index the ego took.
        """
        self.destroy_actors()
        self.events.take()
        spawn_index = self._spawn_ego(spawn_order)
        self._attach_sensors()
        self._spawn_traffic(traffic_order(spawn_index), rng, seed)
        self._set_start_speed(float(rng.uniform(*self.cfg.start_speed_range)))
        for _ in range(self.cfg.settle_ticks):
            self.tick()
        self._read_ego_physics()
        self.events.take()
        return spawn_index

    def _spawn_ego(self, spawn_order: np.ndarray) -> int:
        library = self.world.get_blueprint_library()
        blueprint = library.find(self.cfg.ego_blueprint)
        blueprint.set_attribute("role_name", "hero")
        for index in spawn_order:
            ego = self.world.try_spawn_actor(blueprint, self.spawn_points[int(index)])
            if ego is not None:
                self.ego = ego
                self.actors.append(ego)
                return int(index)
        raise UserError(f"every spawn point of {self.cfg.town} on {self.address} is blocked ({DOCS})")

    def _read_ego_physics(self) -> None:
        """Wheelbase, rear-axle offset and steering limit of the ego (valid after a tick)."""
        wheels = self.ego.get_physics_control().wheels  # positions in cm, CARLA world frame
        if len(wheels) < 4:
            return
        front = np.array(
            [wheels[0].position.x + wheels[1].position.x, wheels[0].position.y + wheels[1].position.y]
        )
        rear = np.array(
            [wheels[2].position.x + wheels[3].position.x, wheels[2].position.y + wheels[3].position.y]
        )
        front, rear = front / 200.0, rear / 200.0
        transform = self.ego.get_transform()
        yaw = math.radians(transform.rotation.yaw)
        along = float(
            np.dot(rear - (transform.location.x, transform.location.y), (math.cos(yaw), math.sin(yaw)))
        )
        wheelbase = float(np.linalg.norm(front - rear))
        if 1.0 < wheelbase < 10.0 and abs(along) < wheelbase:  # wheel positions are zeros before a tick
            self.wheelbase_m, self.rear_axle_offset_m = wheelbase, along
        if wheels[0].max_steer_angle > 0:
            self.max_steer_rad = math.radians(wheels[0].max_steer_angle)

    def _attach_sensors(self) -> None:
        library = self.world.get_blueprint_library()
        for name, callback in (
            ("sensor.other.collision", self.events.on_collision),
            ("sensor.other.lane_invasion", self.events.on_lane_invasion),
        ):
            sensor = self.world.spawn_actor(library.find(name), self.carla.Transform(), attach_to=self.ego)
            self.sensors.append(sensor)
            sensor.listen(callback)

    def _spawn_traffic(self, traffic_order: np.ndarray, rng: np.random.Generator, seed: int) -> None:
        count = round(self.cfg.difficulty * self.cfg.max_traffic)
        if count == 0:
            return
        command = self.carla.command
        blueprints = sorted(
            (
                bp
                for bp in self.world.get_blueprint_library().filter("vehicle.*")
                if int(bp.get_attribute("number_of_wheels")) == 4
            ),
            key=lambda bp: bp.id,
        )
        tm_port = self.address.traffic_manager_port
        self.traffic_manager.set_random_device_seed(seed % 2**31)
        batch = []
        for index in traffic_order[:count]:
            blueprint = blueprints[int(rng.integers(len(blueprints)))]
            blueprint.set_attribute("role_name", "autopilot")
            spawn = command.SpawnActor(blueprint, self.spawn_points[int(index)])
            batch.append(spawn.then(command.SetAutopilot(command.FutureActor, True, tm_port)))
        responses = self.client.apply_batch_sync(batch, True)
        ids = [r.actor_id for r in responses if not r.error]
        self.actors.extend(self.world.get_actors(ids))

    def _set_start_speed(self, speed_mps: float) -> None:
        forward = self.ego.get_transform().get_forward_vector()
        self.ego.set_target_velocity(self.carla.Vector3D(forward.x * speed_mps, forward.y * speed_mps, 0.0))

    # ------------------------------------------------------------------ driving and reading
    def apply(self, command: PedalCommand) -> None:
        steer = min(max(-command.steer_rad / self.max_steer_rad, -1.0), 1.0)  # CARLA: right > 0
        self.ego.apply_control(
            self.carla.VehicleControl(throttle=command.throttle, steer=steer, brake=command.brake)
        )

    def tick(self) -> None:
        self.world.tick()

    def read_ego(self) -> EgoReading:
        transform = self.ego.get_transform()
        x, y, yaw = to_right_handed(transform.location.x, transform.location.y, transform.rotation.yaw)
        velocity = self.ego.get_velocity()
        offset = self.rear_axle_offset_m
        pose = np.array([x + offset * math.cos(yaw), y + offset * math.sin(yaw), yaw])
        return EgoReading(
            pose=pose,
            centre=np.array([x, y]),
            speed_mps=math.hypot(velocity.x, velocity.y),
            steer_rad=-self.ego.get_control().steer * self.max_steer_rad,
            yaw_rate_radps=-math.radians(self.ego.get_angular_velocity().z),
        )

    def other_boxes(self) -> tuple[np.ndarray, np.ndarray]:
        """Boxes ``[B, 5]`` of other road users (vehicles, walkers) and of obstacles (the map's
        parked vehicles and static props)."""
        road_users, props = [], []
        for actor in self.world.get_actors():
            kind = actor.type_id
            if actor.id == self.ego.id or not kind.startswith(("vehicle.", "walker.", "static.prop")):
                continue
            box = box_from_carla(actor.get_transform(), actor.bounding_box)
            (props if kind.startswith("static.") else road_users).append(box)
        users = np.asarray(road_users, dtype=np.float64).reshape(-1, 5) if road_users else empty_boxes()
        static = np.asarray(props, dtype=np.float64).reshape(-1, 5) if props else empty_boxes()
        return users, np.concatenate([self.geometry.parked_boxes, static])

    def off_road(self, centre: np.ndarray) -> bool:
        """Whether the point (right-handed) lies outside every driving lane."""
        location = self.carla.Location(x=float(centre[0]), y=-float(centre[1]), z=0.0)
        return self.map.get_waypoint(location, project_to_road=False) is None

    def red_light(self) -> bool:
        """Whether a red or yellow traffic light governs the ego now."""
        if not self.ego.is_at_traffic_light():
            return False
        state = self.ego.get_traffic_light_state()
        return state in (self.carla.TrafficLightState.Red, self.carla.TrafficLightState.Yellow)

    # ------------------------------------------------------------------ teardown
    def destroy_actors(self) -> None:
        """Stop the sensors, then destroy sensors and actors in one batch (sensors first)."""
        for sensor in self.sensors:
            self._attempt(f"stop sensor {sensor.id}", sensor.stop)
        doomed = [actor.id for actor in self.sensors + self.actors]
        self.sensors, self.actors, self.ego = [], [], None
        if doomed:
            destroy = self.carla.command.DestroyActor
            self._attempt("destroy actors", self.client.apply_batch_sync, [destroy(i) for i in doomed], False)

    def close(self) -> None:
        """Destroy everything spawned and give the server back as found; never raises."""
        self.destroy_actors()
        if self.traffic_manager is not None:
            self._attempt("traffic manager sync off", self.traffic_manager.set_synchronous_mode, False)
            self.traffic_manager = None
        if self.world is not None and self.original_settings is not None:
            self._attempt("restore world settings", self.world.apply_settings, self.original_settings)
            self.original_settings = None

    def _attempt(self, what: str, action: Any, *args: Any) -> None:
        try:
            action(*args)
        except Exception as error:  # a dead server must not stop the rest of the teardown
            self.teardown_errors.append(f"{what}: {error}")


def box_from_level(bounding_box: Any) -> tuple[float, float, float, float, float]:
    """A level bounding box (world coordinates, as ``world.get_level_bbs`` gives them)."""
    x, y, yaw = to_right_handed(bounding_box.location.x, bounding_box.location.y, bounding_box.rotation.yaw)
    return x, y, yaw, bounding_box.extent.x, bounding_box.extent.y


def _drop_repeats(points: np.ndarray) -> np.ndarray:
    keep = np.concatenate([[True], np.linalg.norm(np.diff(points, axis=0), axis=-1) > 1e-3])
    return points[keep]
