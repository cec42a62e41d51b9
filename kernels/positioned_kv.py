"""Triton kernel that gathers and re-positions a decode selection's sinks and selected keys.

Spec: ``positioned_kv_ref.position_selected_kv_ref`` (why: its docstring). One program per tile of
32 slots, KV head and sequence: it derives the block plan from the query position and the block
row (as ``sparse_decode`` does), gathers K rotated by each slot's renumbering delta and V, and
writes them in slot order; the programs of KV head 0 also write the key index of each slot, and
the first of them the window start. One launch per refresh of the selection; nothing here
synchronises with the host.
"""

import torch
import triton
import triton.language as tl

from ihip_compile.kernels._primitives import (
    approximate_trig, attended_slots, count_valid_blocks, decode_window, load_rows,
    load_rows_moved, jit_growing,
)
from ihip_compile.kernels.positioned_kv_ref import PositionedKV, check_positioning_inputs


@triton.jit
def _store_rows(base_ptr, rows, row_ok, stride_row, cols, col_ok, x):
    ptrs = base_ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
    tl.store(ptrs, x, mask=row_ok[:, None] & col_ok[None, :])


@jit_growing("s_k", "window")
def _position_kernel(
    k_ptr, v_ptr, pos_ptr, blocks_ptr, inv_freq_ptr, out_k_ptr, out_v_ptr, keys_ptr, win_lo_ptr,
    s_k, topk, sink, sink_tokens, window, head_dim, n_slots,
    stride_pos_b, stride_k_b, stride_k_h, stride_k_s, stride_v_b, stride_v_h, stride_v_s,
    stride_o_b, stride_o_h,
    BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    ROTARY_DIM: tl.constexpr, LAYOUT: tl.constexpr, FAST_TRIG: tl.constexpr,
):
    tile = tl.program_id(0)
    kv, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    col_ok = cols < head_dim
    p = tl.load(pos_ptr + b * stride_pos_b).to(tl.int32)
    blocks_row = blocks_ptr + b * topk
    win_lo, _ = decode_window(p, window, sink_tokens)
    n_valid = count_valid_blocks(blocks_row, topk, BLOCK_T)
    slot = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    in_range = slot < n_slots
    key, ok, is_sel, _, delta = attended_slots(slot, blocks_row, topk, sink, win_lo, 0, n_valid,
                                               s_k, BLOCK_K)
    # A selected key among the sinks is never shown (block_sparse_attention_ref's rules).
    ok = ok & in_range & (~is_sel | (key >= sink_tokens))
    k_base = k_ptr + b * stride_k_b + kv * stride_k_h
    v_base = v_ptr + b * stride_v_b + kv * stride_v_h
    keys = load_rows_moved(k_base, key, ok, stride_k_s, cols, col_ok, delta, inv_freq_ptr, True,
                           ROTARY_DIM, LAYOUT, FAST_TRIG)
    values = load_rows(v_base, key, ok, stride_v_s, cols, col_ok)
    out = b * stride_o_b + kv * stride_o_h
    _store_rows(out_k_ptr + out, slot, in_range, head_dim, cols, col_ok, keys)
    _store_rows(out_v_ptr + out, slot, in_range, head_dim, cols, col_ok, values)
    if kv == 0:
        tl.store(keys_ptr + b * n_slots + slot, tl.where(ok, key, -1), mask=in_range)
        if tile == 0:
            tl.store(win_lo_ptr + b, win_lo)


def position_selected_kv(
    k, v, block_indices, q_positions, *, sink_tokens: int, window_tokens: int,
    block_size_k: int = 8, inv_freq, rotary_dim: int, rope_layout: int,
) -> PositionedKV:
    """``position_selected_kv_ref`` on the GPU: block_indices [B, 1, TOPK] int32 (sorted, -1
    last), q_positions [B, 1] or [1] integer."""
    check_positioning_inputs(k, v, block_indices, q_positions)
    b, h_kv, s_k, d = k.shape
    topk = block_indices.shape[2]
    sink = min(sink_tokens, s_k)
    n_slots = sink + topk * block_size_k
    out_k = torch.empty((b, h_kv, n_slots, d), device=k.device, dtype=k.dtype)
    out_v = torch.empty_like(out_k)
    keys = torch.empty((b, n_slots), device=k.device, dtype=torch.int32)
    win_lo = torch.empty((b,), device=k.device, dtype=torch.int32)
    pos = q_positions.reshape(-1, 1).expand(b, 1)
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    block_n = 32
    _position_kernel[(triton.cdiv(n_slots, block_n), h_kv, b)](
        k, v, pos, block_indices.to(torch.int32).contiguous(), inv_freq.float().contiguous(),
        out_k, out_v, keys, win_lo, s_k, topk, sink, sink_tokens, window_tokens, d, n_slots,
        pos.stride(0), k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1),
        v.stride(2), out_k.stride(0), out_k.stride(1),
        BLOCK_N=block_n, BLOCK_T=min(128, max(16, triton.next_power_of_2(topk))),
        BLOCK_K=block_size_k, BLOCK_D=max(16, triton.next_power_of_2(d)),
        ROTARY_DIM=max(rotary_dim, 2), LAYOUT=rope_layout, FAST_TRIG=approximate_trig(k),
    )
    return PositionedKV(out_k, out_v, keys, win_lo, sink)
