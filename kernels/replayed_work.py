"""Device work with side effects, captured as a CUDA graph once per key and then replayed.

A block bank's reads (``block_bank``) run ~40 small torch ops each: the slot lookup, sorts,
scans and indexed writes of its admission bookkeeping, the gather launches that copy its misses
in, and for a decode refresh the ops that work out which blocks it names. Their launches cost
the host far more than their GPU time, and every layer reads its banks at every refresh. Their
shapes depend only on a few host facts (how many blocks a read names, the banks and host copies
they address), and every value they depend on lives on the device (the bank's tables and read
clock, the selection), so the work is captured once per key and replayed.

The caller names everything a capture bakes in by its key. Inputs are copied into buffers the
capture reads: tensors, tensors ``Padded`` along their first dimension (so that one capture
serves reads of neighbouring sizes) and Python ints (set by a fill, never a host copy that
could wait for the GPU). The first call with a key runs the work as it is (which also
sets up its lazy state: Triton compilation, allocator blocks); the second captures it without
running it (the work is not idempotent: a warm-up run would admit twice) and replays the
capture. All captures of one store share a memory pool: they are replayed one after another on
one stream, and what each returns stays referenced by it (and is rewritten by its next replay).

A capture that fails leaves the work on ordinary launches, with a warning that says why; inside
a caller's own capture the work runs as it is (and is captured there).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable, Hashable, TypeVar

import torch

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass
class Padded:
    """An input whose buffer holds ``size`` rows: ``tensor``'s, then rows of ``value``."""

    tensor: torch.Tensor
    size: int
    value: int = -1


class ReplayedWork:
    """Captured pieces of device work, one per key, sharing one graph memory pool."""

    def __init__(self, pool, what: str):
        """``pool``: a ``torch.cuda.graph_pool_handle()``; ``what`` names the work in the
        warning a failed capture gives."""
        self._pool, self._what = pool, what
        self._seen: set[Hashable] = set()
        self._captured: dict[Hashable, tuple] = {}  # key -> (graph, buffers, outputs)
        self.failure: str | None = None
        self.captures = 0
        self.replays = 0

    def __call__(self, key: Hashable, work: Callable[..., T], inputs: tuple) -> T:
        """``work(*inputs)`` (tensors, ``Padded`` tensors, ints), from a replay where one is
        captured under ``key``, which must name every host fact ``work`` bakes in, the input
        buffers' shapes included. Run as it is, ``work`` gets a ``Padded`` input unpadded. A
        replay's outputs are rewritten by the next replay of the same key: use them before."""
        if self.failure is not None or torch.cuda.is_current_stream_capturing():
            return run_as_is(work, inputs)
        captured = self._captured.get(key)
        if captured is None:
            if key not in self._seen:
                self._seen.add(key)
                return run_as_is(work, inputs)
            captured = self._capture(key, work, inputs)
            if captured is None:
                return run_as_is(work, inputs)
        graph, buffers, outputs = captured
        for buffer, value in zip(buffers, inputs):
            _set(buffer, value)
        graph.replay()
        self.replays += 1
        return outputs

    def _capture(self, key: Hashable, work: Callable[..., T], inputs: tuple) -> tuple | None:
        device = next(_tensor(x).device for x in inputs if not isinstance(x, int))
        with torch.inference_mode(False):  # buffers reused across calls, in and out of it
            buffers = [_buffer(x, device) for x in inputs]
        for buffer, value in zip(buffers, inputs):
            _set(buffer, value)
        graph = torch.cuda.CUDAGraph()
        # Captured on a side stream without ``torch.cuda.graph``'s device sync and cache
        # release: a new key can come at any decode step, which makes no host sync.
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        try:
            with torch.inference_mode(False), torch.no_grad(), torch.cuda.stream(side):
                graph.capture_begin(pool=self._pool)
                try:
                    outputs = work(*buffers)
                finally:
                    graph.capture_end()
        except Exception as error:  # the work stays on ordinary launches; never silently
            self.failure = f"{type(error).__name__}: {error}"
            log.warning("infinitehip: %s stay on ordinary launches, their CUDA graph capture "
                        "failed: %s", self._what, self.failure)
            return None
        torch.cuda.current_stream(device).wait_stream(side)
        self._captured[key] = captured = (graph, buffers, outputs)
        self.captures += 1
        return captured


def padded_size(n: int, step: int) -> int:
    """``n`` rounded up to a multiple of ``step``: the buffer size for reads of ``n`` entries."""
    return -(-n // step) * step


def _tensor(value):
    return value.tensor if isinstance(value, Padded) else value


def run_as_is(work: Callable[..., T], inputs: tuple) -> T:
    """``work`` run on ``inputs`` with ordinary launches, a ``Padded`` input unpadded."""
    return work(*(_tensor(x) for x in inputs))


def _buffer(value, device: torch.device) -> torch.Tensor:
    if isinstance(value, int):
        return torch.zeros((), dtype=torch.int64, device=device)
    tensor = _tensor(value)
    rows = value.size if isinstance(value, Padded) else tensor.shape[0]
    return torch.empty((rows, *tensor.shape[1:]), dtype=tensor.dtype, device=device)


def _set(buffer: torch.Tensor, value) -> None:
    if isinstance(value, int):
        buffer.fill_(value)
    elif isinstance(value, Padded):
        n = value.tensor.shape[0]
        buffer[:n].copy_(value.tensor)
        if n < value.size:
            buffer[n:].fill_(value.value)
    else:
        buffer.copy_(value)
