"""What the ``torch.compile`` flags (``--compile-world``, ``--compile-update``) share."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from typing import Any

import torch

from training.common.errors import UserError


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


def check_compiled_on_cpu(flag: str, cpu_only: str, device: torch.device, device_flag: str) -> None:
    """``flag`` compiles on the CPU only (``cpu_only`` says what and why; ``device_flag``: the
    ``--device`` that ``device`` was resolved from), with a C++ compiler at hand."""
    if device.type != "cpu":
        raise UserError(f"{flag}: {cpu_only} (--device {device_flag})")
    check_cpu_compiler(flag)


def check_compile_update(device: torch.device, device_flag: str) -> None:
    """``--compile-update`` compiles the PPO update's steps: :func:`check_compiled_on_cpu`."""
    cpu_only = "the compiled update runs on the CPU only: it has not yet been run on a GPU"
    check_compiled_on_cpu("--compile-update", cpu_only, device, device_flag)


def with_graph_limit(compiled: Callable[..., Any], graphs: int) -> Callable[..., Any]:
    """``compiled`` allowed ``graphs`` graphs per process instead of dynamo's default 8, past which
    it would run eagerly (or raise, with ``fullgraph``). The setting was ``cache_size_limit`` before
    torch named it ``recompile_limit``."""
    config = torch._dynamo.config
    key = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"
    return config.patch(**{key: graphs})(compiled)
