"""Run one static segment of a decode graph as a CUDA graph (``passes/segment_decode_graph``).

Call 1 compiles the segment when a compiler is given (Inductor for the ``infinitehip`` backend:
a layer's norms, rotations and activations become a few fused kernels instead of ~50 ATen ones,
and a replayed graph pays GPU time for every kernel), runs it and notes where its inputs live.
A compiler that fails leaves the segment's ATen ops, with a warning that says why. Call 2
captures it: inputs that keep their memory from call to call (parameters, buffers, the outputs
of other segments) are read in place; the others are copied at each call into buffers the graph
owns. Later calls copy those inputs and replay. An input read in place that has moved since the
capture is staged from then on (one more capture); a capture that fails leaves the segment
eager, with a warning that says why.

With gradients enabled (training, or a forward outside ``torch.no_grad``) segments run eagerly:
a replay records no autograd history. A replay writes the segment's outputs into the same
tensors every time: each is bumped in version (caches keyed on a tensor's version see new
contents), and the segmenting pass hands the graph's caller clones, never these tensors.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch
import torch.fx as fx

from ihip_compile.decode_step_replay import StepReplay
from ihip_compile.kernels.cuda_graph import capture_cuda_graph, stream_capturing
from ihip_compile.passes.fold_decode_step import fold_decode_step
from ihip_compile.passes.segment_decode_graph import decode_graph_problem, segment_decode_graph

log = logging.getLogger(__name__)


# compiler(segment, example_args) -> a callable with the segment's signature and results
SegmentCompiler = Callable[[torch.nn.Module, list], Callable]


def segment_for_cuda_graphs(gm: fx.GraphModule, whole_step: bool = True,
                            compiler: SegmentCompiler | None = None) -> str:
    """Segment ``gm`` in place when it is a CUDA decode graph, each segment compiled by
    ``compiler`` (None: its ATen ops as traced), and with ``whole_step`` fold its offloaded
    layers for one graph per step (``passes/fold_decode_step``); returns what was done,
    starting with "on" when segments were made, or why not."""
    problem = decode_graph_problem(gm, "cuda")
    if problem is not None:
        return f"not used: {problem}"
    capturer, in_place = CudaGraphCapture(), set()
    plan = segment_decode_graph(
        gm, "cuda", lambda m: GraphedSegment(m, capturer, in_place, compiler))
    if not plan.segments:
        return f"not used: no static stretch ({plan.summary()})"
    folded = (fold_decode_step(gm, lambda stretch: StepReplay(stretch, in_place=in_place))
              if whole_step
              else "off (decode_step_graph=False)")
    fused = "compiled" if compiler is not None else "ATen ops as traced"
    return f"on: {plan.summary()} ({fused}); whole step {folded}"


class CudaGraphCapture:
    """Capture and replay through ``torch.cuda.CUDAGraph``, all segments of one compiled graph
    sharing a memory pool (they replay in the order they were captured, on one stream)."""

    def __init__(self):
        self.pool = None

    def capture(self, run: Callable[[], tuple], device: torch.device
                ) -> tuple[Callable[[], None], tuple]:
        """Warm ``run`` up on a side stream of ``device``, capture it; returns
        ``(replay, outputs)``."""
        if self.pool is None:
            with torch.cuda.device(device):
                self.pool = torch.cuda.graph_pool_handle()
        graph, outputs = capture_cuda_graph(run, device, self.pool)
        return graph.replay, outputs


class GraphedSegment(torch.nn.Module):
    """One segment: eager on its first call, then a captured graph (see the module docstring).

    ``capturer`` captures (``CudaGraphCapture``; tests pass a stand-in), ``in_place`` is shared by
    the segments of one graph: the addresses of their outputs, which later segments read in place.
    ``compiler`` (optional) turns the segment into the callable that runs and is captured.
    """

    def __init__(self, segment: torch.nn.Module, capturer: CudaGraphCapture,
                 in_place: set[int], compiler: SegmentCompiler | None = None):
        super().__init__()
        self.segment = segment
        self.compiler = compiler
        self.compiled: Callable | None = None  # made by ``compiler`` at call 1
        self.compile_failure: str | None = None
        self.capturer = capturer
        self.in_place = in_place
        self.calls = 0
        self.first_addresses: list[int | None] = []
        self.staged: set[int] = set()  # argument indices copied into graph-owned buffers
        self.buffers: dict[int, torch.Tensor] = {}
        self.addresses: dict[int, int] = {}  # argument index -> address the graph reads
        self.constants: dict[int, object] = {}  # non-tensor arguments the capture saw
        self.replay: Callable[[], None] | None = None
        self.outputs: tuple = ()
        self.failure: str | None = None
        self.captures = 0

    def forward(self, *args):
        self.calls += 1
        if self.failure is not None or stream_capturing():
            # Inside a whole decode step being captured (``decode_step_replay``): its launches.
            return self.run(*args)
        if torch.is_grad_enabled():
            # A replay records no autograd history: with gradients on, the segment runs eagerly.
            _warn_once_about_gradients()
            return self.segment(*args)
        if self.replay is None:
            if self.calls == 1:
                self.first_addresses = [_address(a) for a in args]
                self._compile(args)
                return self.run(*args)
            return self._capture(args)
        moved = [i for i, a in self.addresses.items() if _address(args[i]) != a]
        if moved or any(args[i] != c for i, c in self.constants.items()):
            self.staged.update(moved)
            return self._capture(args)
        for i, buffer in self.buffers.items():
            buffer.copy_(args[i])
        self.replay()
        for t in self.outputs:
            torch.autograd.graph.increment_version(t)
        return self.outputs

    def run(self, *args):
        """The segment's work: compiled when it was, else its traced ops."""
        return (self.segment if self.compiled is None else self.compiled)(*args)

    def _compile(self, args) -> None:
        if self.compiler is None:
            return
        try:
            self.compiled = self.compiler(self.segment, list(args))
        except Exception as error:  # the traced ATen ops still compute the same; never silently
            self.compile_failure = f"{type(error).__name__}: {error}"
            log.warning("infinitehip: a decode segment runs its ops unfused, its compilation "
                        "failed: %s", self.compile_failure)

    def _capture(self, args) -> tuple:
        for i, a in enumerate(args):
            if isinstance(a, torch.Tensor) and not self._read_in_place(i, a):
                self.staged.add(i)
        self.buffers = {i: args[i].clone() for i in sorted(self.staged)}
        inputs = [self.buffers.get(i, a) for i, a in enumerate(args)]
        self.addresses = {i: _address(a) for i, a in enumerate(args)
                          if isinstance(a, torch.Tensor) and i not in self.staged}
        self.constants = {i: a for i, a in enumerate(args) if not isinstance(a, torch.Tensor)}
        try:
            device = next(a.device for a in args if isinstance(a, torch.Tensor))
            replay, outputs = self.capturer.capture(lambda: tuple(self.run(*inputs)), device)
        except Exception as error:  # the segment keeps working, eagerly; never silently
            self.failure = f"{type(error).__name__}: {error}"
            self.replay, self.buffers, self.addresses = None, {}, {}
            log.warning("infinitehip: a decode segment stays eager, its capture failed: %s",
                        self.failure)
            return self.run(*args)
        self.replay, self.outputs = replay, outputs
        self.captures += 1
        self.in_place.update(_address(t) for t in outputs)
        replay()  # the capture only recorded the work: run it for this call
        return outputs

    def _read_in_place(self, index: int, arg: torch.Tensor) -> bool:
        if index in self.staged:
            return False
        if isinstance(arg, torch.nn.Parameter) or _address(arg) in self.in_place:
            return True
        first = self.first_addresses[index] if index < len(self.first_addresses) else None
        return first == _address(arg)


_warned_about_gradients = False


def _warn_once_about_gradients() -> None:
    global _warned_about_gradients
    if not _warned_about_gradients:
        _warned_about_gradients = True
        log.warning("infinitehip: decode CUDA graphs are not replayed while gradients are "
                    "enabled; decode under torch.no_grad() or torch.inference_mode() (generate() "
                    "does) to replay them")


def _address(value) -> int | None:
    if not isinstance(value, torch.Tensor):
        return None
    return value.data_ptr()
