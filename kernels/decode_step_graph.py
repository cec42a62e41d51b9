"""One layer's decode attention in the attention bank's slots, replayed as a CUDA graph.

Between selection refreshes a decode step over the offloaded cache attends the same blocks in
the same attention-bank slots as the step before (``resident_blocks``), through the same two
kernels (``sparse_decode``: the split kernel and the merge). What changes from one step to the
next lives on the device:
    the query and its position       copied at each step into buffers the graph reads
    the selected blocks              copied into a buffer when a refresh selects new ones
    the window's first key           set when stage 0 moves it (the window ends at the query:
                                     ``sparse_decode``'s ``window_start``)
so the kernels are captured once per layer and every step replays them: two Triton launches
(~80 us of host time each under cProfile, mostly argument handling) become one replay. The graph reads
the bank slots, the page table and ``inv_freq`` where they lie; when any of them moves (a new
bank), or a shape or scalar of the launch changes, the next step captures again.

A capture that fails leaves the layer on the ordinary launches, with a warning that says why.
"""

from __future__ import annotations

import logging

import torch

from ihip_compile.kernels.bank_kv import BankKV
from ihip_compile.kernels.cuda_graph import capture_cuda_graph
from ihip_compile.kernels.selection_scope import fold_heads, fold_query_positions
from ihip_compile.kernels.sparse_decode import sparse_decode

log = logging.getLogger(__name__)


