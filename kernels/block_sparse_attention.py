"""Triton prefill kernel of block-sparse attention (InfiniteHiP section 3, final step).

Spec: ``block_sparse_attention_ref`` (same arguments). One program per (query block, HEADS query
heads of one KV head): the query block's key list (sinks, selected 8-key blocks, sliding window)
is walked in tiles of BLOCK_N slots; keys and values are gathered by index (GQA: head h reads KV
head h // GROUP, K/V never expanded), keys optionally re-positioned by RoPE delta rotation
(StreamingLLM renumbering), scores folded into an online softmax. The program's rows are
(head, query) pairs: with HEADS > 1 each gathered and re-positioned key tile serves several
heads, instead of being gathered and rotated again by each head's program.

Changes vs hip-attention: one walk over a unified slot list instead of separate sink/window/sparse
passes; the window is per query block and masked per query, so the three key sets are disjoint.
Caution: the window length per block is read on the device, so spread-out q_positions inside one
block (not consecutive) make that block's walk longer, never wrong.
Differences vs the reference: probabilities are cast to V's dtype tile by tile (flash-style
rescaling), the reference casts once after an exact softmax.
"""

import math

import torch
import triton
import triton.language as tl

from ihip_compile.kernels._primitives import (
    approximate_trig, fold_slot_tile, fold_slot_tile_halves, jit_growing,
)
from ihip_compile.kernels.rope_delta_ref import ROPE_ROTATE_HALF
from ihip_compile.kernels.block_sparse_attention_ref import attention_block_plan
from ihip_compile.kernels.block_selection import query_blocks

# Query heads per program by default (at most; a power of two, reduced to divide the GQA group)
# and the warps of such programs. H200, 32k-query chunk over 1M keys, Llama-3.1-8B heads, RoPE
# re-positioning (scripts/sparse_attention_costs.py): 1 head 23.1 ms; 2 heads 19.1 ms (8 warps;
# 33.5 with 4); 4 heads 16.2 ms (8 warps, 32-key tiles; 17.1 with 16-key tiles). Fewer heads
# where a program's rows x head dim would pass that measured launch's (4 x 64 rows x 128).
SHARED_HEADS = 4
WARPS_SHARED = 8
_SHARED_ROW_ELEMENTS = SHARED_HEADS * 64 * 128


def default_heads_per_program(group: int, block_q: int, head_dim: int) -> int:
    """Query heads per prefill program: a power of two dividing the GQA group, within the
    measured register budget."""
    rows_fit = _SHARED_ROW_ELEMENTS // (max(16, block_q) * max(16, triton.next_power_of_2(head_dim)))
    return math.gcd(group, SHARED_HEADS, max(1, rows_fit))


