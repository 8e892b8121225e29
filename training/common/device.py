"""Device selection shared by every command."""

from __future__ import annotations

import shutil

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


def check_cpu_compiler(flag: str) -> None:
    """``torch.compile`` on the CPU builds C++ kernels: without a compiler, say so in one line now
    rather than fail in a traceback at the first compiled call (``flag`` names what asked for it).

    Looks where torch's inductor looks (``torch._inductor.config.cpp.cxx``: ``$CXX`` or ``g++``);
    where that setting is missing (another torch version) it leaves the check to torch.
    """
    try:
        from torch._inductor import config as inductor_config

        candidates = [name for name in inductor_config.cpp.cxx if name]
    except (ImportError, AttributeError, TypeError):
        return
    if candidates and not any(shutil.which(name) for name in candidates):
        raise UserError(
            f"{flag}: torch.compile needs a C++ compiler on the CPU and found none "
            f"({' or '.join(candidates)}; set CXX or install g++)"
        )
