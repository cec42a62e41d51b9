"""Group a decode graph's static work into segments that can be replayed as CUDA graphs.

A decode step of a long-context model is launch-bound: the model's own layers are a few hundred
small kernels whose Python and launch costs exceed their GPU time many times over. Between two
``ihip`` ops (whose Python keeps per-step state: the cache position, the block selection) the
work has static shapes and addresses, so each such stretch can be captured once and replayed.

Matches   graphs whose attention sites are all rewritten decode calls (one query) on ``device``.
Emits     ``call_module`` nodes ``cuda_graph_segment_N``, each running one maximal stretch of
          capturable nodes (``wrap`` turns the extracted GraphModule into the runner, e.g.
          ``ihip_compile.cuda_graph_segment.GraphedSegment``); outputs of the graph that a
          segment produced are cloned (a replay overwrites the segment's outputs).
Keeps     eager (``eager_reason``): ``ihip`` ops, collectives, nodes touching symbolic sizes
          or values (their result changes every step), in-place or impure nodes, anything not
          on ``device``, nodes without a recorded example value; and small static values made
          from constants alone that only eager nodes read (``_keep_feeders_eager``: the
          ``arange(1)`` that a position adds the cache length to), which in a segment would
          make the eager nodes wait for it and split the static work around them in two.
          Between two impure nodes
          (``ihip`` ops, in-place writes, collectives: nothing moves across them), eager nodes
          move as early as their inputs allow, so that static nodes gather into one segment.
Order     after the attention rewrite and dead-code removal (it only regroups the final graph).
"""

from __future__ import annotations

import heapq
import operator
from collections import Counter
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.fx as fx

from ihip_compile.passes.remove_dead_code import is_removable

SEGMENT_PREFIX = "cuda_graph_segment_"
MIN_SEGMENT_NODES = 4  # fewer static nodes are cheaper to run than to stage and replay
FEEDER_MAX_ELEMENTS = 4096  # index-sized: such a value costs one small launch to run eagerly
FEEDS_EAGER = "small static value read only by eager nodes"


@dataclass
class SegmentPlan:
    """What ``segment_decode_graph`` did, for reports and tests."""

    segments: list[int] = field(default_factory=list)  # static nodes per segment, in order
    eager: Counter = field(default_factory=Counter)  # reason -> nodes kept eager

    def summary(self) -> str:
        reasons = ", ".join(f"{reason} {n}" for reason, n in sorted(self.eager.items()))
        return (f"{len(self.segments)} CUDA-graph segments of {sum(self.segments)} nodes; "
                f"eager: {reasons or 'none'}")


def decode_graph_problem(gm: fx.GraphModule, device_type: str = "cuda") -> str | None:
    """Why ``gm`` is not a decode graph to segment (None: it is one)."""
    sites = [n for n in gm.graph.nodes if is_ihip(n) and "attention" in str(n.target)]
    if not sites:
        return "no rewritten attention call"
    for site in sites:
        q = example_value(site.args[0])
        if not isinstance(q, torch.Tensor) or q.device.type != device_type:
            return f"attention query not a {device_type} tensor"
        if not isinstance(q.shape[-2], int) or q.shape[-2] != 1:
            return "not a decode step (query length is not one)"
    return None


def eager_reason(node: fx.Node, device_type: str = "cuda") -> str | None:
    """Why ``node`` must run eagerly at every step (None: it can be captured)."""
    if node.op not in ("call_function", "call_method"):
        return node.op
    if is_ihip(node):
        return "ihip op"
    if _is_collective(node):
        return "collective"  # each rank's NCCL call stays where tensor parallelism put it
    if not is_removable(node):
        return "in-place or impure"
    inputs = [example_value(a) for a in flat_nodes((node.args, node.kwargs))]
    example = example_value(node)
    tensors = [v for v in inputs if isinstance(v, torch.Tensor)] + _tensors(example)
    if (any(isinstance(v, torch.SymInt) for v in inputs) or _has_symbolic_args(node)
            or any(_symbolic(t) for t in tensors)):
        return "symbolic size"
    if example is None:
        return "no example value"
    if not _tensors(example) or any(t.device.type != device_type for t in tensors):
        return "not a device tensor"
    return None


def segment_decode_graph(gm: fx.GraphModule, device_type: str = "cuda",
                         wrap: Callable[[fx.GraphModule], torch.nn.Module] = lambda m: m,
                         ) -> SegmentPlan:
    """Reorder ``gm`` and fold its static stretches into segment modules (in place)."""
    plan = SegmentPlan()
    reasons = {n: eager_reason(n, device_type) for n in gm.graph.nodes}
    _keep_feeders_eager(gm.graph, reasons)
    order = _schedule(gm.graph, reasons)
    runs, current = [], []
    for node in order:
        if reasons[node] is None:
            current.append(node)
            continue
        runs.append(current)
        current = []
        if node.op in ("call_function", "call_method"):
            plan.eager[reasons[node]] += 1
    runs.append(current)
    _apply_order(gm.graph, order)
    for run in runs:
        if len(run) < MIN_SEGMENT_NODES:
            plan.eager["short stretch"] += len(run)
            continue
        fold_run(gm, run, f"{SEGMENT_PREFIX}{len(plan.segments)}", wrap)
        plan.segments.append(len(run))
    gm.graph.lint()
    gm.recompile()
    return plan