@jit_growing("s_k")
def _block_sparse_attention_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, blocks_ptr, win_lo_ptr, win_len_ptr, n_valid_ptr,
    inv_freq_ptr, out_ptr,
    s_q, s_k, block_q, n_blocks, topk, sink, window, head_dim, scale, softcap,
    stride_q_b, stride_q_h, stride_q_s, stride_k_b, stride_k_h, stride_k_s,
    stride_v_b, stride_v_h, stride_v_s, stride_o_b, stride_o_h, stride_o_s,
    GROUP: tl.constexpr, HEADS: tl.constexpr, BLOCK_Q: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr, REMAP: tl.constexpr,
    ROTARY_DIM: tl.constexpr, LAYOUT: tl.constexpr, FAST_TRIG: tl.constexpr,
    DOT_PRECISION: tl.constexpr, HALVES: tl.constexpr,
):
    # int64: one KV head of a 4M-key cache is 2^29 elements, head offsets overflow int32.
    blk = tl.program_id(0)
    first_head, b = tl.program_id(1).to(tl.int64) * HEADS, tl.program_id(2).to(tl.int64)
    pair = tl.arange(0, HEADS * BLOCK_Q)  # row r: head first_head + r // BLOCK_Q, query r % BLOCK_Q
    heads = first_head + pair // BLOCK_Q
    rows = blk * block_q + pair % BLOCK_Q
    row_ok = (pair % BLOCK_Q < block_q) & (rows < s_q)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < head_dim
    pos = tl.load(pos_ptr + b * s_q + rows, mask=row_ok, other=-1)
    q_rows = q_ptr + b * stride_q_b + (heads * stride_q_h + rows.to(tl.int64) * stride_q_s)
    plan = b * n_blocks + blk
    win_lo, win_len = tl.load(win_lo_ptr + plan), tl.load(win_len_ptr + plan)
    n_valid = tl.load(n_valid_ptr + plan)
    kv = first_head // GROUP
    k_base = k_ptr + b * stride_k_b + kv * stride_k_h
    v_base = v_ptr + b * stride_v_b + kv * stride_v_h
    blocks_row = blocks_ptr + plan * topk
    acc = tl.zeros((HEADS * BLOCK_Q, BLOCK_D), tl.float32)
    running_max = tl.full((HEADS * BLOCK_Q,), float("-inf"), tl.float32)
    running_sum = tl.zeros((HEADS * BLOCK_Q,), tl.float32)
    total = sink + topk * BLOCK_K + win_len
    if HALVES:  # renumbering a rotate_half layout that rotates every column
        half = head_dim // 2
        half_cols = tl.arange(0, BLOCK_D // 2)
        half_ok = half_cols < half
        q_lo = tl.load(q_rows[:, None] + half_cols[None, :],
                       mask=row_ok[:, None] & half_ok[None, :], other=0.0)
        q_hi = tl.load(q_rows[:, None] + half + half_cols[None, :],
                       mask=row_ok[:, None] & half_ok[None, :], other=0.0)
        for start in range(0, total, BLOCK_N):
            slot = start + tl.arange(0, BLOCK_N)
            acc, running_max, running_sum = fold_slot_tile_halves(
                q_lo, q_hi, acc, running_max, running_sum, slot, slot >= 0, pos, blocks_row,
                topk, sink, window, win_lo, win_len, n_valid, s_k, k_base, v_base, stride_k_s,
                stride_v_s, cols, col_ok, half_cols, half_ok, half, inv_freq_ptr, scale,
                softcap, BLOCK_K, SOFTCAP, FAST_TRIG, DOT_PRECISION)
    else:
        q = tl.load(q_rows[:, None] + cols[None, :], mask=row_ok[:, None] & col_ok[None, :],
                    other=0.0)
        for start in range(0, total, BLOCK_N):
            slot = start + tl.arange(0, BLOCK_N)
            acc, running_max, running_sum = fold_slot_tile(
                q, acc, running_max, running_sum, slot, slot >= 0, pos, blocks_row, topk, sink,
                window, win_lo, win_len, n_valid, s_k, k_base, v_base, stride_k_s, stride_v_s,
                cols, col_ok, inv_freq_ptr, scale, softcap, blocks_row, 0, BLOCK_K, SOFTCAP,
                REMAP, ROTARY_DIM, LAYOUT, FAST_TRIG, DOT_PRECISION)
    out = acc / tl.where(running_sum > 0, running_sum, 1.0)[:, None]
    o_ptrs = (out_ptr + b * stride_o_b
              + (heads * stride_o_h + rows.to(tl.int64) * stride_o_s)[:, None] + cols[None, :])
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def block_sparse_attention(
    q, k, v, q_positions, block_indices, *, scale: float, block_size_q: int, sink_tokens: int,
    window_tokens: int, block_size_k: int = 8, softcap: float = 0.0, remap: bool = False,
    inv_freq=None, rotary_dim: int = 0, rope_layout: int = 0, tile_slots: int | None = None,
    num_warps: int | None = None, heads_per_program: int | None = None,
    split_halves: bool = True,
):
    """Triton twin of ``block_sparse_attention_ref``: q [B, H, S_Q, D], k/v [B, H_KV, S_K, D],
    q_positions [B, S_Q], block_indices [B, NQB, TOPK] int32 (NQB from ``query_blocks``).
    ``tile_slots`` (keys per tile; default 32 re-positioning, else 64), ``num_warps`` and
    ``heads_per_program`` (query heads of one KV head sharing each key tile; a power of two
    dividing H / H_KV) tune the launch, not the result; so does ``split_halves`` (renumbering
    a rotate_half layout that rotates every column by halves, ``rotates_by_halves``)."""
    b, h, s_q, d = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    pos = q_positions.expand(b, s_q).to(torch.int32).contiguous()
    block_q, pos_min, pos_max = query_blocks(pos, b, s_q, block_size_q)
    if heads_per_program is None:
        heads_per_program = default_heads_per_program(h // h_kv, block_q, d)
    if num_warps is None:
        num_warps = 4 if heads_per_program == 1 else WARPS_SHARED
    if heads_per_program & (heads_per_program - 1) or heads_per_program < 1 \
            or (h // h_kv) % heads_per_program:
        raise ValueError(f"heads_per_program must be a power of two dividing the {h // h_kv} query "
                         f"heads per KV head, got {heads_per_program}")
    nqb, topk = block_indices.shape[1], block_indices.shape[2]
    if block_indices.shape[0] != b or nqb != -(-s_q // block_q):
        raise ValueError(f"block_indices must be [B={b}, NQB={-(-s_q // block_q)}, TOPK], "
                         f"got {tuple(block_indices.shape)}")
    win_lo, win_len, n_valid = attention_block_plan(pos_min, pos_max, block_indices,
                                                     sink_tokens, window_tokens)
    rope = remap and rope_layout != 0
    if tile_slots is None:
        # Re-positioned 64-key tiles spill registers: 32-key tiles ran 3.5x faster at 1M keys on
        # an H200 (scripts/sparse_attention_costs.py); unrotated, 64 keys a tile.
        tile_slots = 32 if rope else 64
    out = torch.empty_like(q)
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    grid = (nqb, h // heads_per_program, b)
    _block_sparse_attention_kernel[grid](
        q, k, v, pos, block_indices.to(torch.int32).contiguous(), win_lo.contiguous(),
        win_len.contiguous(), n_valid.contiguous(),
        inv_freq.float().contiguous() if rope else win_lo, out,
        s_q, s_k, block_q, nqb, topk, min(sink_tokens, s_k), window_tokens, d, scale, softcap,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        v.stride(0), v.stride(1), v.stride(2), out.stride(0), out.stride(1), out.stride(2),
        GROUP=h // h_kv, HEADS=heads_per_program, BLOCK_Q=max(16, block_q), BLOCK_N=tile_slots,
        BLOCK_K=block_size_k,
        BLOCK_D=max(16, triton.next_power_of_2(d)), SOFTCAP=softcap > 0, REMAP=rope,
        ROTARY_DIM=max(rotary_dim, 2), LAYOUT=rope_layout if rope else 1,
        FAST_TRIG=rope and approximate_trig(k),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32", num_warps=num_warps,
        HALVES=split_halves and rope and rotates_by_halves(rope_layout, rotary_dim, d),
    )
    return out


def rotates_by_halves(rope_layout: int, rotary_dim: int, head_dim: int) -> bool:
    """Whether renumbered keys can be turned as two halves that are each other's partners:
    rotate_half (Llama, Qwen, Mistral, Gemma) over the whole head (no partial rotary), with
    halves wide enough for a tensor-core product (16 columns)."""
    return (rope_layout == ROPE_ROTATE_HALF and rotary_dim == head_dim and head_dim % 2 == 0
            and triton.next_power_of_2(head_dim) >= 32)
