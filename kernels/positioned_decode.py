"""Triton split-K decode kernel over a positioned selection plus the sliding window.

Spec: ``positioned_decode_ref.positioned_decode_ref`` (why: ``positioned_kv_ref``). The key list
of the query is the positioned slots (sinks and selected keys, already rotated, contiguous)
followed by the window keys, read in place; it is cut into NUM_SPLITS pieces, one program per
(split, KV head, sequence) walks its piece for the GROUP query heads of its KV head, and
``sparse_decode.merge_splits`` merges the partials. Unlike ``sparse_decode`` no key is rotated
and no block index is read before a key: each tile is one load of contiguous rows. The query
rows are turned once per program when the window has moved since the positioning.
Caution: nothing here synchronises with the host; a decode step can be captured in a CUDA graph.
Differences vs the reference: per-split softmax then a log-sum-exp merge; probabilities cast to
V's dtype per tile; the turned query is rounded to q's dtype.
"""

import torch
import triton
import triton.language as tl

from ihip_compile.kernels._primitives import (
    approximate_trig, decode_window, load_rows, load_rows_moved, online_softmax_update, soft_cap,
    jit_growing,
)
from ihip_compile.kernels.positioned_decode_ref import check_positioned_decode_inputs
from ihip_compile.kernels.positioned_kv_ref import PositionedKV
from ihip_compile.kernels.sparse_decode import (
    default_split_count, empty_softmax_state, merge_splits, split_partials, split_program,
    store_split_partial,
)


@triton.jit
def _slot_rows(fixed_base, cache_base, slot, win_key, is_fixed, is_win, stride_fixed,
               stride_cache, cols, col_ok):
    """Rows of a tile of slots: positioned slots from their buffer, window slots from the cache.
    The addresses follow from the slot numbers alone (no loaded index): the loads of a tile
    never wait for another load."""
    rows = tl.where(is_fixed, slot, win_key).to(tl.int64)[:, None]
    ptrs = tl.where(is_fixed[:, None], fixed_base + rows * stride_fixed,
                    cache_base + rows * stride_cache) + cols[None, :]
    return tl.load(ptrs, mask=(is_fixed | is_win)[:, None] & col_ok[None, :], other=0.0)


@jit_growing("s_k", "window")
def _positioned_split_kernel(
    q_ptr, k_ptr, v_ptr, pk_ptr, pv_ptr, keys_ptr, win_lo_ref_ptr, pos_ptr, inv_freq_ptr,
    acc_ptr, max_ptr, sum_ptr,
    s_k, n_fixed, sinks, sink_tokens, window, head_dim, scale, softcap, slots_per_split,
    stride_pos_b, stride_q_b, stride_q_h, stride_k_b, stride_k_h, stride_k_s, stride_v_b,
    stride_v_h, stride_v_s, stride_p_b, stride_p_h,
    GROUP: tl.constexpr, QROWS: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr, ROTARY_DIM: tl.constexpr,
    LAYOUT: tl.constexpr, FAST_TRIG: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    split, kv, b, heads, row_ok, cols, col_ok = split_program(head_dim, GROUP, QROWS, BLOCK_D)
    p = tl.load(pos_ptr + b * stride_pos_b).to(tl.int32)
    win_lo, win_len = decode_window(p, window, sink_tokens)
    turn = win_lo - tl.load(win_lo_ref_ptr + b)
    q_base = q_ptr + b * stride_q_b
    q = load_rows(q_base, heads, row_ok, stride_q_h, cols, col_ok)
    turns = tl.full((QROWS,), 0, tl.int32) - turn
    q_fixed = load_rows_moved(q_base, heads, row_ok, stride_q_h, cols, col_ok, turns,
                              inv_freq_ptr, True, ROTARY_DIM, LAYOUT, FAST_TRIG)
    k_base = k_ptr + b * stride_k_b + kv * stride_k_h
    v_base = v_ptr + b * stride_v_b + kv * stride_v_h
    pk_base = pk_ptr + b * stride_p_b + kv * stride_p_h
    pv_base = pv_ptr + b * stride_p_b + kv * stride_p_h
    win_from = tl.maximum(p - window + 1, sink_tokens)
    acc, running_max, running_sum = empty_softmax_state(QROWS, BLOCK_D)
    first = split * slots_per_split
    last = tl.minimum(first + slots_per_split, n_fixed + win_len)
    for start in range(first, last, BLOCK_N):
        slot = start + tl.arange(0, BLOCK_N)
        in_split = slot < last
        is_fixed = in_split & (slot < n_fixed)
        is_win = in_split & (slot >= n_fixed)
        win_key = win_lo + slot - n_fixed
        values = _slot_rows(pv_base, v_base, slot, win_key, is_fixed, is_win, head_dim,
                            stride_v_s, cols, col_ok)
        keys = _slot_rows(pk_base, k_base, slot, win_key, is_fixed, is_win, head_dim, stride_k_s,
                          cols, col_ok)
        fixed_key = tl.load(keys_ptr + b * n_fixed + slot, mask=is_fixed, other=-1)
        key = tl.where(is_fixed, fixed_key, win_key)
        scores = tl.dot(q_fixed, tl.trans(keys), input_precision=DOT_PRECISION)
        if turn != 0:  # the window keys meet the query as it is
            at_window = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION)
            scores = tl.where(is_fixed[None, :], scores, at_window)
        scores = soft_cap(scores * scale, SOFTCAP, softcap)
        fixed_vis = (key >= 0) & ((slot < sinks) | (key <= p - window))
        win_vis = (key >= win_from) & (key < s_k)
        vis = (key <= p) & ((is_fixed & fixed_vis) | (is_win & win_vis))
        scores = tl.where(vis[None, :], scores, float("-inf"))
        acc, running_max, running_sum = online_softmax_update(
            acc, running_max, running_sum, scores, values, DOT_PRECISION)
    store_split_partial(acc_ptr, max_ptr, sum_ptr, split, b, heads, row_ok, cols, acc,
                        running_max, running_sum, GROUP, NUM_SPLITS, BLOCK_D)


