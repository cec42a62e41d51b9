"""A decode step's append to the offloaded store, replayed as a CUDA graph.

Each decode step appends one key and one value per row to every layer (``token_append``): one
kernel, whose launch costs the host more than the kernel costs the GPU (the store's checks, the
list of writes, Triton's handling of ~30 arguments). From one step to the next only the token
and its position change, so the launch is captured once per layer: the new key and value are
copied into buffers the graph reads, the position is set in a one-element tensor the kernel
reads (``append_tokens_kernel``'s ``start_at``), and the graph replays. The graph writes the
host copy and the banks where the captured launch did; when the layer's host copy or banks are
reallocated (``HostKVStore.grow``), the next step captures again. The capture itself runs the
append once more at the same place, which writes the same bits.

A capture that fails leaves the layer on ordinary launches, with a warning that says why.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ihip_compile.kernels.cuda_graph import capture_cuda_graph
from ihip_compile.kernels.step_capture import LayerHook
from ihip_compile.kernels.token_append import append_tokens_kernel

log = logging.getLogger(__name__)

# writes_for(keys, values) -> token_append's writes of these tokens, e.g. [(keys, host, banks)...]
WritesFor = Callable[[torch.Tensor, torch.Tensor], list]


class AppendStepGraph:
    """The captured one-token append of one layer, with the buffers it reads."""

    def __init__(self):
        self.shapes: tuple | None = None  # shapes and dtypes of the captured tokens
        self.layout: tuple = ()  # the memory written (host copy, banks), compared by identity
        self.graph: torch.cuda.CUDAGraph | None = None
        self.buffers: dict[str, torch.Tensor] = {}  # "keys", "values", "start"
        self.start: int | None = None  # the value last set
        self.failure: str | None = None
        self.captures = 0
        self.replays = 0
        self.last_call_replayed = False  # the steady path: a whole-step graph may take over

    def append(self, keys, values, start: int, writes_for: WritesFor, blocks_per_row: int,
               layout: tuple) -> None:
        """Append ``keys``/``values`` [B, H_KV, 1, D] at token ``start``; ``layout``: the
        objects holding the memory ``writes_for`` writes (a new one captures again)."""
        self.last_call_replayed = False
        if torch.cuda.is_current_stream_capturing():  # inside a caller's capture: its launch
            append_tokens_kernel(writes_for(keys, values), start, blocks_per_row)
            return
        if self.failure is None and not self._captured_for(keys, values, layout):
            self._capture(keys, values, start, writes_for, blocks_per_row, layout)
        if self.failure is not None:
            append_tokens_kernel(writes_for(keys, values), start, blocks_per_row)
            return
        self.buffers["keys"].copy_(keys)
        self.buffers["values"].copy_(values)
        self.set_start(start)
        self.graph.replay()
        self.replays += 1
        self.last_call_replayed = True

    def set_start(self, start: int) -> None:
        """Put the first token's position where the captured launch reads it."""
        if start != self.start:
            self.buffers["start"].fill_(start)
            self.start = start

    def launch_on_buffers(self, keys, values, writes_for: WritesFor, blocks_per_row: int) -> None:
        """The captured launch, run (not replayed) on ``keys``/``values`` where they lie, at the
        position in the start buffer: the append's part of a whole decode step being captured
        (``step_capture``)."""
        append_tokens_kernel(writes_for(keys, values), self.start, blocks_per_row,
                             start_at=self.buffers["start"])

    def _captured_for(self, keys, values, layout: tuple) -> bool:
        return (self.graph is not None and self.shapes == _shapes(keys, values)
                and self.writes_to(layout))

    def writes_to(self, layout: tuple) -> bool:
        """Whether the captured launch writes the memory of ``layout`` (compared by identity)."""
        return len(layout) == len(self.layout) and all(a is b for a, b in zip(layout, self.layout))

    def _capture(self, keys, values, start, writes_for, blocks_per_row, layout) -> None:
        with torch.inference_mode(False):  # buffers reused across calls, in and out of it
            self.buffers = {"keys": torch.empty(keys.shape, dtype=keys.dtype, device=keys.device),
                            "values": torch.empty(values.shape, dtype=values.dtype,
                                                  device=values.device),
                            "start": torch.full((1,), start, dtype=torch.int64,
                                                device=keys.device)}
        self.graph, self.shapes, self.layout, self.start = None, None, (), start
        self.buffers["keys"].copy_(keys)
        self.buffers["values"].copy_(values)
        buffers = self.buffers

        def run():
            append_tokens_kernel(writes_for(buffers["keys"], buffers["values"]), start,
                                 blocks_per_row, start_at=buffers["start"])

        try:
            with torch.inference_mode(False), torch.no_grad():
                self.graph, _ = capture_cuda_graph(run, keys.device)
        except Exception as error:  # the layer keeps appending by ordinary launches; never silently
            self.failure = f"{type(error).__name__}: {error}"
            log.warning("infinitehip: a layer's decode append stays on ordinary launches, its "
                        "CUDA graph capture failed: %s", self.failure)
            return
        self.shapes, self.layout = _shapes(keys, values), layout
        self.captures += 1


def _shapes(keys, values) -> tuple:
    return (tuple(keys.shape), keys.dtype, tuple(values.shape), values.dtype)


class AppendHook(LayerHook):
    """A layer's captured append as a hook of a whole-step graph (``step_capture``)."""

    kind = "append"

    def steady(self, s_k: int) -> bool:
        """``s_k``: the layer's keys after this step's append."""
        store, graph = self.store, self.graph
        return (store is not None and graph is not None
                and store.append_graphs.get(self.layer) is graph
                and graph.failure is None and graph.captures == self.captures
                and s_k <= store.capacity_tokens
                and graph.writes_to(store.append_layout(self.layer)))

    def prepare(self, s_k: int) -> None:
        self.graph.set_start(s_k - 1)  # a no-op after a whole-step replay (``launch``)

    def account(self, s_k: int) -> None:
        graph = self.graph
        graph.start = s_k  # where the replay left the start buffer
        self.store.count_decode_append(self.layer)
        graph.replays += 1

    def launch(self, keys, values) -> None:
        """The append, then the start buffer moved on to the next token: consecutive whole-step
        replays need no fill before them."""
        store, layer, graph = self.store, self.layer, self.graph
        graph.launch_on_buffers(keys, values, lambda k, v: store.token_writes(layer, k, v),
                                store.blocks_per_row)
        graph.buffers["start"].add_(1)
