"""Fake CARLA client objects shared by the CARLA tests (this module holds no tests).

A straight one-lane road along CARLA's +x axis (lane centre y = 0, 3.5 m wide), spawn points every
30 m, a kinematic car for every vehicle, autopilot traffic at a constant speed, a collision sensor
that fires when boxes overlap and a lane-invasion sensor that fires when the ego's centre crosses
a lane edge. Frames are CARLA's (left-handed, yaw in degrees, clockwise). Every call that changes
the server is appended to ``FakeClient.log`` so tests can check the teardown order.
"""

from __future__ import annotations

import math
import types
from dataclasses import dataclass, field
from typing import Any

LANE_WIDTH_M = 3.5
SPAWN_SPACING_M = 30.0
NUM_SPAWN_POINTS = 11
AUTOPILOT_SPEED_MPS = 5.0
HALF_LENGTH_M, HALF_WIDTH_M = 2.4, 0.95
WHEELBASE_M, MAX_STEER_DEG = 2.9, 70.0


@dataclass
class Vector3D:
    x: float = 0.0
    y: float = 0.0
    z: float = 0.0


Location = Vector3D


@dataclass
class Rotation:
    pitch: float = 0.0
    yaw: float = 0.0
    roll: float = 0.0


@dataclass
class Transform:
    location: Vector3D = field(default_factory=Vector3D)
    rotation: Rotation = field(default_factory=Rotation)

    def get_forward_vector(self) -> Vector3D:
        yaw = math.radians(self.rotation.yaw)
        return Vector3D(math.cos(yaw), math.sin(yaw), 0.0)


@dataclass
class BoundingBox:
    location: Vector3D
    extent: Vector3D
    rotation: Rotation = field(default_factory=Rotation)


@dataclass
class VehicleControl:
    throttle: float = 0.0
    steer: float = 0.0
    brake: float = 0.0


@dataclass
class WorldSettings:
    synchronous_mode: bool = False
    fixed_delta_seconds: float | None = None


class Command:
    def __init__(self, name: str, *args: Any) -> None:
        self.name, self.args = name, args
        self.follow: Command | None = None

    def then(self, other: Command) -> Command:
        self.follow = other
        return self


def _command_module() -> types.SimpleNamespace:
    return types.SimpleNamespace(
        SpawnActor=lambda bp, transform: Command("spawn", bp, transform),
        SetAutopilot=lambda actor, on, port: Command("autopilot", on, port),
        DestroyActor=lambda actor_id: Command("destroy", actor_id),
        FutureActor=object(),
    )


def fake_carla_module() -> types.SimpleNamespace:
    """The parts of the ``carla`` module that ``session.py`` uses."""
    return types.SimpleNamespace(
        Transform=Transform,
        Location=Location,
        Vector3D=Vector3D,
        VehicleControl=VehicleControl,
        command=_command_module(),
        CityObjectLabel=types.SimpleNamespace(Car=14, Truck=15, Bus=16, Motorcycle=18, Bicycle=19),
        TrafficLightState=types.SimpleNamespace(Red=0, Yellow=1, Green=2),
    )


class Blueprint:
    def __init__(self, blueprint_id: str) -> None:
        self.id = blueprint_id
        self.attributes = {"number_of_wheels": "4"}

    def set_attribute(self, key: str, value: str) -> None:
        self.attributes[key] = value

    def get_attribute(self, key: str) -> str:
        return self.attributes[key]


class BlueprintLibrary:
    def __init__(self) -> None:
        names = ["vehicle.lincoln.mkz_2020", "vehicle.audi.a2", "vehicle.tesla.model3"]
        self.blueprints = {name: Blueprint(name) for name in names}
        for sensor in ("sensor.other.collision", "sensor.other.lane_invasion"):
            self.blueprints[sensor] = Blueprint(sensor)

    def find(self, name: str) -> Blueprint:
        return Blueprint(name)

    def filter(self, pattern: str) -> list[Blueprint]:
        prefix = pattern.rstrip("*")
        return [Blueprint(name) for name in self.blueprints if name.startswith(prefix)]


class Waypoint:
    def __init__(self, x: float) -> None:
        self.transform = Transform(Vector3D(x, 0.0, 0.0))
        self.lane_width = LANE_WIDTH_M

    def next(self, distance: float) -> list[Waypoint]:
        return [Waypoint(self.transform.location.x + distance)]

    def previous(self, distance: float) -> list[Waypoint]:
        return [Waypoint(self.transform.location.x - distance)]


