"""Replaying the rollout step as a CUDA graph (``--cuda-graph``).

An eager rollout step launches thousands of small kernels (the toy world alone 1,000-1,450, see
``docs/benchmarks.md``), each paying the launch cost whatever the number of worlds. A CUDA graph
records the step's kernels once and replays them with one launch. :class:`StepGraph` runs a step
function eagerly for the first ``WARMUP_STEPS`` calls (on a side stream, as ``torch.cuda.graph``
asks), captures the next call and replays it for the rest of the rollout.

What a step must do to be captured (``trainer.collect_rollout``'s step does): read and write the
same tensors at every step (in-place writes into the buffer and into its own features, the step
counted on the device), read nothing back to the host, branch on no tensor value, and draw its noise
from the default generator or one registered with the graph (done here).

What the world does: a batched world rebinds its state at every step (``state.speed = new_speed``).
A replay reads the tensors the capture read and writes the tensors the capture allocated, so the new
state must be copied to where the next replay reads it. The capture therefore ends with a copy of
every world tensor the step rebound into the tensor it replaced (found by walking the world object's
attributes before and after the captured step: :func:`world_tensors`, :func:`state_feedback`).

A graph is captured for one rollout and dropped after it: what the step reads as Python numbers (the
exploration scale, the world's difficulty) is frozen into the graph and may change between
iterations, and a world reset or restored between rollouts holds new tensors.

The capture, the replay and the state copies run only on a GPU: the CUDA test in
``tests/rl/test_rollout_device_path.py`` compares replayed rollouts with eager ones (it passed on an
H200, docs/benchmarks.md, which also gives the speed-up: 1.84x at 1,024 worlds, none from 4,096 on).
"""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Iterator
from typing import Any, Generic, TypeVar

import torch
from torch import Tensor

from training.envs.protocol import BatchedWaypointEnv

WARMUP_STEPS = 2  # eager steps of each rollout before the capture (lazy initialisation, cuDNN/cuBLAS handles)

Result = TypeVar("Result")


class GraphCaptureError(RuntimeError):
    """The world's step cannot be replayed from a graph (its state changes shape or shares memory)."""


def world_tensors(world: BatchedWaypointEnv) -> dict[str, Tensor]:
    """Every tensor the world object holds, by attribute path (``world.state.vehicle.speed``).

    Walks attributes of objects (the world, its state, the worlds a mix holds), dataclasses,
    tuples, lists and dicts, each object once; modules, classes and functions are not entered.
    """
    return dict(_walk(world, "world", set()))


def _walk(value: Any, path: str, seen: set[int]) -> Iterator[tuple[str, Tensor]]:
    if isinstance(value, Tensor):
        yield path, value
        return
    if id(value) in seen or isinstance(value, type | types.ModuleType | types.FunctionType):
        return
    seen.add(id(value))
    if isinstance(value, dict):
        items: Any = value.items()
    elif isinstance(value, list | tuple):
        items = enumerate(value)
    elif dataclasses.is_dataclass(value):
        items = ((field.name, getattr(value, field.name)) for field in dataclasses.fields(value))
    elif isinstance(getattr(value, "__dict__", None), dict):
        items = vars(value).items()
    else:
        return
    for key, item in items:
        yield from _walk(item, f"{path}.{key}", seen)


def state_feedback(before: dict[str, Tensor], after: dict[str, Tensor]) -> list[tuple[Tensor, Tensor]]:
    """``(old, new)`` for every world tensor a step rebound: copying ``new`` into ``old`` after a
    replay puts the new state where the next replay reads it.

    Raises:
        GraphCaptureError: the step added or removed a tensor, changed one's shape or dtype, or the
            copies would overwrite a tensor that the new state still uses (two paths to one tensor).
    """
    if before.keys() != after.keys():
        changed = sorted(before.keys() ^ after.keys())
        raise GraphCaptureError(f"a world step adds or removes tensors ({', '.join(changed[:3])})")
    pairs = []
    for path, old in before.items():
        new = after[path]
        if new is old:  # unchanged or updated in place: a replay updates it in place too
            continue
        if new.shape != old.shape or new.dtype != old.dtype:
            raise GraphCaptureError(
                f"a world step changes {path} from {old.dtype} {list(old.shape)} "
                f"to {new.dtype} {list(new.shape)}"
            )
        if old.numel():  # an empty tensor has nothing to copy (and no address of its own)
            pairs.append((old, new))
    targets = [old.data_ptr() for old, _ in pairs]
    still_used = {tensor.data_ptr() for tensor in after.values() if tensor.numel()}
    if len(set(targets)) < len(targets) or still_used.intersection(targets):
        raise GraphCaptureError("world tensors share memory across a step (one tensor under two names)")
    return pairs


class StepGraph(Generic[Result]):
    """Calls ``step`` once per rollout step: eagerly at first, then as replays of a CUDA graph.

    ``step`` takes no arguments and returns what the rollout reads after the step (the replayed
    graph returns the captured call's result, whose tensors every replay overwrites). ``generator``:
    the non-default CUDA generator ``step`` samples from, registered with the graph so that each
    replay draws new numbers.
    """

    def __init__(
        self, step: Callable[[], Result], world: BatchedWaypointEnv, generator: torch.Generator | None
    ) -> None:
        if world.device.type != "cuda":
            raise ValueError(f"a CUDA graph needs worlds on a CUDA device, these are on {world.device}")
        self._step = step
        self._world = world
        self._generator = generator
        self._calls = 0
        self._graph: torch.cuda.CUDAGraph | None = None
        self._result: Result | None = None

    def __call__(self) -> Result:
        self._calls += 1
        if self._calls <= WARMUP_STEPS:
            return self._warm_up()
        if self._graph is None:
            self._capture()
        assert self._graph is not None and self._result is not None
        self._graph.replay()
        return self._result

    def _warm_up(self) -> Result:
        main = torch.cuda.current_stream(self._world.device)
        side = torch.cuda.Stream(self._world.device)
        side.wait_stream(main)
        with torch.cuda.stream(side):
            result = self._step()
        main.wait_stream(side)
        return result

    def _capture(self) -> None:
        graph = torch.cuda.CUDAGraph()
        if self._generator is not None and self._generator.device.type == "cuda":
            graph.register_generator_state(self._generator)
        before = world_tensors(self._world)
        failure: GraphCaptureError | None = None
        with torch.cuda.device(self._world.device), torch.cuda.graph(graph):
            result = self._step()
            try:
                feedback = state_feedback(before, world_tensors(self._world))
            except GraphCaptureError as error:  # raised once the capture has ended cleanly
                failure, feedback = error, []
            for old, new in feedback:
                old.copy_(new)
        if failure is not None:
            raise failure
        self._graph, self._result = graph, result
