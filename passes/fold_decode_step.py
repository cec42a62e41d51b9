"""Fold a segmented decode graph's layers, from the first segment on, into one module.

Between refreshes a decode step over the offloaded cache repeats its device work exactly: the
segments replay their graphs and each layer's append and attention replay theirs
(``kernels/step_capture.py``). Folding that stretch into one module lets it run as one CUDA graph
(``ihip_compile.decode_step_replay``) instead of a replay, copies and Python per piece.

Matches   a decode graph already cut into segments (``segment_decode_graph``) whose attention
          reads an offloaded cache (``ihip.kv_store_append`` feeds it).
Emits     one ``call_module`` node ``decode_step_replay`` that runs every node from the first
          segment to the graph's output (``wrap`` turns the extracted GraphModule into the
          runner); from the first ``ihip`` op when eager work between the segments before it
          reads what they compute (those segments keep their own graphs). The positions made
          from constants and the step's integers (``arange(1) + s``, eager before the first
          segment) join the stretch, each integer read as a ``StepInt`` module
          (``ihip_compile/step_int.py``): one fill per step instead of two launches and a copy
          per position. Around it:
            - pure eager nodes that read nothing inside the stretch (a padding mask's gather,
              a position's arithmetic) move before it: they run at every step as before;
            - the views of an op's marker that the graph returns (the cache's zero-stride
              proxies, whose length grows every step) are made again after it, from its output,
              so that they have this step's shape;
            - the copies of its outputs that the graph returns stay after it.
Refuses   (says why, the graph keeps its segments) anything else in the stretch: device work
          outside a segment that reads the stretch's own values, an impure node, another op.
Order     after ``segment_decode_graph``.
"""

from __future__ import annotations

import operator
from typing import Callable

import torch
import torch.fx as fx

from ihip_compile.passes.remove_dead_code import is_removable
from ihip_compile.passes.segment_decode_graph import (
    SEGMENT_PREFIX, example_value, flat_nodes, fold_run, is_ihip, small_value,
)
from ihip_compile.step_int import StepInt

STEP_MODULE = "decode_step_replay"
_OFFLOADED_OPS = ("ihip.kv_store_append", "ihip.attention")
_MARKER_VIEWS = ("view", "expand")
STEP_INT_PREFIX = "step_int_"
_INT_ELEMENTWISE = (operator.add, operator.sub, operator.mul)


def fold_decode_step(gm: fx.GraphModule, wrap: Callable[[fx.GraphModule], object]) -> str:
    """Fold the stretch in place; returns "on: ..." or why it was not folded."""
    nodes = list(gm.graph.nodes)
    first_op = next((i for i, n in enumerate(nodes) if is_ihip(n)), None)
    if first_op is None:
        return "not used: no offloaded op"
    first_segment = next(i for i, n in enumerate(nodes) if i == first_op or _is_segment(n))
    pulled = _step_int_work(nodes[:first_segment])
    plan = _plan(nodes[first_segment:], pulled)
    if isinstance(plan, str) and first_segment < first_op:
        pulled = []  # the segments before the first op keep their graphs
        plan = _plan(nodes[first_op:], pulled)
    if isinstance(plan, str):
        return plan
    stretch, before, after, markers = plan
    anchor = stretch[0]
    _move_before(before, anchor)
    stretch = _pull_step_int_work(gm, pulled, anchor) + stretch
    _move_after(after, stretch[-1])
    _remake_returned_markers(gm, markers, set(stretch))
    fold_run(gm, stretch, STEP_MODULE, wrap)
    gm.graph.lint()
    gm.recompile()
    layers = sum(1 for n in stretch if str(n.target).startswith("ihip.attention"))
    start = "the first segment" if _is_segment(anchor) else "the first offloaded op"
    ints = sum(1 for n in stretch if str(n.target).startswith(STEP_INT_PREFIX))
    return (f"on: one graph for {layers} attention layers and {len(stretch)} nodes, from "
            f"{start}; step integers read on the device: {ints}")


def _plan(region: list[fx.Node], pulled: list[fx.Node]):
    """(stretch, before, after, markers) of a fold of ``region`` (from its first node to the
    graph's output) with ``pulled`` in the stretch too, or why not."""
    stretch, before, after, markers = [], [], [], {}
    inside: set[fx.Node] = set(pulled)
    for node in region:
        if node.op == "output":
            continue
        if any(a in after for a in flat_nodes((node.args, node.kwargs))):
            return f"not used: a node reads a copy of the step's output ({node.name})"
        kind = _kind(node, inside, markers)
        if kind.startswith("refuse"):
            return f"not used: {kind[len('refuse: '):]} ({node.name})"
        {"stretch": stretch, "before": before, "after": after}[kind].append(node)
        if kind == "stretch":
            inside.add(node)
    targets = {str(n.target).rsplit(".", 1)[0] if str(n.target).endswith(".default")
               else str(n.target) for n in stretch if is_ihip(n)}
    if not set(_OFFLOADED_OPS) <= targets:
        return "not used: the attention does not read an offloaded cache"
    return stretch, before, after, markers