class Map:
    name = "Carla/Maps/Town01"

    def generate_waypoints(self, distance: float) -> list[Waypoint]:
        count = int(700 / distance)
        return [Waypoint(-100 + i * distance) for i in range(count)]

    def get_spawn_points(self) -> list[Transform]:
        return [Transform(Vector3D(i * SPAWN_SPACING_M, 0.0, 0.3)) for i in range(NUM_SPAWN_POINTS)]

    def get_waypoint(self, location: Vector3D, project_to_road: bool = True) -> Waypoint | None:
        if not project_to_road and abs(location.y) > LANE_WIDTH_M / 2:
            return None
        return Waypoint(location.x)


class Actor:
    def __init__(self, world: World, actor_id: int, type_id: str, transform: Transform) -> None:
        self.world, self.id, self.type_id = world, actor_id, type_id
        self.transform = Transform(
            Vector3D(transform.location.x, transform.location.y, 0.0), Rotation(yaw=transform.rotation.yaw)
        )
        self.bounding_box = BoundingBox(Vector3D(), Vector3D(HALF_LENGTH_M, HALF_WIDTH_M, 0.75))
        self.speed = 0.0
        self.control = VehicleControl()
        self.autopilot = False
        self.callback: Any = None
        self.listening = False
        self.parent: Actor | None = None

    # vehicle
    def get_transform(self) -> Transform:
        return self.transform

    def get_velocity(self) -> Vector3D:
        forward = self.transform.get_forward_vector()
        return Vector3D(forward.x * self.speed, forward.y * self.speed, 0.0)

    def get_angular_velocity(self) -> Vector3D:
        steer = math.radians(self.control.steer * MAX_STEER_DEG)
        return Vector3D(0.0, 0.0, math.degrees(self.speed * math.tan(steer) / WHEELBASE_M))

    def get_control(self) -> VehicleControl:
        return self.control

    def apply_control(self, control: VehicleControl) -> None:
        self.control = control

    def set_target_velocity(self, velocity: Vector3D) -> None:
        self.speed = math.hypot(velocity.x, velocity.y)

    def get_physics_control(self) -> Any:
        x, y = self.transform.location.x * 100, self.transform.location.y * 100
        half = WHEELBASE_M * 50

        def wheel(dx: float, dy: float) -> Any:
            return types.SimpleNamespace(
                position=Vector3D(x + dx, y + dy, 0.0), max_steer_angle=MAX_STEER_DEG
            )

        return types.SimpleNamespace(
            wheels=[wheel(half, -80), wheel(half, 80), wheel(-half, -80), wheel(-half, 80)]
        )

    def is_at_traffic_light(self) -> bool:
        return False

    # sensor
    def listen(self, callback: Any) -> None:
        self.callback, self.listening = callback, True

    def stop(self) -> None:
        self.world.client.log.append(("stop", self.id))
        self.listening = False


class World:
    def __init__(self, client: FakeClient) -> None:
        self.client = client
        self.map = Map()
        self.settings = WorldSettings()
        self.actors: dict[int, Actor] = {}
        self.next_id = 100
        self.fail_tick_after: int | None = None  # raise RuntimeError on this tick (a dead server)
        self.ticks = 0

    def get_map(self) -> Map:
        return self.map

    def get_settings(self) -> WorldSettings:
        return WorldSettings(self.settings.synchronous_mode, self.settings.fixed_delta_seconds)

    def apply_settings(self, settings: WorldSettings) -> None:
        self.client.log.append(("settings", settings.synchronous_mode, settings.fixed_delta_seconds))
        self.settings = WorldSettings(settings.synchronous_mode, settings.fixed_delta_seconds)

    def get_blueprint_library(self) -> BlueprintLibrary:
        return BlueprintLibrary()

    def get_level_bbs(self, label: int) -> list[BoundingBox]:
        if label != 14:  # one parked car on the right shoulder of the road
            return []
        return [BoundingBox(Vector3D(200.0, 3.0, 0.0), Vector3D(HALF_LENGTH_M, HALF_WIDTH_M, 0.75))]

    def _add(self, type_id: str, transform: Transform) -> Actor:
        actor = Actor(self, self.next_id, type_id, transform)
        self.next_id += 1
        self.actors[actor.id] = actor
        return actor

    def try_spawn_actor(self, blueprint: Blueprint, transform: Transform) -> Actor | None:
        for other in self.actors.values():
            if other.type_id.startswith("vehicle.") and _overlap(other.transform, transform):
                return None
        return self._add(blueprint.id, transform)

    def spawn_actor(
        self, blueprint: Blueprint, transform: Transform, attach_to: Actor | None = None
    ) -> Actor:
        actor = self._add(blueprint.id, transform)
        actor.parent = attach_to
        return actor

    def get_actors(self, ids: list[int] | None = None) -> list[Actor]:
        if ids is None:
            return list(self.actors.values())
        return [self.actors[i] for i in ids]

    def tick(self) -> int:
        self.ticks += 1
        if self.fail_tick_after is not None and self.ticks > self.fail_tick_after:
            raise RuntimeError("time-out of 1000ms while waiting for the simulator")
        dt = self.settings.fixed_delta_seconds or 0.05
        vehicles = [a for a in self.actors.values() if a.type_id.startswith("vehicle.")]
        for vehicle in vehicles:
            _move(vehicle, dt)
        self._fire_sensors(vehicles)
        return self.ticks

    def _fire_sensors(self, vehicles: list[Actor]) -> None:
        for sensor in [a for a in self.actors.values() if a.parent is not None and a.listening]:
            ego = sensor.parent
            if sensor.type_id.endswith("collision"):
                if any(v is not ego and _overlap(v.transform, ego.transform) for v in vehicles):
                    sensor.callback(object())
            elif abs(ego.transform.location.y) > LANE_WIDTH_M / 2 and not getattr(ego, "outside", False):
                sensor.callback(object())
            ego.outside = abs(ego.transform.location.y) > LANE_WIDTH_M / 2


