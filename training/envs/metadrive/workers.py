"""Worker processes that each own one MetaDrive world.

MetaDrive allows one engine per process (``initialize_engine`` raises otherwise), so each world
lives in its own process, started with ``spawn`` (a forked Panda3D/Bullet engine or torch thread
pool is not safe). The parent sends ``(command, argument)`` and waits for ``(status, payload)``;
every failure the parent can see (a world that cannot start, an exception in a world, a worker that
died or stopped answering) becomes a one-line ``UserError`` naming the world, and every worker is
stopped on ``close()``, on an error while starting, and when the parent exits.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import signal
import time
from multiprocessing.connection import Connection, wait
from typing import Any

from training.common.errors import UserError
from training.envs.metadrive.config import MetaDriveWorldConfig

_POLL_S = 0.5  # how often a waiting parent checks that the worker is still alive
_JOIN_S = 10.0  # how long close() waits for a worker to exit before terminating it


def _one_line(error: BaseException) -> str:
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}" if not isinstance(error, UserError) else text


def _serve(conn: Connection, config: MetaDriveWorldConfig) -> None:
    """Worker main loop: build the world, then answer ``reset``/``step`` until ``close``."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle; it closes us
    import torch

    torch.set_num_threads(1)
    try:
        from training.envs.metadrive.world import MetaDriveWorld

        world = MetaDriveWorld(config)
    except Exception as error:  # reported to the parent as one line, which raises it there
        conn.send(("error", f"could not start: {_one_line(error)}"))
        return
    conn.send(("ok", None))
    try:
        while True:
            try:
                command, argument = conn.recv()
            except (EOFError, OSError):  # the parent is gone
                return
            if command == "close":
                return
            try:
                conn.send(("ok", _handle(world, command, argument)))
            except Exception as error:
                conn.send(("error", f"{command} failed: {_one_line(error)}"))
    finally:
        world.close()


def _handle(world: Any, command: str, argument: Any) -> Any:
    """``reset`` (argument: seed), ``step`` (a plan) or ``step_then_reset`` (a plan and the seed to
    reset to if the episode ends: one round trip for a world that steps on its own)."""
    if command == "reset":
        return world.reset(argument)
    if command == "step":
        return world.step(argument)
    plan, next_seed = argument
    stepped = world.step(plan)
    ended = stepped.terminated or stepped.truncated
    return stepped, world.reset(next_seed) if ended else None


class WorldPool:
    """``num_worlds`` MetaDrive worlds, one per worker process."""

    def __init__(self, num_worlds: int, config: MetaDriveWorldConfig, timeout_s: float = 300.0) -> None:
        self.timeout_s = timeout_s
        self._processes: list[mp.process.BaseProcess] = []
        self._connections: list[Connection] = []
        context = mp.get_context("spawn")
        try:
            for _ in range(num_worlds):
                parent, child = context.Pipe()
                process = context.Process(target=_serve, args=(child, config), daemon=True)
                process.start()
                child.close()
                self._processes.append(process)
                self._connections.append(parent)
            for index in range(num_worlds):
                self._receive(index)
        except BaseException:
            self.close()
            raise

    def __len__(self) -> int:
        return len(self._processes)

    def pids(self, indices: list[int] | None = None) -> list[int]:
        """Process ids of the live workers ``indices`` (default: all, in order)."""
        chosen = range(len(self._processes)) if indices is None else indices
        processes = [self._processes[i] for i in chosen if i < len(self._processes)]
        return [p.pid for p in processes if p.pid is not None and p.is_alive()]

    def call(self, indices: list[int], command: str, arguments: list[Any]) -> list[Any]:
        """Send ``command`` to the worlds ``indices`` (all at once), then collect their answers."""
        for index, argument in zip(indices, arguments, strict=True):
            self.start(index, command, argument)
        return [self.collect(index) for index in indices]

    def start(self, index: int, command: str, argument: Any) -> None:
        """Send ``command`` to world ``index`` without waiting; ``collect(index)`` gets its answer."""
        try:
            self._connections[index].send((command, argument))
        except (BrokenPipeError, OSError):
            raise UserError(self._died(index)) from None

    def collect(self, index: int) -> Any:
        """The answer of world ``index`` to the command last started there (waits for it)."""
        return self._receive(index)

    def ready(self, indices: list[int]) -> list[int]:
        """The workers among ``indices`` whose answers have arrived, in index order; waits for one at
        least (a dead or silent worker raises as in :meth:`collect`)."""
        by_connection = {self._connections[i]: i for i in indices}
        deadline = time.monotonic() + self.timeout_s
        while True:
            arrived = wait(list(by_connection), timeout=_POLL_S)
            if arrived:
                return sorted(by_connection[c] for c in arrived)  # type: ignore[index]
            for index in indices:
                if not self._processes[index].is_alive() and not self._connections[index].poll(0):
                    raise UserError(self._died(index))
            if time.monotonic() > deadline:
                raise UserError(f"MetaDrive workers {indices} did not answer within {self.timeout_s:.0f} s")

    def _died(self, index: int) -> str:
        process = self._processes[index]
        process.join(timeout=1.0)
        return f"MetaDrive worker {index} died (exit code {process.exitcode})"

    def _receive(self, index: int) -> Any:
        connection, process = self._connections[index], self._processes[index]
        deadline = time.monotonic() + self.timeout_s
        while not connection.poll(_POLL_S):
            if not process.is_alive() and not connection.poll(0):
                raise UserError(self._died(index))
            if time.monotonic() > deadline:
                raise UserError(f"MetaDrive worker {index} did not answer within {self.timeout_s:.0f} s")
        try:
            status, payload = connection.recv()
        except (EOFError, OSError):
            raise UserError(self._died(index)) from None
        if status != "ok":
            raise UserError(f"MetaDrive worker {index}: {payload}")
        return payload

    def close(self) -> None:
        """Stop every worker (idempotent): ask politely, then terminate, then kill."""
        for connection, process in zip(self._connections, self._processes, strict=True):
            if process.is_alive():
                with contextlib.suppress(BrokenPipeError, OSError):
                    connection.send(("close", None))
        deadline = time.monotonic() + _JOIN_S
        for process in self._processes:
            process.join(timeout=max(0.0, deadline - time.monotonic()))
            if process.is_alive():
                process.terminate()
                process.join(timeout=2.0)
            if process.is_alive():
                process.kill()
                process.join()
        for connection in self._connections:
            connection.close()
        self._processes, self._connections = [], []