def _step_int_work(nodes: list[fx.Node]) -> list[fx.Node]:
    """The eager nodes among ``nodes`` (before the stretch) that make a step's positions from
    constants and the step's integers: small factories (``arange(1)``) and elementwise ops of
    such a value with an integer, each read only by such nodes, segments and ``ihip`` ops. In
    the stretch they run in its graph, the integer read through ``StepInt``."""
    found: list[fx.Node] = []
    for node in nodes:
        if _is_small_factory(node) or _int_elementwise(node, set(found)):
            found.append(node)
    kept = set(found)
    for node in reversed(found):
        if not all(u in kept or _is_segment(u) or is_ihip(u) for u in node.users):
            kept.discard(node)
    return [n for n in found if n in kept]


def _is_small_factory(node: fx.Node) -> bool:
    value = example_value(node)
    return (node.op == "call_function" and is_removable(node)
            and not flat_nodes((node.args, node.kwargs))
            and isinstance(value, torch.Tensor) and small_value(value))


def _int_elementwise(node: fx.Node, tensors: set[fx.Node]) -> bool:
    """``t op s``/``s op t`` with ``t`` in ``tensors`` (with dimensions) and ``s`` an integer
    node, giving a tensor with dimensions."""
    if (node.op != "call_function" or node.target not in _INT_ELEMENTWISE or node.kwargs
            or len(node.args) != 2):
        return False
    a, b = node.args
    t, s = (a, b) if a in tensors else (b, a)
    value = example_value(node)
    return (t in tensors and isinstance(s, fx.Node)
            and isinstance(example_value(s), (int, torch.SymInt))
            and isinstance(value, torch.Tensor) and value.dim() > 0
            and example_value(t).dim() > 0)


def _pull_step_int_work(gm: fx.GraphModule, pulled: list[fx.Node], anchor: fx.Node
                        ) -> list[fx.Node]:
    """Move ``pulled`` just before ``anchor``, each integer they read replaced by a
    ``StepInt`` module of it (one per integer); returns the nodes now before ``anchor``."""
    made: dict[fx.Node, fx.Node] = {}
    moved = []
    for node in pulled:
        for i, arg in enumerate(node.args):
            if isinstance(arg, fx.Node) and arg not in pulled:
                if arg not in made:
                    name = f"{STEP_INT_PREFIX}{len(made)}"
                    gm.add_submodule(name, StepInt(example_value(node).device))
                    with gm.graph.inserting_before(anchor):
                        made[arg] = gm.graph.call_module(name, (arg,))
                    moved.append(made[arg])
                node.update_arg(i, made[arg])
        anchor.prepend(node)
        moved.append(node)
    return moved


def _is_segment(node: fx.Node) -> bool:
    return node.op == "call_module" and str(node.target).startswith(SEGMENT_PREFIX)


def _kind(node: fx.Node, inside: set[fx.Node], markers: dict) -> str:
    """Where ``node`` (after the first offloaded op) goes: "stretch", "before" (moves before
    it), "after", or "refuse: why"."""
    reads_inside = any(a in inside for a in flat_nodes((node.args, node.kwargs)))
    if _is_segment(node):
        return "stretch"
    if is_ihip(node):
        if not str(node.target).startswith(_OFFLOADED_OPS):
            return f"refuse: another op, {node.target}"
        return "stretch"
    if node.op == "call_function" and node.target is operator.getitem and reads_inside:
        return "stretch"
    if (node.op == "call_method" and node.target in _MARKER_VIEWS
            and (is_ihip(node.args[0]) or node.args[0] in markers)):
        markers[node] = True
        return "stretch"
    if not reads_inside:
        if not is_removable(node):
            return "refuse: an impure node among the offloaded ops"
        return "before"
    if (node.op == "call_method" and node.target == "clone"
            and all(u.op == "output" for u in node.users)):
        return "after"
    return "refuse: device work outside a segment reads the step's own values"


def _move_before(moved: list[fx.Node], anchor: fx.Node) -> None:
    for node in moved:
        anchor.prepend(node)


def _move_after(moved: list[fx.Node], anchor: fx.Node) -> None:
    for node in reversed(moved):
        anchor.append(node)


def _remake_returned_markers(gm: fx.GraphModule, markers: dict, inside: set[fx.Node]) -> None:
    """Users outside the stretch of a marker view get a copy made after it (see the module
    docstring): the copy reads the op's output, which the stretch returns."""
    copies: dict[fx.Node, fx.Node] = {}
    graph_output = next(n for n in gm.graph.nodes if n.op == "output")

    def copy_of(node: fx.Node) -> fx.Node:
        if node not in markers:
            return node  # the op itself: the stretch returns it
        if node not in copies:
            args = fx.node.map_arg(node.args, copy_of)
            with gm.graph.inserting_before(graph_output):
                copies[node] = gm.graph.call_method(node.target, args, dict(node.kwargs))
            copies[node].meta = dict(node.meta)
        return copies[node]

    for node in list(markers):
        outside = [u for u in node.users if u not in inside]
        if outside:
            copy = copy_of(node)
            for user in outside:
                user.replace_input_with(node, copy)
