"""A whole decode step over the offloaded cache as one CUDA graph (``passes/fold_decode_step``).

Between refreshes each piece of a decode step already replays a CUDA graph: the model's
segments, and each layer's append and attention. Yet the step stayed bound by the host: per layer
the ops' Python, their checks and bookkeeping, a replay and copies per piece, about 0.2 ms per
layer on an H200's host against ~0.3 ms of GPU work per layer at Llama-3.1-8B's shape (the 4-layer
figures are in ``reports/bench/whole_step_graph/``). This module runs the folded stretch so:
    observed step   the stretch runs as before; each offloaded op reports its hook
                    (``kernels/step_capture.py``), None when the next step cannot take its
                    steady path (a refresh that sets that path up reports its hook too)
    next step       if every hook says the step would repeat its steady path, the stretch is
                    captured once (the ops launch their work on their graphs' buffers and
                    change no host state), then the graph replays and the hooks record the
                    step's bookkeeping while it runs; later such steps only replay and record
    any other step  (a refresh, a window entering a new block, a new prompt) runs as
                    observed; the step after it replays when it repeats it
Inputs: weights, the outputs of the segments that run before the stretch (their graphs write
them in the same memory at every step; ``in_place``) and other tensors at the same address in
consecutive steps are read in place and checked at every replay; other tensors are copied into
buffers (the step's token); the step's integers that its positions are made of are filled into
their ``StepInt`` modules (``ihip_compile/step_int.py``); a padding mask that only tells the attention there
is no padding is checked at every step as the op checks it (a row with padding runs the observed
path, which takes the dense path), and is otherwise not read. The hooks' checks make a replay exactly the step the
observed path would run (tests/e2e/test_decode_cuda_graphs.py compares the two on a GPU).

A capture that fails leaves the stretch on the observed path, with a warning that says why.
"""

from __future__ import annotations

import logging
import weakref
from typing import Callable

import torch
import torch.fx as fx

from ihip_compile.kernels import step_capture
from ihip_compile.kernels.cuda_graph import stream_capturing
from ihip_compile.kernels.padding_check import hides_nothing
from ihip_compile.step_int import StepInt

log = logging.getLogger(__name__)


def capture_whole_step(run: Callable[[], tuple]) -> tuple[Callable[[], None], tuple]:
    """Capture ``run`` as a CUDA graph with no warm-up run (the observed steps ran this very
    work, and a run here would record a step's bookkeeping twice); returns (replay, outputs)."""
    graph = torch.cuda.CUDAGraph()
    with torch.inference_mode(False), torch.no_grad(), torch.cuda.graph(graph):
        outputs = run()
    return graph.replay, outputs


