"""How many worlds a command starts when each world is a process of its own (MetaDrive).

The toy world is one batch of tensors: its defaults (120 recording worlds, 32 training worlds, one
evaluation world per episode) cost nothing. A simulator with one engine per process pays a process
and its memory per world: on a 2-core machine with 23 GB, the toy defaults started 61 MetaDrive
workers and took 18 GB. So where the user did not give a number, a command sizes process-backed
worlds to the machine: no more stepping at once than there are cores, and no more alive at once
than half the available memory holds; it says what it chose in one line. A number the user gives
is obeyed; the PPO trainer's ``--num-envs``, whose documented default is a number (32), is lowered
from that default unless ``--sim-workers`` asks for the processes.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

# Resident memory of one MetaDrive worker with the adapter (measured: 61 workers, 18 GB).
MEMORY_PER_WORKER_BYTES = 300 * 2**20
MEMORY_SHARE = 0.5  # of the memory available when the command starts
# Each batch of worlds keeps one more worker than it has worlds: the spare that prepares the next
# scenario while the worlds step (training/envs/metadrive/env.py). It waits most of the time, so it
# counts against memory, not cores.
SPARE_WORKERS_PER_GROUP = 1
PROCESS_BACKED_ENVS = frozenset({"metadrive"})


@dataclass(frozen=True)
class MachineCapacity:
    """Worlds with a process each that this machine runs well."""

    cores: int
    available_memory_bytes: int

    @property
    def stepping(self) -> int:
        """Worlds stepping at the same time: one per core."""
        return max(1, self.cores)

    @property
    def alive(self) -> int:
        """Worlds alive at the same time (training and evaluation worlds together)."""
        return max(1, int(self.available_memory_bytes * MEMORY_SHARE // MEMORY_PER_WORKER_BYTES))

    def worlds(self, concurrent_groups: int = 1) -> int:
        """Worlds per group when ``concurrent_groups`` groups (each with its spare worker) are alive at
        once and step in turn."""
        return max(1, min(self.stepping, self.alive // concurrent_groups - SPARE_WORKERS_PER_GROUP))


def machine_capacity() -> MachineCapacity:
    """This machine's cores (those this process may run on) and available memory."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    return MachineCapacity(cores=cores, available_memory_bytes=_available_memory_bytes())


def _available_memory_bytes() -> int:
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def is_process_backed(env_names: list[str] | tuple[str, ...]) -> bool:
    return any(name in PROCESS_BACKED_ENVS for name in env_names)


def announce(message: str) -> None:
    """One line for the user on stderr: what was chosen for the machine, or what a command does other
    than it was asked (a resume that finds no checkpoint, a lost metrics file)."""
    print(message, file=sys.stderr, flush=True)


def describe(capacity: MachineCapacity) -> str:
    return f"{capacity.cores} cores, {capacity.available_memory_bytes / 2**30:.0f} GiB available"


def default_worlds(env: str, given: int | None, toy_default: int, flag: str, purpose: str) -> int:
    """``given`` when the user gave a number; else ``toy_default``, or for a process-backed
    simulator what this machine runs well, said in one line naming ``flag``."""
    if given is not None:
        return given
    if not is_process_backed([env]):
        return toy_default
    capacity = machine_capacity()
    worlds = capacity.worlds()
    announce(
        f"--env {env}: {purpose} on {worlds} worlds, one process each, to fit this machine "
        f"({describe(capacity)}); {flag} sets another number"
    )
    return worlds
