"""Device selection shared by every command."""

from __future__ import annotations

import torch

from training.common.errors import UserError


def resolve_device(name: str) -> torch.device:
    """``auto`` -> cuda when available, else cpu; otherwise the named device, checked."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a torch device (auto, cpu, cuda, cuda:N)") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError(f"--device {name}: CUDA is not available on this machine")
    if device.type not in ("cpu", "cuda"):
        raise UserError(f"--device {name}: only cpu and cuda are supported")
    return device


def set_cpu_threads(num_threads: int) -> None:
    """Use ``num_threads`` torch CPU threads (0 keeps torch's default).

    The default everywhere is 1: the worlds and heads run many small tensor ops, where extra
    intra-op threads only add synchronisation, and on a shared 2-core machine a second process
    makes multi-threaded torch up to 10x slower (measured: a 1,024-step rollout took 2.4 s on
    one thread and 34 s on two while one other process ran).
    """
    if num_threads:
        torch.set_num_threads(num_threads)
