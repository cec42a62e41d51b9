"""The one home of private torch._dynamo / torch._inductor imports.

A torch upgrade that moves these names touches this file only. Everything here is imported
lazily so that ``import ihip_compile`` stays light.
"""

from __future__ import annotations

from typing import Any, Callable


def compile_with_inductor(gm, example_inputs: list) -> Callable:
    """Hand a (rewritten) torch-level Dynamo graph to Inductor, as backend="inductor" does."""
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs)


def compile_segment(segment, example_inputs: list) -> Callable:
    """Inductor for one extracted piece of a rewritten graph (``cuda_graph_segment``), on a copy
    of its graph: the piece keeps its own for the runs that must not use the compiled code."""
    import torch.fx as fx

    graph = fx.Graph()
    graph.output(graph.graph_copy(segment.graph, {}))
    return compile_with_inductor(fx.GraphModule(segment, graph), example_inputs)


def dynamo_counters() -> Any:
    """Dynamo's global counters (``["stats"]["unique_graphs"]``, ``["recompiles"]``, ...)."""
    from torch._dynamo.utils import counters

    return counters


def unique_graph_count() -> int:
    return int(dynamo_counters()["stats"]["unique_graphs"])


def reset_dynamo() -> None:
    """Forget compiled code and counters (tests: each model starts from a clean state)."""
    import torch._dynamo

    torch._dynamo.reset()
    dynamo_counters().clear()


def list_backends() -> list[str]:
    import torch._dynamo

    return list(torch._dynamo.list_backends(exclude_tags=()))
