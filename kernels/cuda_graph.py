"""Capturing a piece of GPU work as a CUDA graph: one replay instead of its launches.

Shared by the decode segments of a compiled graph (``ihip_compile.cuda_graph_segment``) and the
attention of a cached decode step (``decode_step_graph``). The work runs once on a side stream
before the capture, so that lazy state (library handles, Triton compilation, allocator blocks)
is set up outside it.
"""

from __future__ import annotations

import functools
from typing import Callable

import torch


def capture_cuda_graph(run: Callable[[], object], device: torch.device, pool=None
                       ) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm ``run`` up on a side stream of ``device``, then capture it (memory from ``pool``, a
    ``torch.cuda.graph_pool_handle()``, or the graph's own); returns ``(graph, outputs)``. The
    capture only records: ``graph.replay()`` runs the work."""
    with torch.cuda.device(device):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            run()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=pool):
            outputs = run()
    return graph, outputs


def stream_capturing() -> bool:
    """Whether work launched now is being captured into a CUDA graph (False without CUDA)."""
    return _has_cuda() and torch.cuda.is_current_stream_capturing()


@functools.cache
def _has_cuda() -> bool:
    return torch.cuda.is_available()  # asked once: a decode step calls this many times
