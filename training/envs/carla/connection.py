"""Finding the CARLA servers: one per world, ports a fixed stride apart, all probed at once.

World ``i`` of a batch talks to ``host:(carla_port + slot * CARLA_PORT_STRIDE)``, where ``slot``
is the lowest slot no other live environment of this process holds: a trainer's training
worlds take slots ``0..N-1`` and its evaluation worlds, built while the first are alive, the next
ones. A closed environment gives its slots back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from training.common.errors import UserError
from training.envs.carla.config import CARLA_PORT_STRIDE, TRAFFIC_MANAGER_PORT_OFFSET

DOCS = "docs/carla.md"
_MAX_PORT = 65535 - TRAFFIC_MANAGER_PORT_OFFSET

_lock = threading.Lock()
_leased_slots: set[int] = set()


@dataclass(frozen=True)
class ServerAddress:
    """Where one world's CARLA server listens (RPC port; streaming and secondary ports follow)."""

    host: str
    port: int

    @property
    def traffic_manager_port(self) -> int:
        return self.port + TRAFFIC_MANAGER_PORT_OFFSET

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


def import_carla() -> ModuleType:
    """The ``carla`` client module, or a ``UserError`` naming the extra that provides it."""
    try:
        import carla
    except ImportError as error:
        raise UserError(
            f"--env carla needs the 'carla' extra, which is not installed ({error}); "
            "install it with: pip install -e '.[carla]'"
        ) from None
    return carla


def lease_slots(count: int) -> list[int]:
    """Reserve the ``count`` lowest free server slots of this process."""
    with _lock:
        slots, candidate = [], 0
        while len(slots) < count:
            if candidate not in _leased_slots:
                slots.append(candidate)
            candidate += 1
        _leased_slots.update(slots)
    return slots


def release_slots(slots: Sequence[int]) -> None:
    with _lock:
        _leased_slots.difference_update(slots)


def server_addresses(host: str, base_port: int, slots: Sequence[int]) -> list[ServerAddress]:
    """The servers of ``slots``; a ``UserError`` when a port falls outside the valid range."""
    addresses = [ServerAddress(host, base_port + slot * CARLA_PORT_STRIDE) for slot in slots]
    too_high = [a for a in addresses if a.port > _MAX_PORT]
    if too_high:
        raise UserError(
            f"{len(addresses)} CARLA worlds from --carla-port {base_port} need port {too_high[-1].port}, "
            f"above {_MAX_PORT}; use a lower --carla-port or fewer worlds (see {DOCS})"
        )
    return addresses


def _port_runs(ports: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted ports grouped into runs ``(first, last)`` of consecutive slots."""
    runs: list[tuple[int, int]] = []
    for port in sorted(ports):
        if runs and port == runs[-1][1] + CARLA_PORT_STRIDE:
            runs[-1] = (runs[-1][0], port)
        else:
            runs.append((port, port))
    return runs


def describe_addresses(addresses: Sequence[ServerAddress]) -> str:
    """``host:2000, host:2004`` for a few servers, ``host:2000..2476 (120 servers)`` for many."""
    if len(addresses) <= 4:
        return ", ".join(str(a) for a in addresses)
    by_host: dict[str, list[int]] = {}
    for address in addresses:
        by_host.setdefault(address.host, []).append(address.port)
    parts = []
    for host, ports in by_host.items():
        runs = ", ".join(f"{a}..{b}" if a != b else f"{a}" for a, b in _port_runs(ports))
        parts.append(f"{host}:{runs}")
    return f"{'; '.join(parts)} ({len(addresses)} servers)"


def start_hint(addresses: Sequence[ServerAddress]) -> str:
    """How to start the missing servers."""
    if len(addresses) == 1:
        return f"start one with: ./CarlaUE4.sh -RenderOffScreen -carla-rpc-port={addresses[0].port}"
    runs = _port_runs([a.port for a in addresses])
    ports = " ".join(f"$(seq {a} {CARLA_PORT_STRIDE} {b})" if a != b else str(a) for a, b in runs)
    return (
        f"start one per world: for p in {ports}; do ./CarlaUE4.sh -RenderOffScreen -carla-rpc-port=$p & done"
    )


def unreachable_error(failed: Sequence[ServerAddress], timeout_s: float) -> UserError:
    noun = "servers" if len(failed) > 1 else "server"
    return UserError(
        f"no CARLA {noun} answered within {timeout_s:g} s at {describe_addresses(failed)} "
        f"({start_hint(failed)}; one server per world, RPC ports {CARLA_PORT_STRIDE} apart, see {DOCS})"
    )


def connect_all(
    addresses: Sequence[ServerAddress], timeout_s: float, connect: Callable[[ServerAddress, float], Any]
) -> list[Any]:
    """``connect(address, timeout_s)`` for every address at once; a ``UserError`` naming every
    address that failed (after at most about ``timeout_s`` seconds in all)."""
    with ThreadPoolExecutor(max_workers=max(1, len(addresses))) as pool:
        futures = [pool.submit(_try_connect, connect, a, timeout_s) for a in addresses]
        results = [f.result() for f in futures]
    failed = [a for a, (client, _) in zip(addresses, results, strict=True) if client is None]
    if failed:
        raise unreachable_error(failed, timeout_s)
    return [client for client, _ in results]


def _try_connect(
    connect: Callable[[ServerAddress, float], Any], address: ServerAddress, timeout_s: float
) -> tuple[Any, Exception | None]:
    try:
        return connect(address, timeout_s), None
    except RuntimeError as error:  # the client's time-out, a refused or reset connection
        return None, error


def carla_client(address: ServerAddress, timeout_s: float) -> Any:
    """A ``carla.Client`` that has answered a version request within ``timeout_s``."""
    carla = import_carla()
    client = carla.Client(address.host, address.port, worker_threads=1)
    client.set_timeout(timeout_s)
    client.get_server_version()  # raises RuntimeError when nothing answers in time
    return client
