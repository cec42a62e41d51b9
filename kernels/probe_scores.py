"""``@triton.jit`` helpers shared by the kernels that score chunks (``prune_stage``: the probe
search; ``chunk_maxima``: every key): where a probed key lies, its pruning RoPE and its score
over the heads.

Spec: ``prune_stage_ref`` (``probe_key_delta`` for the rotation, ``score`` for the products).
"""

import torch
import triton
import triton.language as tl

from ihip_compile.kernels._primitives import (
    load_rows, rotation_cos_sin, row_rotation, turn_halves, turn_rows,
)
from ihip_compile.kernels.bank_kv import BankKV
from ihip_compile.kernels.host_keys import BlockMajorKeys
from ihip_compile.kernels.prune_stage_ref import RELATIVE_QUERY_DISTANCE

# jit code reads module globals only as tl.constexpr.
_QUERY_DISTANCE = tl.constexpr(RELATIVE_QUERY_DISTANCE)

# Query rows x probed keys of one ``max_over_heads`` load that a program holds past 64 query rows
# at head dim 128 on an H200: 128 rows x 64 probes asked for 246 KB of shared memory, of the
# 227 KB there are; 128 x 32 and 256 x 16 fit. Half that while rotating (the fp32 cos/sin tiles).
# Up to 64 rows every launch was measured as it is (64 rows take 128 probes: the rows cost more
# than the probes), so no limit applies there.
_MEASURED_QUERY_ROWS = 64
_ROW_PROBES = 64 * 64
_NO_LIMIT = 1 << 30


