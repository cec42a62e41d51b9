"""remove_dead_code keeps in-place writes (a static cache's index_copy_) and drops dead values."""

from __future__ import annotations

import torch
import torch.fx as fx

from ihip_compile.config import IHipConfig
from ihip_compile.passes.remove_dead_code import remove_dead_code
from ihip_compile.passes.sites import PassContext


def _graph_with_cache_write() -> fx.GraphModule:
    graph = fx.Graph()
    cache, new, positions = (graph.placeholder(n) for n in ("cache", "new", "positions"))
    graph.call_method("index_copy_", (cache, 2, positions, new))  # result unused, effect needed
    dead = graph.call_function(torch.arange, (4,))
    graph.call_function(torch.mul, (dead, 2))  # a dead chain
    graph.output(graph.call_method("sum", (cache,)))
    return fx.GraphModule(torch.nn.Module(), graph)


def test_keeps_in_place_cache_write_and_removes_dead_chain():
    gm = _graph_with_cache_write()
    context = PassContext(config=IHipConfig())
    remove_dead_code(gm, context)
    targets = [n.target for n in gm.graph.nodes]
    assert "index_copy_" in targets
    assert torch.arange not in targets and torch.mul not in targets
    assert context.removed_nodes == ["arange", "mul"]
    cache = torch.zeros(1, 1, 3, 2)
    gm(cache, torch.ones(1, 1, 1, 2), torch.tensor([1]))
    assert cache[0, 0, 1].tolist() == [1.0, 1.0]

