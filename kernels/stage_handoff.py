"""Triton kernel between two pruning stages: keep the best chunks, in position order, and split them.

Spec: ``stage_handoff_ref.stage_handoff_ref`` (``keep_best_chunks``, then ``split_chunks``). In
torch the hand-off is about a dozen launches (top-k, gather, two where/eq pairs, sort, then
arange/add/where for the split); at a decode refresh each is a few microseconds of latency on a
few hundred elements, more than the scoring kernel itself. Here it is one program per query block:

    order-preserving 32-bit keys of the scores -> the cut by a radix search (one counting pass
    per bit over the row held in registers, until the cut is found) -> keys above it, ties in
    position order -> compaction by a prefix sum -> kept starts and their sub-chunks stored.

Precondition (what every stage's output and the first stage's grid satisfy): each row's starts
ascend, empty slots (-1, score -inf) last, so compaction in row order is already the position
sort. Differences vs the reference: among equal scores at the cut the earliest chunks are kept
(torch.topk leaves that choice open). Rows longer than ``MAX_ROW`` use the reference.
"""

import torch
import triton
import triton.language as tl

from ihip_compile.kernels.stage_handoff_ref import stage_handoff_ref

# Past this many chunks per row the keys no longer fit in registers (16 warps, 64 per thread).
MAX_ROW = 32768
# A row is held at the first of these widths that holds it. Triton compiles the kernel per
# width, so a width per power of two compiled a new variant each time a growing sequence's
# stage 0 doubled its chunks (in the middle of a prompt or of a generation); three widths
# compile at most three, and the 1024-wide one serves every later stage of the default budgets.
ROW_WIDTHS = (1024, 8192)


@triton.jit
def _order_keys(scores):
    """fp32 -> uint32 with the same order (-inf lowest of the numbers)."""
    bits = scores.to(tl.int32, bitcast=True)
    flipped = tl.where(bits < 0, ~bits, bits ^ -2147483648)
    return flipped.to(tl.uint32, bitcast=True)


@triton.jit
def _cut_key(key, real, keep):
    """A cut such that the ``keep`` best of the ``real`` keys are those above it, plus ties at
    it taken in row order: the keep-th largest key, or a smaller value whose bits (a prefix of
    the keep-th largest key's) already leave exactly ``keep`` keys at or above it; 0 when
    ``keep`` or fewer keys are real.

    A radix search, one bit per pass from the highest, each pass one reduction over the row; it
    stops once the keys at or above the cut number exactly ``keep``, where spread-out scores
    stop well before the 32nd bit. 32-bit keys halve the work per key of 64-bit ones. H200, in
    one process (reports/bench/stage0_launch/handoff_variants_ab.json): 4096-chunk rows 16.4 ->
    11.3 us against 32 passes over 64-bit keys, 16384: 66.9 -> 63.0, 1024: 8.2 -> 5.4; faster
    than two bits per pass (three comparisons and a packed sum per key) on 4096 and 16384.
    """
    cut = tl.full((), 0, tl.uint32)
    at_cut = tl.sum(real.to(tl.int32), 0)  # keys at or above the cut
    bit = tl.full((), 2147483648, tl.uint32)
    while (bit > 0) & (at_cut > keep):
        trial = cut | bit
        count = tl.sum((real & (key >= trial)).to(tl.int32), 0)
        take = count >= keep
        cut = tl.where(take, trial, cut)
        at_cut = tl.where(take, count, at_cut)
        bit = bit >> 1
    return cut


@triton.jit
def _keep_best(scores_ptr, row, n, keep, idx, in_row):
    """Mask of the ``keep`` best chunks of a row (earliest first among ties) that are not empty."""
    scores = tl.load(scores_ptr + row * n + idx, mask=in_row, other=float("-inf"))
    key = _order_keys(scores)
    cut = _cut_key(key, in_row, keep)
    above = in_row & (key > cut)
    tie = in_row & (key == cut)
    room = keep - tl.sum(above.to(tl.int32), 0)
    chosen = above | (tie & (tl.cumsum(tie.to(tl.int32), 0) <= room))
    return chosen & (scores != float("-inf"))