def probes_per_load(query_rows: int, rotating: bool) -> int:
    """Most probed keys one load of ``query_rows`` query rows may gather."""
    if query_rows <= _MEASURED_QUERY_ROWS:
        return _NO_LIMIT
    return max(1, _ROW_PROBES // (2 if rotating else 1) // query_rows)


def key_addressing(k) -> tuple[torch.Tensor, dict]:
    """The memory a scoring kernel reads for keys ``k`` (a [B, H_KV, S_K, D] tensor, host keys
    read in place, ``host_keys.BlockMajorKeys``, or bank slots, ``bank_kv.BankKV``) and how key
    s of head h of sequence b is found in it (``key_bases``, ``key_offsets``): element strides,
    keys per block and, for bank slots, the page table (``paged``; else ``table`` is the memory
    itself, never read)."""
    if isinstance(k, BankKV):
        return k.slots, {**k.addressing(), "paged": True}
    unpaged = {"blocks_per_row": 0, "fold": 1, "paged": False}
    if isinstance(k, BlockMajorKeys):
        return k.blocks, {**k.addressing(), "table": k.blocks, **unpaged}
    if k.stride(-1) != 1:
        k = k.contiguous()
    return k, {"stride_b": k.stride(0), "stride_h": k.stride(1), "stride_blk": k.stride(2),
               "stride_s": k.stride(2), "keys_per_block": 1, "table": k, **unpaged}


@triton.jit
def key_bases(k_ptr, table_ptr, b, stride_k_b, blocks_per_row, fold, PAGED: tl.constexpr):
    """Where sequence ``b``'s keys start and, PAGED, its row of the page table: ``fold``
    sequences share a row of bank slots, ``stride_k_b`` elements apart within a slot."""
    if PAGED:
        return k_ptr + (b % fold) * stride_k_b, table_ptr + (b // fold) * blocks_per_row
    return k_ptr + b * stride_k_b, table_ptr


@triton.jit
def key_offsets(keys_at, ok, table_base, stride_blk, stride_s, KB: tl.constexpr,
                PAGED: tl.constexpr):
    """Element offsets [N] of the keys at indices ``keys_at`` [N] and which of them can be read.
    Keys lie in blocks of KB keys, ``stride_blk`` elements apart, ``stride_s`` between the keys of
    a block (KB 1: plain rows ``stride_blk`` apart); PAGED: block j is the bank slot
    ``table_base[j]`` (-1: not in the bank, not read: zeros, as ``BankKV.as_tensor`` has it)."""
    block = keys_at // KB
    if PAGED:
        block = tl.load(table_base + block, mask=ok, other=-1)
        ok = ok & (block >= 0)
    return block.to(tl.int64) * stride_blk + (keys_at % KB) * stride_s, ok


@triton.jit
def probe_delta(probe, block_pos, n_chunks, window_tokens, CHUNK: tl.constexpr,
                ROPE_MODE: tl.constexpr):
    """Rotation (in positions) of the keys at indices ``probe`` scored for a query block whose
    last query is at ``block_pos``; ROPE_MODE 1 relative, 2 chunk-indexed, else none (zeros)."""
    if ROPE_MODE == 1:
        delta = block_pos - _QUERY_DISTANCE - probe
    elif ROPE_MODE == 2:
        query_at = tl.minimum(block_pos, n_chunks + window_tokens)
        delta = probe // CHUNK - probe - (query_at - block_pos)
    else:
        delta = probe * 0
    return delta


@triton.jit
def max_over_heads(k_ptr, q_ptr, key_offset, key_ok, stride_k_h, stride_q_h, head_dim, delta,
                   inv_freq_ptr, H_KV: tl.constexpr, GROUP: tl.constexpr, NPQ: tl.constexpr,
                   QROWS: tl.constexpr, BLOCK_D: tl.constexpr, ROPE: tl.constexpr,
                   ROTARY_DIM: tl.constexpr, LAYOUT: tl.constexpr, FAST_TRIG: tl.constexpr,
                   DOT_PRECISION: tl.constexpr):
    """Scores [N] of the keys at element offsets ``key_offset`` [N] (from ``k_ptr``, one KV head
    ``stride_k_h`` after another): max over the KV heads, their GROUP query heads and NPQ pooled
    queries (rows of ``q_ptr``) of <q, key turned by ``delta``> (ROPE). Keys not ``key_ok``
    load as zeros; callers mask their scores. A rotate_half layout rotating a whole head of a
    power-of-two size of at least 32 (halves wide enough for a tensor-core product) is turned by
    halves (``_max_over_heads_by_halves``)."""
    if ROPE and LAYOUT == 1 and ROTARY_DIM == BLOCK_D and BLOCK_D >= 32:
        return _max_over_heads_by_halves(k_ptr, q_ptr, key_offset, key_ok, stride_k_h,
                                         stride_q_h, head_dim, delta, inv_freq_ptr, H_KV, GROUP,
                                         NPQ, QROWS, BLOCK_D, FAST_TRIG, DOT_PRECISION)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < head_dim
    rows = tl.arange(0, QROWS)
    row_ok = rows < GROUP * NPQ
    q_row_offsets = (rows // NPQ) * stride_q_h + (rows % NPQ) * head_dim
    if ROPE:
        # The KV heads' keys at a position share its rotation: one cos/sin for all of them.
        # Rotating the probes took ~1.4 of the ~1.5 ms of one decode query block's stage 0 at 1M
        # keys when each head computed its own (scripts/stage_rope_cost.py).
        partner, sign, rotated, cos, sin = row_rotation(delta, cols, inv_freq_ptr, ROTARY_DIM,
                                                        LAYOUT, FAST_TRIG)
    score = tl.zeros_like(delta).to(tl.float32) + float("-inf")
    k_head, q_head = k_ptr, q_ptr  # advanced per head: head offsets overflow int32 at 4M keys
    for _ in range(H_KV):
        # Keys stored narrower than the queries (FP8 host keys) are widened before any rotation.
        keys = load_rows(k_head, key_offset, key_ok, 1, cols, col_ok).to(q_ptr.dtype.element_ty)
        if ROPE:
            keys = turn_rows(keys, k_head, key_offset, key_ok, 1, col_ok, partner, sign, rotated,
                             cos, sin)
        queries = tl.load(q_head + q_row_offsets[:, None] + cols[None, :],
                          mask=row_ok[:, None] & col_ok[None, :], other=0.0)
        dots = tl.dot(keys, tl.trans(queries), input_precision=DOT_PRECISION)  # [N, QROWS]
        dots = tl.where(row_ok[None, :], dots, float("-inf"))
        score = tl.maximum(score, tl.max(dots, 1))
        k_head += stride_k_h
        q_head += GROUP * stride_q_h
    return score


@triton.jit
def _max_over_heads_by_halves(k_ptr, q_ptr, key_offset, key_ok, stride_k_h, stride_q_h,
                              head_dim, delta, inv_freq_ptr, H_KV: tl.constexpr,
                              GROUP: tl.constexpr, NPQ: tl.constexpr, QROWS: tl.constexpr,
                              BLOCK_D: tl.constexpr, FAST_TRIG: tl.constexpr,
                              DOT_PRECISION: tl.constexpr):
    """``max_over_heads`` with the rotation of a rotate_half layout over the whole head: each
    key is gathered as its two halves, which are each other's partners (``turn_halves``), and
    scored as the sum of the halves' products; one cos/sin [N, D / 2] for all KV heads."""
    HALF: tl.constexpr = BLOCK_D // 2
    half_cols = tl.arange(0, HALF)
    rows = tl.arange(0, QROWS)
    row_ok = rows < GROUP * NPQ
    q_rows = (rows // NPQ) * stride_q_h + (rows % NPQ) * head_dim
    cos, sin = rotation_cos_sin(delta, tl.load(inv_freq_ptr + half_cols).to(tl.float32),
                                FAST_TRIG)
    score = tl.zeros_like(delta).to(tl.float32) + float("-inf")
    k_head, q_head = k_ptr, q_ptr  # advanced per head: head offsets overflow int32 at 4M keys
    all_cols = half_cols < HALF  # every column is real here (head dim = BLOCK_D)
    for _ in range(H_KV):
        wide = q_ptr.dtype.element_ty  # FP8 host keys: widened before the rotation
        lo, hi = turn_halves(
            load_rows(k_head, key_offset, key_ok, 1, half_cols, all_cols).to(wide),
            load_rows(k_head, key_offset, key_ok, 1, half_cols + HALF, all_cols).to(wide),
            cos, sin)
        q_lo = tl.load(q_head + q_rows[:, None] + half_cols[None, :], mask=row_ok[:, None],
                       other=0.0)
        q_hi = tl.load(q_head + q_rows[:, None] + HALF + half_cols[None, :],
                       mask=row_ok[:, None], other=0.0)
        dots = tl.dot(lo, tl.trans(q_lo), input_precision=DOT_PRECISION)  # [N, QROWS]
        dots = tl.dot(hi, tl.trans(q_hi), dots, input_precision=DOT_PRECISION)
        dots = tl.where(row_ok[None, :], dots, float("-inf"))
        score = tl.maximum(score, tl.max(dots, 1))
        k_head += stride_k_h
        q_head += GROUP * stride_q_h
    return score