def _keep_feeders_eager(graph: fx.Graph, reasons: dict[fx.Node, str | None]) -> None:
    """Mark ``FEEDS_EAGER`` the small static nodes made from constants alone (a factory such as
    ``arange``, or such a node's views) whose users all end up eager (see the module
    docstring); users are decided before the nodes they read."""
    free: set[fx.Node] = set()
    for node in graph.nodes:
        if (reasons[node] is None and small_value(example_value(node))
                and all(a in free for a in flat_nodes((node.args, node.kwargs)))):
            free.add(node)
    for node in reversed(graph.nodes):
        if node in free and node.users and all(
                reasons[u] is not None and u.op != "output" for u in node.users):
            reasons[node] = FEEDS_EAGER


def small_value(value) -> bool:
    """Whether ``value`` is tensors of ``FEEDER_MAX_ELEMENTS`` elements or fewer in all."""
    tensors = _tensors(value)
    return bool(tensors) and sum(t.numel() for t in tensors) <= FEEDER_MAX_ELEMENTS


def _schedule(graph: fx.Graph, reasons: dict[fx.Node, str | None]) -> list[fx.Node]:
    """A topological order in which no node crosses a barrier (``_is_barrier``: an in-place
    write must stay between the reads before and after it) and, between two barriers, nodes of
    one kind (static or eager) are taken while any is ready, eager first."""
    order: list[fx.Node] = []
    region: list[fx.Node] = []
    for node in graph.nodes:
        if _is_barrier(node, reasons):
            order += _grouped(region, reasons) + [node]
            region = []
        else:
            region.append(node)
    return order + _grouped(region, reasons)


def _is_barrier(node: fx.Node, reasons: dict[fx.Node, str | None]) -> bool:
    return node.op == "output" or reasons[node] in ("in-place or impure", "ihip op", "collective")


def _grouped(region: list[fx.Node], reasons: dict[fx.Node, str | None]) -> list[fx.Node]:
    """``region`` (no barrier inside) in a topological order that switches between eager and
    static nodes only when no node of the current kind is ready."""
    index = {n: i for i, n in enumerate(region)}
    waiting = {n: 0 for n in region}
    users: dict[fx.Node, list[fx.Node]] = {n: [] for n in region}
    for node in region:
        for dep in set(flat_nodes((node.args, node.kwargs))):
            if dep in index:  # inputs from earlier regions are already computed
                waiting[node] += 1
                users[dep].append(node)
    ready: dict[bool, list[int]] = {True: [], False: []}  # keyed by "is eager": node indices
    for node in region:
        if not waiting[node]:
            heapq.heappush(ready[reasons[node] is not None], index[node])
    order, eager_turn = [], True
    while ready[True] or ready[False]:
        if not ready[eager_turn]:
            eager_turn = not eager_turn
        node = region[heapq.heappop(ready[eager_turn])]
        order.append(node)
        for user in users[node]:
            waiting[user] -= 1
            if not waiting[user]:
                heapq.heappush(ready[reasons[user] is not None], index[user])
    return order


def _apply_order(graph: fx.Graph, order: list[fx.Node]) -> None:
    for earlier, later in zip(order, order[1:]):
        earlier.append(later)


def fold_run(gm: fx.GraphModule, run: list[fx.Node], name: str, wrap) -> None:
    """Move ``run`` (contiguous, topologically ordered) into submodule ``name``."""
    members = set(run)
    inputs = []
    for node in run:
        for arg in flat_nodes((node.args, node.kwargs)):
            if arg not in members and arg not in inputs:
                inputs.append(arg)
    outputs = [n for n in run if any(u not in members for u in n.users)]
    sub = fx.Graph()
    env = {arg: sub.placeholder(arg.name) for arg in inputs}
    for node in run:
        env[node] = sub.node_copy(node, env.__getitem__)
    sub.output(tuple(env[n] for n in outputs))
    gm.add_submodule(name, wrap(fx.GraphModule(gm, sub, class_name=name)))
    with gm.graph.inserting_before(run[0]):
        call = gm.graph.call_module(name, tuple(inputs))
    graph_output = next(n for n in gm.graph.nodes if n.op == "output")
    for i, node in enumerate(outputs):
        with gm.graph.inserting_before(run[0]):
            value = gm.graph.call_function(operator.getitem, (call, i))
        value.meta = dict(node.meta)
        if graph_output in node.users:
            # A replay overwrites the segment's outputs: hand the caller its own copy.
            with gm.graph.inserting_before(graph_output):
                kept = gm.graph.call_method("clone", (value,))
            graph_output.replace_input_with(node, kept)
        node.replace_all_uses_with(value)
    for node in reversed(run):
        gm.graph.erase_node(node)


def is_ihip(node: fx.Node) -> bool:
    return node.op == "call_function" and str(node.target).startswith("ihip.")


def _is_collective(node: fx.Node) -> bool:
    target = node.target
    text = f"{getattr(target, '__module__', '') or ''}.{target}"
    return "c10d" in text or "torch.distributed" in text


def example_value(value):
    if isinstance(value, fx.Node):
        return value.meta.get("example_value", value.meta.get("val"))
    return value


def flat_nodes(args) -> list[fx.Node]:
    found: list[fx.Node] = []
    fx.node.map_arg(args, found.append)
    return found


def _has_symbolic_args(node: fx.Node) -> bool:
    plain = []
    fx.node.map_aggregate((node.args, node.kwargs), plain.append)
    return any(isinstance(v, torch.SymInt) for v in plain)


def _tensors(value) -> list[torch.Tensor]:
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    return []


def _symbolic(t: torch.Tensor) -> bool:
    return not all(isinstance(s, int) for s in (*t.shape, *t.stride()))
