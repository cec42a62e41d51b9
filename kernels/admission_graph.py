"""A block bank's admission bookkeeping, replayed as CUDA graphs.

Every read of a bank (``BlockBank.read``, ``BlockBank.fetch``) works out on the device which
blocks hit, which slots the misses take, what they evict and which copies admit them: ~40 small
torch ops (a lookup, sorts, scans, indexed writes) whose launches cost the host far more than
their GPU time. At a decode refresh every layer reads each of its banks, so those launches held
refresh steps back. Their shapes depend only on how many blocks a read names, and every value
they depend on lives on the device (the bank's tables and its read clock), so they are captured
once per read size and replayed.

Sizes are rounded up to a multiple of ``SIZE_STEP`` blocks, the extra entries naming no block:
a decode read's size moves with its window (which widens by a block every few steps until stage
0 runs again), and one capture then serves them all. The first read of a size runs the ops as
they are (which also sets up their lazy state); the second captures them without running them
(admission is not idempotent: a warm-up run would admit twice) and replays the capture. All captures of one store share a memory pool: they are
replayed one after another on one stream, and what each returns stays referenced by it.

A capture that fails leaves the bank on ordinary launches, with a warning that says why; inside
a caller's own capture the ops run as they are (and are captured there).
"""

from __future__ import annotations

import inspect
import logging
import weakref
from typing import Callable

import torch

log = logging.getLogger(__name__)

# plan(block_ids) -> (victim, order, rows, dest): the bank's bookkeeping for one read
Plan = Callable[[torch.Tensor], tuple[torch.Tensor, ...]]


SIZE_STEP = 64


class AdmissionGraphs:
    """Captured admission plans of one bank, one per read size."""

    def __init__(self, plan: Plan, pool):
        # A bank's own method is held weakly: the bank owns these graphs, and a strong reference
        # back would be a cycle that keeps the bank's device memory until Python's cycle
        # collector happens to run.
        self._plan_ref = weakref.WeakMethod(plan) if inspect.ismethod(plan) else lambda: plan
        self._pool = pool  # torch.cuda.graph_pool_handle() shared by a store's banks
        self._seen: set[int] = set()
        self._captured: dict[int, tuple] = {}  # size -> (graph, block_ids, outputs)
        self.failure: str | None = None
        self.captures = 0
        self.replays = 0

    def __call__(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """``plan(block_ids)``, from a replay where one is captured. The outputs of a replay are
        rewritten by the next replay of the same size: use them before then. A replay's entries
        past the read's own name no block; their ``order`` points at its last entry, their
        ``victim`` is the spare slot and they admit nothing, so the data copies that follow are
        unchanged."""
        n = block_ids.numel()
        size = -(-n // SIZE_STEP) * SIZE_STEP
        if self.failure is not None or torch.cuda.is_current_stream_capturing():
            return self._plan(block_ids)
        captured = self._captured.get(size)
        if captured is None:
            if size not in self._seen:
                self._seen.add(size)
                return self._plan(block_ids)
            captured = self._capture(size, block_ids)
            if captured is None:
                return self._plan(block_ids)
        graph, ids_in, (victim, order, rows, dest) = captured
        ids_in[:n].copy_(block_ids)
        if n < size:
            ids_in[n:].fill_(-1)
        graph.replay()
        self.replays += 1
        return victim, order.clamp(max=n - 1), rows, dest

    def _plan(self, block_ids: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self._plan_ref()(block_ids)

    def _capture(self, size: int, block_ids: torch.Tensor) -> tuple | None:
        with torch.inference_mode(False):  # buffers reused across calls, in and out of it
            ids_in = torch.full((size,), -1, dtype=torch.int64, device=block_ids.device)
        graph = torch.cuda.CUDAGraph()
        # Captured on a side stream without ``torch.cuda.graph``'s device sync and cache
        # release: a new read size can come at any decode step, which makes no host sync.
        side = torch.cuda.Stream(block_ids.device)
        side.wait_stream(torch.cuda.current_stream(block_ids.device))
        try:
            with torch.inference_mode(False), torch.no_grad(), torch.cuda.stream(side):
                graph.capture_begin(pool=self._pool)
                try:
                    outputs = self._plan(ids_in)
                finally:
                    graph.capture_end()
        except Exception as error:  # the bank keeps ordinary launches; never silently
            self.failure = f"{type(error).__name__}: {error}"
            log.warning("infinitehip: a block bank's admissions stay on ordinary launches, "
                        "their CUDA graph capture failed: %s", self.failure)
            return None
        torch.cuda.current_stream(block_ids.device).wait_stream(side)
        self._captured[size] = captured = (graph, ids_in, outputs)
        self.captures += 1
        return captured