class DecodeStepGraph:
    """The captured attention of one layer's decode steps, with the buffers it reads."""

    def __init__(self):
        self.key: tuple | None = None  # what the graph reads and how: a new key captures again
        self.graph: torch.cuda.CUDAGraph | None = None
        self.buffers: dict[str, torch.Tensor] = {}  # "q", "positions", "blocks", "window_start"
        self.out: torch.Tensor | None = None  # [B * G, H / G, 1, D], written by each replay
        self.blocks_source: torch.Tensor | None = None  # the selection last copied
        self.window_start: int | None = None  # the value last set
        self.failure: str | None = None
        self.captures = 0
        self.replays = 0
        self.run_on_buffers = None  # the captured launches, as a function of the buffers

    def attend(self, q, q_positions, k: BankKV, v: BankKV, blocks, common: dict
               ) -> torch.Tensor:
        """Decode attention of one step in the bank's slots: q [B, H, 1, D] and q_positions
        as the op got them (the query is the newest key), ``k``/``v`` folded into G sequences
        per row, ``blocks`` [B * G, 1, TOPK], ``common`` ``sparse_decode``'s keywords (with
        ``max_window_tokens``). Returns [B * G, H / G, 1, D]."""
        s_k, window = k.shape[2], common["window_tokens"]
        groups = k.shape[0] // q.shape[0]
        if (self.failure is not None or window > common["max_window_tokens"]
                or torch.cuda.is_current_stream_capturing()):  # inside a caller's capture
            return self._launch(q, q_positions, k, v, blocks, common, groups, None)
        key = _launch_key(q, q_positions, k, v, blocks, common)
        if key != self.key:
            self._capture(key, q, q_positions, k, v, blocks, common, groups)
            if self.failure is not None:
                return self._launch(q, q_positions, k, v, blocks, common, groups, None)
        return self.replay(q, q_positions, blocks, s_k - window)

    def replay(self, q, q_positions, blocks, window_start: int) -> torch.Tensor:
        """The captured step for this query: copy what changed into the buffers, replay;
        returns a copy of the output."""
        buffers = self.buffers
        buffers["q"].copy_(q)
        buffers["positions"].copy_(q_positions)
        if blocks is not self.blocks_source:
            buffers["blocks"].copy_(blocks)
            self.blocks_source = blocks  # held: its memory is not reused while it is compared
        if window_start != self.window_start:
            buffers["window_start"].fill_(window_start)
            self.window_start = window_start
        self.graph.replay()
        self.replays += 1
        # The next replay rewrites the graph's output; a caller may keep this one (it did not
        # ask for a view of a buffer), so it gets its own copy.
        return self.out.clone()

    def holds(self, blocks, window_start: int) -> bool:
        """Whether the buffers hold ``blocks`` and ``window_start`` already (``replay`` would
        copy nothing but the query)."""
        return blocks is self.blocks_source and window_start == self.window_start

    def launch_on_buffers(self, q, q_positions) -> torch.Tensor:
        """The captured launches, run (not replayed) on the buffers with this query: the
        attention's part of a whole decode step being captured (``step_capture``)."""
        self.buffers["q"].copy_(q)
        self.buffers["positions"].copy_(q_positions)
        return self.run_on_buffers()

    def fits(self, q, q_positions) -> bool:
        """Whether ``replay`` can take these inputs (the shapes and dtypes captured; not
        while a caller captures a graph itself)."""
        buffers = self.buffers
        return (self.graph is not None and not torch.cuda.is_current_stream_capturing()
                and q.shape == buffers["q"].shape
                and q.dtype == buffers["q"].dtype
                and q_positions.shape == buffers["positions"].shape)

    def _capture(self, key, q, q_positions, k, v, blocks, common, groups) -> None:
        with torch.inference_mode(False):  # buffers reused across calls, in and out of it
            self.buffers = {
                "q": torch.empty(q.shape, dtype=q.dtype, device=q.device),
                "positions": torch.empty(q_positions.shape, dtype=q_positions.dtype,
                                         device=q.device),
                "blocks": torch.empty(blocks.shape, dtype=torch.int32, device=blocks.device),
                "window_start": torch.zeros(1, dtype=torch.int64, device=q.device),
            }
        self.blocks_source, self.window_start, self.graph, self.key = None, None, None, None
        self.buffers["q"].copy_(q)
        self.buffers["positions"].copy_(q_positions)
        self.buffers["blocks"].copy_(blocks)
        self.buffers["window_start"].fill_(k.shape[2] - common["window_tokens"])
        buffers = self.buffers

        def run():
            return self._launch(buffers["q"], buffers["positions"], k, v, buffers["blocks"],
                                common, groups, buffers["window_start"])

        try:
            with torch.inference_mode(False), torch.no_grad():
                self.graph, self.out = capture_cuda_graph(run, q.device)
        except Exception as error:  # the layer keeps working on the ordinary launches; never silently
            self.failure = f"{type(error).__name__}: {error}"
            log.warning("infinitehip: decode attention of a layer stays on ordinary launches, "
                        "its CUDA graph capture failed: %s", self.failure)
            return
        self.key, self.run_on_buffers = key, run
        self.captures += 1

    @staticmethod
    def _launch(q, q_positions, k, v, blocks, common, groups, window_start):
        pos = fold_query_positions(q_positions.to(q.device), q.shape[0], 1, groups)
        return sparse_decode(fold_heads(q, groups), k, v, blocks, pos, window_start=window_start,
                             **common)


def _launch_key(q, q_positions, k: BankKV, v: BankKV, blocks, common: dict) -> tuple:
    """Everything a captured launch bakes in: shapes, dtypes, the addresses it reads in place
    (bank slots, page table, ``inv_freq``) and the scalars; not the window's length, which the
    kernel works out from the buffers."""
    inv_freq = common.get("inv_freq")
    scalars = tuple((n, c) for n, c in sorted(common.items())
                    if n not in ("window_tokens", "inv_freq"))
    return (tuple(q.shape), q.dtype, tuple(q_positions.shape), q_positions.dtype,
            tuple(blocks.shape), k.batch, k.groups, k.blocks_per_row,
            min(common["sink_tokens"], k.shape[2]),
            tuple((t.slots.data_ptr(), tuple(t.slots.shape), t.slots.stride(), t.slots.dtype)
                  for t in (k, v)),
            k.slot_of_block.data_ptr(), None if inv_freq is None else inv_freq.data_ptr(),
            scalars)
