"""Triton kernel between two pruning stages: keep the best chunks, in position order, and split them.

Spec: ``stage_handoff_ref.stage_handoff_ref`` (``keep_best_chunks``, then ``split_chunks``). In
torch the hand-off is about a dozen launches (top-k, gather, two where/eq pairs, sort, then
arange/add/where for the split); at a decode refresh each is a few microseconds of latency on a
few hundred elements, more than the scoring kernel itself. Here it is one program per query block:

    order-preserving 32-bit keys of the scores -> the cut by a radix search (one counting pass
    per bit over the row, until the cut is found) -> keys above it, ties in position order ->
    compaction by a running prefix sum -> kept starts and their sub-chunks stored.

Precondition (what every stage's output and the first stage's grid satisfy): each row's starts
ascend, empty slots (-1, score -inf) last, so compaction in row order is already the position
sort. Differences vs the reference: among equal scores at the cut the earliest chunks are kept
(torch.topk leaves that choice open).
"""

import torch
import triton
import triton.language as tl

# Chunks per step of the kernel's loops over a row, and its warps. The loops read the row from
# memory at every step (L1/L2-resident: 16 KB at 1M keys) instead of holding it in registers, so
# one compiled variant serves rows of any length: a growing sequence never stops mid-prompt or
# mid-generation to compile a wider one (a 32768-wide row held in registers took 4.5 s to
# compile for sm_90), and rows past any register limit need no fallback.
TILE = 1024
WARPS = 4


@triton.jit
def _order_keys(scores):
    """fp32 -> uint32 with the same order (-inf lowest of the numbers)."""
    bits = scores.to(tl.int32, bitcast=True)
    flipped = tl.where(bits < 0, ~bits, bits ^ -2147483648)
    return flipped.to(tl.uint32, bitcast=True)


@triton.jit
def _keys_tile(scores_row, start, n, TILE: tl.constexpr):
    """Order keys of a row's chunks [start, start + TILE), the scores, and which are in the row."""
    idx = start + tl.arange(0, TILE)
    in_row = idx < n
    scores = tl.load(scores_row + idx, mask=in_row, other=float("-inf"))
    return _order_keys(scores), scores, in_row


@triton.jit
def _count_above(scores_row, n, floor, TILE: tl.constexpr):
    """How many of the row's keys are above ``floor``."""
    count = tl.full((), 0, tl.int32)
    for start in range(0, n, TILE):
        key, _, in_row = _keys_tile(scores_row, start, n, TILE)
        count += tl.sum((in_row & (key > floor)).to(tl.int32), 0)
    return count


@triton.jit
def _cut_key(scores_row, n, keep, TILE: tl.constexpr):
    """A cut such that the ``keep`` best of the row's keys are those above it, plus ties at it
    taken in row order: the keep-th largest key, or a smaller value whose bits (a prefix of the
    keep-th largest key's) already leave exactly ``keep`` keys at or above it; 0 when ``keep``
    or fewer keys are in the row.

    A radix search, one bit per pass from the highest, each pass one count over the row; it
    stops once the keys at or above the cut number exactly ``keep``, where spread-out scores
    stop well before the 32nd bit. 32-bit keys halve the work per key of 64-bit ones.
    """
    cut = tl.full((), 0, tl.uint32)
    at_cut = tl.full((), 0, tl.int32) + n  # keys at or above the cut
    bit = tl.full((), 2147483648, tl.uint32)
    while (bit > 0) & (at_cut > keep):
        trial = cut | bit
        count = _count_above(scores_row, n, trial - 1, TILE)  # at or above trial (>= 1)
        take = count >= keep
        cut = tl.where(take, trial, cut)
        at_cut = tl.where(take, count, at_cut)
        bit = bit >> 1
    return cut


@triton.jit
def _stage_handoff_kernel(
    scores_ptr, starts_ptr, kept_ptr, children_ptr, n, width, keep, nqb, stride_starts_b,
    stride_starts_q, child_step, child_div,
    TILE: tl.constexpr, RATIO: tl.constexpr, SCORED: tl.constexpr, WRITE_KEPT: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # rows x chunks passes 2^31 for multi-million prompts
    starts_row = starts_ptr + (row // nqb) * stride_starts_b + (row % nqb) * stride_starts_q
    scores_row = scores_ptr + row * n
    kept_row = kept_ptr + row * width
    children_row = children_ptr + row * width * RATIO
    cut = tl.full((), 0, tl.uint32)
    room = tl.full((), 0, tl.int32)
    if SCORED:
        cut = _cut_key(scores_row, n, keep, TILE)
        room = keep - _count_above(scores_row, n, cut, TILE)  # ties at the cut to take
    placed = tl.full((), 0, tl.int32)
    ties_seen = tl.full((), 0, tl.int32)
    for start in range(0, n, TILE):  # in row order, so compaction keeps the position order
        idx = start + tl.arange(0, TILE)
        in_row = idx < n
        starts = tl.load(starts_row + idx, mask=in_row, other=-1)
        if SCORED:
            key, scores, _ = _keys_tile(scores_row, start, n, TILE)
            tie = in_row & (key == cut)
            first_ties = (ties_seen + tl.cumsum(tie.to(tl.int32), 0)) <= room
            chosen = (in_row & (key > cut)) | (tie & first_ties)
            valid = chosen & (scores != float("-inf"))
            ties_seen += tl.sum(tie.to(tl.int32), 0)
        else:  # a plain split: every non-empty chunk
            valid = in_row & (starts >= 0)
        dest = placed + tl.cumsum(valid.to(tl.int32), 0) - 1
        if WRITE_KEPT:
            tl.store(kept_row + dest, starts, mask=valid)
        for j in tl.static_range(RATIO):
            tl.store(children_row + dest * RATIO + j, (starts + j * child_step) // child_div,
                     mask=valid)
        placed += tl.sum(valid.to(tl.int32), 0)
    for start in range(0, width, TILE):  # empty slots last
        idx = start + tl.arange(0, TILE)
        empty = (idx >= placed) & (idx < width)
        if WRITE_KEPT:
            tl.store(kept_row + idx, tl.full((TILE,), -1, tl.int32), mask=empty)
        for j in tl.static_range(RATIO):
            tl.store(children_row + idx * RATIO + j, tl.full((TILE,), -1, tl.int32), mask=empty)


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
    width = min(keep, n) if scores is not None else n
    starts = starts.to(torch.int32)
    if starts.stride(-1) != 1:
        starts = starts.contiguous()
    kept = torch.empty((b, nqb, width), device=starts.device, dtype=torch.int32) \
        if keep_kept else None
    children = torch.empty((b, nqb, width * ratio), device=starts.device, dtype=torch.int32)
    if b * nqb == 0 or n == 0:
        return kept, children
    _stage_handoff_kernel[(b * nqb,)](
        scores.contiguous() if scores is not None else starts, starts,
        kept if keep_kept else children, children, n, width, keep, nqb, starts.stride(0),
        starts.stride(1), next_chunk, block_div,
        TILE=TILE, RATIO=ratio, SCORED=scores is not None, WRITE_KEPT=keep_kept,
        num_warps=WARPS,
    )
    return kept, children