def _overlap(a: Transform, b: Transform) -> bool:
    return (
        abs(a.location.x - b.location.x) < 2 * HALF_LENGTH_M
        and abs(a.location.y - b.location.y) < 2 * HALF_WIDTH_M
    )


def _move(vehicle: Actor, dt: float) -> None:
    """Kinematic bicycle in CARLA's frame (steer > 0 turns right, i.e. yaw grows)."""
    if vehicle.autopilot:
        vehicle.speed = AUTOPILOT_SPEED_MPS
    else:
        accel = 4.0 * vehicle.control.throttle - 8.0 * vehicle.control.brake
        vehicle.speed = max(vehicle.speed + accel * dt, 0.0)
    steer = math.radians(vehicle.control.steer * MAX_STEER_DEG)
    yaw = math.radians(vehicle.transform.rotation.yaw)
    vehicle.transform.location.x += vehicle.speed * math.cos(yaw) * dt
    vehicle.transform.location.y += vehicle.speed * math.sin(yaw) * dt
    vehicle.transform.rotation.yaw = math.degrees(yaw + vehicle.speed * math.tan(steer) / WHEELBASE_M * dt)


class TrafficManager:
    def __init__(self, client: FakeClient, port: int) -> None:
        self.client, self.port = client, port

    def set_synchronous_mode(self, on: bool) -> None:
        self.client.log.append(("tm_sync", on))

    def set_random_device_seed(self, seed: int) -> None:
        self.client.tm_seeds.append(seed)


class FakeClient:
    """A client of one fake server; ``log`` records every change it makes to the server."""

    def __init__(self) -> None:
        self.log: list[tuple[Any, ...]] = []
        self.tm_seeds: list[int] = []
        self.world = World(self)
        self.traffic_manager_ports: list[int] = []

    def get_world(self) -> World:
        return self.world

    def get_available_maps(self) -> list[str]:
        return ["/Game/Carla/Maps/Town01", "/Game/Carla/Maps/Town02"]

    def set_timeout(self, seconds: float) -> None:
        self.timeout = seconds

    def load_world(self, town: str) -> World:
        self.log.append(("load_world", town))
        self.world.map.name = f"Carla/Maps/{town}"
        return self.world

    def get_trafficmanager(self, port: int) -> TrafficManager:
        self.traffic_manager_ports.append(port)
        return TrafficManager(self, port)

    def apply_batch_sync(self, commands: list[Command], do_tick: bool = False) -> list[Any]:
        responses = []
        for command in commands:
            if command.name == "destroy":
                self.log.append(("destroy", command.args[0]))
                self.world.actors.pop(command.args[0], None)
                responses.append(types.SimpleNamespace(error="", actor_id=command.args[0]))
            elif command.name == "spawn":
                actor = self.world.try_spawn_actor(*command.args)
                if actor is None:
                    responses.append(types.SimpleNamespace(error="collision at spawn", actor_id=0))
                    continue
                actor.autopilot = command.follow is not None
                responses.append(types.SimpleNamespace(error="", actor_id=actor.id))
        if do_tick:
            self.world.tick()
        return responses