def positioned_decode(
    q, k, v, positioned: PositionedKV, q_positions=None, *, scale: float, sink_tokens: int,
    window_tokens: int, softcap: float = 0.0, inv_freq, rotary_dim: int, rope_layout: int,
    num_splits: int | None = None, tile_slots: int = 32,
):
    """Decode attention for one query token per sequence over ``positioned`` plus the window.

    q [B, H, 1, D]; k, v [B, H_KV, S_K, D] (the window is read from them); q_positions [B, 1] or
    [1] key index of the query (default S_K - 1). ``num_splits`` (default: one wave of programs)
    and ``tile_slots`` (keys per tile, a power of two >= 16) shape the launch. Returns
    [B, H, 1, D] in q's dtype.
    """
    check_positioned_decode_inputs(q, k, positioned, sink_tokens)
    b, h, _, d = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    if q_positions is None:
        q_positions = torch.full((b, 1), s_k - 1, device=q.device, dtype=torch.int32)
    pos = q_positions.reshape(-1, 1).expand(b, 1)
    n_fixed = positioned.keys.shape[1]
    if tile_slots < 16 or tile_slots & (tile_slots - 1):
        raise ValueError(f"tile_slots must be a power of two >= 16, got {tile_slots}")
    block_n = tile_slots
    max_slots = n_fixed + max(window_tokens, 0)
    num_splits = num_splits or default_split_count(max_slots, b * h_kv, block_n)
    slots_per_split = triton.cdiv(triton.cdiv(max_slots, num_splits), block_n) * block_n
    block_d = max(16, triton.next_power_of_2(d))
    acc, maxes, sums = split_partials(b, h, num_splits, block_d, q.device)
    k = k if k.stride(-1) == 1 else k.contiguous()
    v = v if v.stride(-1) == 1 else v.contiguous()
    q = q if q.stride(-1) == 1 else q.contiguous()
    pk, pv = positioned.k, positioned.v
    _positioned_split_kernel[(num_splits, h_kv, b)](
        q, k, v, pk, pv, positioned.keys, positioned.win_lo, pos, inv_freq.float().contiguous(),
        acc, maxes, sums, s_k, n_fixed, positioned.sinks, sink_tokens, window_tokens, d, scale,
        softcap, slots_per_split, pos.stride(0), q.stride(0), q.stride(1), k.stride(0),
        k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2), pk.stride(0),
        pk.stride(1),
        GROUP=h // h_kv, QROWS=max(16, triton.next_power_of_2(h // h_kv)), NUM_SPLITS=num_splits,
        BLOCK_N=block_n, BLOCK_D=block_d, SOFTCAP=softcap > 0, ROTARY_DIM=max(rotary_dim, 2),
        LAYOUT=rope_layout, FAST_TRIG=approximate_trig(q),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
    )
    return merge_splits(acc, maxes, sums, torch.empty_like(q))
