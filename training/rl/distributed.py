"""Data-parallel PPO on torch.distributed: the launcher users already have (``torchrun``).

Every process owns its worlds, scenario seeds and sampling noise and collects its own rollout;
the heads start identical (same seed) and stay identical because each minibatch's gradients are
averaged across processes before the optimiser steps. Decisions that end or skip an update
(the approx-KL stop, the NaN guard) are taken on values reduced across processes, so every
process takes the same branch. Only rank 0 writes files.

``torchrun --nproc-per-node N -m training.rl.train_ppo_delta_waypoint ...`` sets ``RANK``,
``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous; gloo serves the CPU, NCCL CUDA.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

# Training scenario seeds of rank r start this far above rank 0's (beyond every run's seed block).
RANK_SEED_STRIDE = 1_000_000_000
CPU = torch.device("cpu")  # gloo's device, and a one-process run's
# How long a finished process leaves the GIL to the backend's threads before the interpreter stops.
_BACKEND_DRAIN_S = 0.2


@dataclass(frozen=True)
class DistContext:
    """This process's place in the job; ``world_size == 1`` makes every method a no-op.

    ``device`` is where the backend reduces: NCCL takes only tensors on this process's GPU, gloo
    only CPU tensors.
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = CPU

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    def _on_backend(self, tensor: torch.Tensor) -> torch.Tensor:
        """A detached copy of ``tensor`` on :attr:`device`, the only place the backend reduces."""
        return tensor.detach().to(self.device, copy=True)

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The mean of ``tensor`` over processes: a new tensor on the input's device, the input unchanged."""
        if not self.enabled:
            return tensor
        reduced = self._on_backend(tensor)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return (reduced / self.world_size).to(tensor.device)

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum ``tensor`` over processes in place."""
        if self.enabled:
            reduced = self._on_backend(tensor)
            dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
            tensor.copy_(reduced)
        return tensor

    def all_agree(self, flag: bool) -> bool:
        """True only when ``flag`` is true on every process."""
        if not self.enabled:
            return flag
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        dist.all_reduce(value, op=dist.ReduceOp.MIN)
        return bool(value.item() > 0.5)

    def average_gradients(self, params: list[torch.nn.Parameter]) -> None:
        """Replace each gradient by its mean over processes (one flat all-reduce).

        A parameter without a gradient keeps none, as in one process: in the critic warm-up the
        actor has none on every process alike, and the optimiser must skip it (a zero gradient
        would still count an Adam step for it and change its later bias correction).
        """
        if not self.enabled:
            return
        with_grad = [p for p in params if p.grad is not None]
        if not with_grad:
            return
        flat = self._on_backend(torch.cat([p.grad.reshape(-1) for p in with_grad]))
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        flat /= self.world_size
        offset = 0
        for p in with_grad:
            grad = p.grad
            p.grad = flat[offset : offset + grad.numel()].view_as(grad).to(grad.device, copy=True)
            offset += grad.numel()

    def parameters_in_sync(self, params: list[torch.nn.Parameter]) -> bool:
        """Whether every process holds the same parameters (a checksum reduced with min and max)."""
        if not self.enabled:
            return True
        checksum = self._on_backend(torch.stack([p.detach().double().sum() for p in params]).sum().reshape(1))
        low, high = checksum.clone(), checksum.clone()
        dist.all_reduce(low, op=dist.ReduceOp.MIN)
        dist.all_reduce(high, op=dist.ReduceOp.MAX)
        return bool((low == high).item())

    def gather(self, obj: object) -> list[object] | None:
        """Every process's ``obj`` on rank 0 (``None`` elsewhere).

        Under NCCL the pickles travel through the current GPU, which :func:`init_distributed` sets.
        """
        if not self.enabled:
            return [obj]
        gathered: list[object] | None = [None] * self.world_size if self.is_main else None
        dist.gather_object(obj, gathered, dst=0)
        return gathered

    def barrier(self) -> None:
        """Wait for every process; under NCCL on this process's GPU, not one guessed from the rank."""
        if self.enabled:
            dist.barrier(device_ids=[self.device.index] if self.device.type == "cuda" else None)


def init_distributed(device: str) -> DistContext:
    """Join the ``torchrun`` job described by the environment, or a one-process context."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistContext()
    rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    if not dist.is_initialized():
        backend = "nccl" if device != "cpu" and torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_rank)  # NCCL, and gather_object's pickles, use the current GPU
        dist.init_process_group(backend=backend)
    collective_device = torch.device("cuda", local_rank) if dist.get_backend() == "nccl" else CPU
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=collective_device)


def shutdown(context: DistContext, *, finished: bool) -> None:
    """Leave the job, so that no backend thread outlives the interpreter with work to finish.

    gloo's worker threads free each collective's work item after the caller has its result; the item
    holds the collective's tensors, and freeing a tensor Python let go of takes the GIL. A process
    that reached interpreter shutdown first aborted (``terminate called without an active
    exception``, SIGABRT, seen in about one two-process CPU run in 20, a core dump showing
    ``AsyncGatherWork`` freed in ``ProcessGroupGloo::runLoop`` during ``Py_FinalizeEx``). So a
    finished run meets the others at a barrier (whose work item holds no tensor), leaves the
    group, and gives the threads a moment with the GIL free. After an error the others may never
    arrive, so the process leaves at once; and if another process fails after this one finished (rank
    0 writing ``final.pt``), the barrier fails too, which is that process's error to report, not this
    one's.
    """
    if context.enabled and dist.is_initialized():
        if finished:
            # gloo raises when a peer left with an error of its own, which that peer reports
            with contextlib.suppress(RuntimeError):
                context.barrier()
        dist.destroy_process_group()
        if finished:
            time.sleep(_BACKEND_DRAIN_S)
