"""The ordered graph passes of the backend and the loop that runs them.

``run_passes(gm, config)`` runs the passes named in ``config.passes`` in the order of ``PASSES``
on the torch-level Dynamo graph, checks the graph after each one, and returns the rewritten graph
with a record of what each pass did (for reports and tests).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import torch.fx as fx

from ihip_compile.config import ALL_PASSES, IHipConfig
from ihip_compile.passes.match_attention import match_attention
from ihip_compile.passes.match_rope import match_rope
from ihip_compile.passes.remove_dead_code import remove_dead_code
from ihip_compile.passes.rewrite_attention import rewrite_attention
from ihip_compile.passes.sites import PassContext

PASSES = (
    # finds SDPA / eager attention sites and reads their masks; everything else depends on it
    ("match_attention", match_attention),
    # describes the RoPE of each site's query (needs the sites, must see q before rewriting)
    ("match_rope", match_rope),
    # emits torch.ops.ihip.attention per site; leaves the old mask and repeat_kv without users
    ("rewrite_attention", rewrite_attention),
    # removes what the rewrite left unused, keeping in-place cache writes
    ("remove_dead_code", remove_dead_code),
)
assert sorted(name for name, _ in PASSES) == sorted(ALL_PASSES), "PASSES and ALL_PASSES differ"


@dataclass
class PassRecord:
    name: str
    modified: bool
    nodes_before: int
    nodes_after: int
    op_delta: dict[str, int]  # op name -> change in count (only non-zero)


@dataclass
class PipelineResult:
    gm: fx.GraphModule
    context: PassContext
    records: list[PassRecord]
    graph_before: str
    graph_after: str
    ops_before: Counter
    ops_after: Counter
    # How a decode step's static work runs: CUDA-graph segments, or why not (the backend sets it)
    cuda_graphs: str = "not considered"
    # The model's trained context length and where it came from (the backend sets it)
    trained_context: str = "not looked up"


def op_name(node: fx.Node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    target = node.target
    module = getattr(target, "__module__", None) or ""
    name = getattr(target, "__name__", None) or str(target)
    if str(target).startswith("ihip.") or module.startswith("torch._ops"):
        return f"torch.ops.{target}"
    return f"{module}.{name}" if module else name


def count_ops(gm: fx.GraphModule) -> Counter:
    return Counter(op_name(n) for n in gm.graph.nodes if n.op in ("call_function", "call_method"))


def run_passes(gm: fx.GraphModule, config: IHipConfig) -> PipelineResult:
    context = PassContext(config=config)
    graph_before, ops_before = str(gm.graph), count_ops(gm)
    records, done = [], []
    for name, run in PASSES:
        if name not in config.passes:
            continue
        before_ops, before_nodes = count_ops(gm), len(gm.graph.nodes)
        try:
            result = run(gm, context)
            gm = result.graph_module
            gm.graph.lint()
        except Exception as error:
            raise RuntimeError(
                f"infinitehip pass {name!r} failed (after passes {done}): {error}"
            ) from error
        done.append(name)
        after_ops = count_ops(gm)
        delta = {k: after_ops[k] - before_ops[k] for k in sorted(set(after_ops) | set(before_ops))
                 if after_ops[k] != before_ops[k]}
        records.append(PassRecord(name, result.modified, before_nodes, len(gm.graph.nodes), delta))
    return PipelineResult(gm, context, records, graph_before, str(gm.graph), ops_before,
                          count_ops(gm))