@triton.jit
def _stage_handoff_kernel(
    scores_ptr, starts_ptr, kept_ptr, children_ptr, n, width, keep, nqb, stride_starts_b,
    stride_starts_q, child_step, child_div,
    N_P2: tl.constexpr, RATIO: tl.constexpr, SCORED: tl.constexpr, WRITE_KEPT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # rows x chunks passes 2^31 for multi-million prompts
    idx = tl.arange(0, N_P2)
    in_row = idx < n
    starts_row = starts_ptr + (row // nqb) * stride_starts_b + (row % nqb) * stride_starts_q
    starts = tl.load(starts_row + idx, mask=in_row, other=-1)
    if SCORED:
        valid = _keep_best(scores_ptr, row, n, keep, idx, in_row)
    else:  # a plain split: every non-empty chunk
        valid = in_row & (starts >= 0)
    count = tl.sum(valid.to(tl.int32), 0)
    dest = tl.cumsum(valid.to(tl.int32), 0) - 1
    empty = (idx >= count) & (idx < width)
    if WRITE_KEPT:
        tl.store(kept_ptr + row * width + dest, starts, mask=valid)
        tl.store(kept_ptr + row * width + idx, tl.full((N_P2,), -1, tl.int32), mask=empty)
    out = children_ptr + row * width * RATIO
    for j in tl.static_range(RATIO):
        tl.store(out + dest * RATIO + j, (starts + j * child_step) // child_div, mask=valid)
        tl.store(out + idx * RATIO + j, tl.full((N_P2,), -1, tl.int32), mask=empty)


def _launch_shape(n: int):
    """(row width, warps) for rows of ``n`` chunks (at most ``MAX_ROW``)."""
    width = next((w for w in ROW_WIDTHS if n <= w), MAX_ROW)
    return width, 4 if width <= 1024 else 16


def stage_handoff(scores, starts, keep: int, chunk: int, next_chunk: int, *, block_div: int = 1,
                  keep_kept: bool = True):
    """Kept chunk starts and the next stage's candidates, in one launch.

    scores [B, NQB, N] fp32 or None (keep every non-empty chunk: a plain split); starts
    [B, NQB, N] integer, ascending per row with -1 last (strides of an expanded grid allowed);
    keep: chunks to keep. Returns ``(kept [B, NQB, W] int32 or None, children [B, NQB, W *
    chunk / next_chunk] int32)`` with W = min(keep, N): kept starts ascending, -1 last; children
    are ``(start + j * next_chunk) // block_div`` for each kept start (block_div = the last
    stage's chunk turns starts into block indices).
    """
    b, nqb, n = starts.shape
    if chunk % next_chunk:
        raise ValueError(f"next_chunk must divide chunk, got {next_chunk} and {chunk}")
    if scores is not None and tuple(scores.shape) != (b, nqb, n):
        raise ValueError(f"scores must be [B, NQB, N]={[b, nqb, n]}, got {list(scores.shape)}")
    ratio = chunk // next_chunk
    if n > MAX_ROW:
        return stage_handoff_ref(scores, starts, keep, chunk, next_chunk, block_div=block_div,
                                 keep_kept=keep_kept)
    width = min(keep, n) if scores is not None else n
    starts = starts.to(torch.int32)
    if starts.stride(-1) != 1:
        starts = starts.contiguous()
    kept = torch.empty((b, nqb, width), device=starts.device, dtype=torch.int32) \
        if keep_kept else None
    children = torch.empty((b, nqb, width * ratio), device=starts.device, dtype=torch.int32)
    if b * nqb == 0 or n == 0:
        return kept, children
    n_p2, warps = _launch_shape(n)
    _stage_handoff_kernel[(b * nqb,)](
        scores.contiguous() if scores is not None else starts, starts,
        kept if keep_kept else children, children, n, width, keep, nqb, starts.stride(0),
        starts.stride(1), next_chunk, block_div,
        N_P2=n_p2, RATIO=ratio, SCORED=scores is not None, WRITE_KEPT=keep_kept,
        num_warps=warps,
    )
    return kept, children
