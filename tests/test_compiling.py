"""What the compile flags share: the graph limit per process."""

from __future__ import annotations

import torch
from torch._dynamo.utils import counters

from training.common.compiling import with_graph_limit


def _add(x: torch.Tensor, n: int) -> torch.Tensor:
    return x + n


def test_a_compiled_function_may_build_more_graphs_than_dynamos_default() -> None:
    """Each new ``n`` is a new graph (static shapes and values); dynamo's default limit is 8, after
    which the function would quietly run eagerly and build no more."""
    torch._dynamo.reset()
    counters.clear()
    limited = with_graph_limit(torch.compile(_add, backend="eager", dynamic=False), 12)
    for n in range(11):
        assert limited(torch.zeros(2), n).tolist() == [n, n]
    assert counters["stats"]["unique_graphs"] == 11

    torch._dynamo.reset()
    counters.clear()
    default = torch.compile(_add, backend="eager", dynamic=False)
    for n in range(11):
        default(torch.zeros(2), n)
    assert counters["stats"]["unique_graphs"] < 11  # the limit this helper lifts
