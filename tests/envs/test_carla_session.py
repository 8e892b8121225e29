"""One CARLA server's session against fake client objects, and finding the servers.

Teardown order, settings, frames and the unreachable-server error; no server needed (the last
test uses the real client against a closed port).
"""

from __future__ import annotations

import math
import socket
import time

import numpy as np
import pytest

from tests.envs.test_carla_fakes import FakeClient, fake_carla_module
from training.common.errors import UserError
from training.envs.carla.config import CARLA_PORT_STRIDE, CarlaConfig
from training.envs.carla.connection import (
    ServerAddress,
    carla_client,
    connect_all,
    lease_slots,
    release_slots,
    server_addresses,
)
from training.envs.carla.controller import PedalCommand
from training.envs.carla.env import scenario_orders
from training.envs.carla.session import CarlaSession

ADDRESS = ServerAddress("fake", 2000)


def open_session(client: FakeClient, cfg: CarlaConfig | None = None) -> CarlaSession:
    session = CarlaSession(fake_carla_module(), client, ADDRESS, cfg or CarlaConfig(difficulty=0.5), 1.0)
    session.open()
    return session


def start(session: CarlaSession, seed: int = 3) -> int:
    rng, spawn_order, traffic_order = scenario_orders(seed, session.spawn_xy(), 80.0)
    return session.start_episode(spawn_order, traffic_order, rng, seed)


def test_open_switches_to_synchronous_mode_and_binds_the_traffic_manager() -> None:
    client = FakeClient()
    open_session(client)
    assert client.world.settings.synchronous_mode and client.world.settings.fixed_delta_seconds == 0.1
    assert client.traffic_manager_ports == [2003]
    assert ("tm_sync", True) in client.log
    assert not any(entry[0] == "load_world" for entry in client.log)  # Town01 is already loaded


def test_another_town_is_loaded_and_an_unknown_one_refused() -> None:
    client = FakeClient()
    open_session(client, CarlaConfig(town="Town02"))
    assert ("load_world", "Town02") in client.log
    with pytest.raises(UserError, match=r"--town Town99 is not on the CARLA server at fake:2000.*Town01"):
        open_session(FakeClient(), CarlaConfig(town="Town99"))


def test_teardown_order_stops_sensors_destroys_everything_then_restores_settings() -> None:
    client = FakeClient()
    session = open_session(client)
    start(session)
    sensors = [s.id for s in session.sensors]
    others = [a.id for a in session.actors]
    assert len(sensors) == 2 and len(others) >= 2  # the ego and some traffic
    client.log.clear()
    session.close()
    stops = [("stop", i) for i in sensors]
    destroys = [("destroy", i) for i in sensors + others]
    assert client.log == [*stops, *destroys, ("tm_sync", False), ("settings", False, None)]
    assert client.world.actors == {}
    session.close()  # a second close changes nothing
    assert client.log[-1] == ("settings", False, None) and len(client.log) == len(stops + destroys) + 2


def test_teardown_goes_on_when_a_step_of_it_fails() -> None:
    client = FakeClient()
    session = open_session(client)
    start(session)

    def broken_stop() -> None:
        raise RuntimeError("sensor gone")

    session.sensors[0].stop = broken_stop
    session.close()
    assert client.world.actors == {}
    assert client.world.settings.synchronous_mode is False
    assert session.teardown_errors and "sensor gone" in session.teardown_errors[0]


def test_a_new_episode_destroys_the_last_one_first() -> None:
    client = FakeClient()
    session = open_session(client, CarlaConfig(difficulty=0.0))
    start(session, seed=1)
    first = {a.id for a in session.sensors + session.actors}
    start(session, seed=2)
    assert first.isdisjoint(client.world.actors)
    assert len(client.world.actors) == 3  # ego and two sensors


def test_same_seed_same_spawn_point_and_route() -> None:
    session = open_session(FakeClient())
    spawn = start(session, seed=11)
    route = session.route_points(spawn, np.random.default_rng(0), 20.0)
    again = open_session(FakeClient())
    assert start(again, seed=11) == spawn
    assert again.route_points(spawn, np.random.default_rng(0), 20.0) == pytest.approx(route)
    assert route[0, 0] == pytest.approx(session.spawn_xy()[spawn, 0] - 20.0)  # lead-in behind the start


def test_readings_are_right_handed_and_steering_is_mirrored() -> None:
    client = FakeClient()
    session = open_session(client, CarlaConfig(difficulty=0.0))
    start(session)
    ego = session.ego
    ego.transform.location.y = 2.0  # CARLA y points right
    ego.transform.rotation.yaw = 90.0  # facing CARLA +y: to the right
    reading = session.read_ego()
    assert reading.centre[1] == pytest.approx(-2.0)
    assert reading.pose[2] == pytest.approx(-math.pi / 2)
    session.apply(PedalCommand(throttle=0.5, brake=0.0, steer_rad=0.3))  # a left turn
    assert ego.control.steer == pytest.approx(-0.3 / math.radians(70.0))
    assert session.wheelbase_m == pytest.approx(2.9)
    assert session.rear_axle_offset_m == pytest.approx(-1.45)


def test_off_road_and_boxes() -> None:
    session = open_session(FakeClient(), CarlaConfig(difficulty=0.0))
    start(session)
    assert not session.off_road(np.array([10.0, 1.0]))
    assert session.off_road(np.array([10.0, 2.0]))
    users, obstacles = session.other_boxes()
    assert users.shape == (0, 5)
    assert obstacles[0] == pytest.approx([200.0, -3.0, 0.0, 2.4, 0.95])  # the parked car, y mirrored


def test_ports_are_a_stride_apart_and_bounded() -> None:
    addresses = server_addresses("h", 2000, [0, 1, 3])
    assert [a.port for a in addresses] == [2000, 2000 + CARLA_PORT_STRIDE, 2000 + 3 * CARLA_PORT_STRIDE]
    assert CARLA_PORT_STRIDE >= 4  # RPC, streaming (+1), secondary (+2), our traffic manager (+3)
    with pytest.raises(UserError, match="above"):
        server_addresses("h", 65500, list(range(10)))


def test_slots_go_to_the_lowest_free_ones() -> None:
    first = lease_slots(2)
    second = lease_slots(2)
    try:
        assert second == [first[-1] + 1, first[-1] + 2]
        release_slots(first)
        third = lease_slots(1)
        assert third == [first[0]]
        release_slots(third)
    finally:
        release_slots(first + second)


def test_every_unreachable_server_is_named() -> None:
    def connect(address: ServerAddress, timeout: float) -> str:
        if address.port == 2004:
            return "client"
        raise RuntimeError("time-out")

    addresses = server_addresses("h", 2000, [0, 1, 2])
    with pytest.raises(UserError) as error:
        connect_all(addresses, 1.0, connect)
    message = str(error.value)
    assert "h:2000, h:2008" in message and "h:2004" not in message
    assert "-carla-rpc-port=$p" in message and "\n" not in message


def test_the_real_client_fails_fast_on_a_closed_port() -> None:
    pytest.importorskip("carla")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    started = time.monotonic()
    with pytest.raises(
        UserError, match=rf"127.0.0.1:{port}.*CarlaUE4.sh -RenderOffScreen -carla-rpc-port={port}"
    ):
        connect_all([ServerAddress("127.0.0.1", port)], 0.5, carla_client)
    assert time.monotonic() - started < 5.0