class StepReplay(torch.nn.Module):
    """Runs the folded stretch; see the module docstring. ``capture`` makes the graph
    (``capture_whole_step``; tests pass a stand-in); ``in_place``: the addresses of the outputs
    of the graph's segments (``cuda_graph_segment``, which adds to it as they are captured)."""

    def __init__(self, stretch: fx.GraphModule, capture=capture_whole_step,
                 in_place: set[int] | None = None):
        super().__init__()
        self.stretch = stretch
        self.capture = capture
        self.in_place = in_place if in_place is not None else set()
        self.mask_inputs = _mask_inputs(stretch)
        self.step_ints = _step_ints(stretch)
        self.hooks: list | None = None  # of the last observed step, if it was steady
        self.last_addresses: dict[int, int] = {}
        self.replay: Callable[[], None] | None = None  # the captured step
        self.captured_with: list = []  # (weak graph, captures) of each hook at the capture
        self.buffers: dict[int, torch.Tensor] = {}
        self.addresses: dict[int, int] = {}
        self.outputs: tuple = ()
        self.failure: str | None = None
        self.stats = {"captures": 0, "replays": 0, "observed": 0}

    def forward(self, *args):
        if self.hooks is not None and self._may_replay():
            lengths = self._steady_lengths(args)
            if lengths is not None:
                if not self._captured_for(args):
                    self._capture(args)
                if self.replay is not None:
                    return self._replay(args, lengths)
        return self._observe(args)

    def _may_replay(self) -> bool:
        return (self.failure is None and not torch.is_grad_enabled()
                and not stream_capturing())

    def _observe(self, args) -> tuple:
        with step_capture.observing() as hooks:
            outputs = self.stretch(*args)
        self.stats["observed"] += 1
        self.hooks = hooks if hooks and all(h is not None for h in hooks) else None
        self.last_addresses = {i: a.data_ptr() for i, a in enumerate(args)
                               if isinstance(a, torch.Tensor)}
        return outputs

    def _steady_lengths(self, args) -> list[int] | None:
        for i in self.mask_inputs:
            if args[i] is not None and not hides_nothing(args[i]):
                return None
        return step_capture.step_lengths(self.hooks)

    def _captured_for(self, args) -> bool:
        if self.replay is None or len(self.hooks) != len(self.captured_with):
            return False
        if any(h.graph is not g() or h.captures != c
               for h, (g, c) in zip(self.hooks, self.captured_with)):
            return False  # some layer's graph was captured again: other buffers
        if any(args[i].data_ptr() != a for i, a in self.addresses.items()):
            return False
        return all(args[i].shape == b.shape and args[i].dtype == b.dtype
                   for i, b in self.buffers.items())

    def _capture(self, args) -> None:
        # A segment captured in the observed step itself wrote its outputs elsewhere then, yet
        # writes them here from now on: read in place too.
        staged = {i for i, a in enumerate(args) if isinstance(a, torch.Tensor)
                  and i not in self.mask_inputs and a.data_ptr() not in self.in_place
                  and a.data_ptr() != self.last_addresses.get(i)}
        with torch.inference_mode(False):  # buffers reused across calls, in and out of it
            buffers = {i: args[i].clone() for i in sorted(staged)}
        inputs = [buffers.get(i, a) for i, a in enumerate(args)]
        hooks = self.hooks
        self.replay = None

        def run() -> tuple:
            with step_capture.capturing(hooks):
                return tuple(self.stretch(*inputs))

        try:
            replay, outputs = self.capture(run)
        except Exception as error:  # the stretch keeps running as observed; never silently
            self.failure = f"{type(error).__name__}: {error}"
            log.warning("infinitehip: decode steps keep one graph per piece, capturing the "
                        "whole step failed: %s", self.failure)
            return
        self.replay, self.buffers, self.outputs = replay, buffers, outputs
        self.addresses = {i: a.data_ptr() for i, a in enumerate(args)
                          if isinstance(a, torch.Tensor) and i not in staged
                          and i not in self.mask_inputs}
        self.captured_with = [(weakref.ref(h.graph), h.captures) for h in self.hooks]
        self.stats["captures"] += 1

    def _replay(self, args, lengths: list[int]) -> tuple:
        for i, buffer in self.buffers.items():
            buffer.copy_(args[i])
        for module, i in self.step_ints:
            module.set(args[i])
        for hook, s_k in zip(self.hooks, lengths):
            hook.prepare(s_k)
        self.replay()
        for hook, s_k in zip(self.hooks, lengths):  # host bookkeeping while the GPU runs
            hook.account(s_k)
        self.stats["replays"] += 1
        for t in self.outputs:
            torch.autograd.graph.increment_version(t)
        return self.outputs


def _step_ints(stretch: fx.GraphModule) -> list[tuple[StepInt, int]]:
    """The stretch's ``StepInt`` modules, each with the index of the input it reads."""
    placeholders = {p: i for i, p in enumerate(n for n in stretch.graph.nodes
                                               if n.op == "placeholder")}
    found = []
    for node in stretch.graph.nodes:
        if node.op == "call_module":
            module = stretch.get_submodule(node.target)
            if isinstance(module, StepInt):
                found.append((module, placeholders[node.args[0]]))
    return found


def _mask_inputs(stretch: fx.GraphModule) -> set[int]:
    """Indices of the stretch's inputs used only as an attention's padding mask (``kv_valid``,
    its fifth argument), which a captured step does not read."""
    placeholders = [n for n in stretch.graph.nodes if n.op == "placeholder"]
    return {i for i, p in enumerate(placeholders)
            if p.users and all(str(u.target).startswith("ihip.attention") and len(u.args) > 4
                               and u.args[4] is p and p not in u.args[:4]
                               for u in p.users)}
