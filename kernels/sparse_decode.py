"""Triton split-K decode kernel of block-sparse attention (one query token per sequence).

Spec: ``sparse_decode_ref.sparse_decode_ref`` (block-sparse attention with S_Q == 1). The key
list of the query (sinks, selected 8-key blocks, sliding window; ~3.3k keys at the defaults) is
cut into NUM_SPLITS contiguous pieces; one program per (split, KV head, batch) walks its piece
for all GROUP query heads of that KV head at once (each K/V tile is read once for the group),
and writes a partial (acc, max, sum). A second small kernel merges the splits.

A cached decode step is latency-bound (~13 MB of K/V at 1M keys, microseconds at HBM speed), so
the step is exactly these two launches: each split program derives the block plan
(``attention_block_plan``: window start and length, count of valid blocks) itself from the query
position and the raw block-index row, and reads q_positions in its own dtype and strides; no
torch op runs between them when block_indices is int32 and inv_freq fp32 (what the callers pass).

Changes vs hip-attention: GQA handled by putting the group's query heads on the rows of one
tensor-core product (rows padded to 16) rather than one program per query head.
Caution: ``block_indices``, ``q_positions`` and the plan are read on the device: nothing here
synchronises with the host, so a decode step can be captured in a CUDA graph.
Differences vs the reference: per-split softmax then a log-sum-exp merge (same math, other
rounding); probabilities cast to V's dtype per tile.
"""

import torch
import triton
import triton.language as tl

from ihip_compile.kernels._primitives import (
    approximate_trig, count_valid_blocks, decode_window, fold_slot_tile, load_rows, jit_growing,
)
from ihip_compile.kernels.bank_kv import decode_addressing


@triton.jit
def split_program(head_dim, GROUP: tl.constexpr, QROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Who a split-K decode program is: its split, KV head and sequence (int64: one KV head of a
    4M-key cache is 2^29 elements, head offsets overflow int32), its query heads (GROUP real
    rows of QROWS) and the columns."""
    split = tl.program_id(0)
    kv, b = tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    rows = tl.arange(0, QROWS)
    cols = tl.arange(0, BLOCK_D)
    return split, kv, b, kv * GROUP + rows, rows < GROUP, cols, cols < head_dim


@triton.jit
def empty_softmax_state(QROWS: tl.constexpr, BLOCK_D: tl.constexpr):
    """Online-softmax state before any key: output, running max and running sum (fp32)."""
    return (tl.zeros((QROWS, BLOCK_D), tl.float32), tl.full((QROWS,), float("-inf"), tl.float32),
            tl.zeros((QROWS,), tl.float32))


@triton.jit
def store_split_partial(acc_ptr, max_ptr, sum_ptr, split, b, heads, row_ok, cols, acc,
                        running_max, running_sum, GROUP: tl.constexpr,
                        NUM_SPLITS: tl.constexpr, BLOCK_D: tl.constexpr):
    """A program's partial at its place in ``split_partials`` ([B, H, NUM_SPLITS] order)."""
    part = (b * tl.num_programs(1) * GROUP + heads) * NUM_SPLITS + split
    tl.store(acc_ptr + part[:, None] * BLOCK_D + cols[None, :], acc, mask=row_ok[:, None])
    tl.store(max_ptr + part, running_max, mask=row_ok)
    tl.store(sum_ptr + part, running_sum, mask=row_ok)


@jit_growing("s_k", "window")
def _sparse_decode_split_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, blocks_ptr, inv_freq_ptr, acc_ptr, max_ptr, sum_ptr,
    page_table_ptr, window_start_ptr, s_k, topk, sink, sink_tokens, window, head_dim, scale,
    softcap,
    slots_per_split, blocks_per_row, fold, rows_per_page,
    stride_pos_b, stride_q_b, stride_q_h, stride_k_b, stride_k_h, stride_k_s, stride_v_b,
    stride_v_h, stride_v_s,
    GROUP: tl.constexpr, QROWS: tl.constexpr, NUM_SPLITS: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, SOFTCAP: tl.constexpr, REMAP: tl.constexpr,
    ROTARY_DIM: tl.constexpr, LAYOUT: tl.constexpr, FAST_TRIG: tl.constexpr,
    DOT_PRECISION: tl.constexpr, PAGE_TOKENS: tl.constexpr, PAGED: tl.constexpr,
    WINDOW_START: tl.constexpr,
):
    split, kv, b, heads, row_ok, cols, col_ok = split_program(head_dim, GROUP, QROWS, BLOCK_D)
    q = load_rows(q_ptr + b * stride_q_b, heads, row_ok, stride_q_h, cols, col_ok)
    p = tl.load(pos_ptr + b * stride_pos_b).to(tl.int32)
    if WINDOW_START:  # the query is the newest key; its window starts at a key read here
        window = p + 1 - tl.load(window_start_ptr).to(tl.int32)
        s_k = p + 1
    pos = tl.full((QROWS,), 0, tl.int32) + p
    blocks_row = blocks_ptr + b * topk
    win_lo, win_len = decode_window(p, window, sink_tokens)
    n_valid = count_valid_blocks(blocks_row, topk, BLOCK_T)
    if PAGED:  # sequence b is heads (b % fold) of batch row b // fold (``bank_kv``)
        sequence, page_table_row = b % fold, page_table_ptr + (b // fold) * blocks_per_row
    else:
        sequence, page_table_row = b, page_table_ptr
    k_base = k_ptr + sequence * stride_k_b + kv * stride_k_h
    v_base = v_ptr + sequence * stride_v_b + kv * stride_v_h
    acc, running_max, running_sum = empty_softmax_state(QROWS, BLOCK_D)
    total = sink + topk * BLOCK_K + win_len
    first = split * slots_per_split
    last = tl.minimum(first + slots_per_split, total)
    for start in range(first, last, BLOCK_N):
        slot = start + tl.arange(0, BLOCK_N)
        acc, running_max, running_sum = fold_slot_tile(
            q, acc, running_max, running_sum, slot, slot < last, pos, blocks_row, topk, sink,
            window, win_lo, win_len, n_valid, s_k, k_base, v_base, stride_k_s, stride_v_s, cols,
            col_ok, inv_freq_ptr, scale, softcap, page_table_row, rows_per_page, BLOCK_K,
            SOFTCAP, REMAP, ROTARY_DIM, LAYOUT, FAST_TRIG, DOT_PRECISION, PAGE_TOKENS, PAGED)
    store_split_partial(acc_ptr, max_ptr, sum_ptr, split, b, heads, row_ok, cols, acc,
                        running_max, running_sum, GROUP, NUM_SPLITS, BLOCK_D)


@triton.jit
def _merge_splits_kernel(acc_ptr, max_ptr, sum_ptr, out_ptr, head_dim, stride_o_b, stride_o_h,
                         n_heads, NUM_SPLITS: tl.constexpr, SPLITS_P2: tl.constexpr,
                         BLOCK_D: tl.constexpr):
    h, b = tl.program_id(0), tl.program_id(1)
    splits = tl.arange(0, SPLITS_P2)
    split_ok = splits < NUM_SPLITS
    cols = tl.arange(0, BLOCK_D)
    base = (b * n_heads + h) * NUM_SPLITS
    maxes = tl.load(max_ptr + base + splits, mask=split_ok, other=float("-inf"))
    sums = tl.load(sum_ptr + base + splits, mask=split_ok, other=0.0)
    accs = tl.load(acc_ptr + (base + splits)[:, None] * BLOCK_D + cols[None, :],
                   mask=split_ok[:, None], other=0.0)
    top = tl.max(maxes, 0)
    top = tl.where(top == float("-inf"), 0.0, top)
    weight = tl.exp(maxes - top)
    total = tl.sum(sums * weight, 0)
    out = tl.sum(accs * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + b * stride_o_b + h * stride_o_h + cols, out.to(out_ptr.dtype.element_ty),
             mask=cols < head_dim)


def default_split_count(max_slots: int, programs_per_split: int, block_n: int) -> int:
    """Splits of a decode step's key list: one wave of programs. A split kernel takes ~255
    registers per thread, so ~2 programs of 4 warps fit an SM (264 on an H200); at most 64
    splits (the merge holds [splits, D] partials)."""
    return max(1, min(triton.cdiv(max_slots, block_n), 264 // max(programs_per_split, 1), 64))


def split_partials(b: int, h: int, num_splits: int, block_d: int, device):
    """Per split and query head: the unnormalised output, the running max and the sum (fp32)."""
    acc = torch.empty((b, h, num_splits, block_d), device=device, dtype=torch.float32)
    maxes = torch.empty((b, h, num_splits), device=device, dtype=torch.float32)
    return acc, maxes, torch.empty_like(maxes)


def merge_splits(acc, maxes, sums, out):
    """Log-sum-exp merge of ``split_partials`` into ``out`` [B, H, 1, D]; returns ``out``."""
    b, h, num_splits, block_d = acc.shape
    _merge_splits_kernel[(h, b)](
        acc, maxes, sums, out, out.shape[-1], out.stride(0), out.stride(1), h,
        NUM_SPLITS=num_splits, SPLITS_P2=triton.next_power_of_2(num_splits), BLOCK_D=block_d,
    )
    return out


def sparse_decode(
    q, k, v, block_indices, q_positions=None, *, scale: float, sink_tokens: int,
    window_tokens: int, block_size_k: int = 8, softcap: float = 0.0, remap: bool = False,
    inv_freq=None, rotary_dim: int = 0, rope_layout: int = 0, num_splits: int | None = None,
    window_start: torch.Tensor | None = None, max_window_tokens: int = 0,
):
    """Decode attention for one query token per sequence.

    q [B, H, 1, D]; k, v [B, H_KV, S_K, D], or both ``bank_kv.BankKV`` (read in the bank's
    slots, which may store float8_e4m3fn: widened to q's dtype as read); block_indices
    [B, 1, TOPK] int32 (sorted, -1 last); q_positions [B, 1] or [1] key index of the query
    (default: the last key, S_K - 1). Returns [B, H, 1, D] in q's dtype.

    ``window_start`` (an integer tensor [1] on the device): the window is keys [window_start,
    p] of each query p, which must be the newest key (S_K = p + 1), instead of the last
    ``window_tokens``. Read on the device, so one launch serves every step of a cached decode
    (``decode_step_graph``). ``max_window_tokens``: the widest window the calls that should
    split their key lists alike will have (the splits are sized for the wider of it and
    ``window_tokens``); it changes no result beyond rounding.
    """
    b, h, s_q, d = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    if s_q != 1:
        raise ValueError(f"sparse_decode takes one query token (S_Q == 1), got S_Q={s_q}")
    if block_indices.dim() != 3 or tuple(block_indices.shape[:2]) != (b, 1):
        raise ValueError(f"block_indices must be [B={b}, 1, TOPK], got {tuple(block_indices.shape)}")
    if q_positions is None:
        q_positions = torch.full((b, 1), s_k - 1, device=q.device, dtype=torch.int32)
    if q_positions.numel() not in (1, b) or q_positions.is_floating_point():
        raise ValueError(f"q_positions must be an integer [B={b}, 1] or [1] tensor, got "
                         f"{q_positions.dtype} {tuple(q_positions.shape)}")
    pos = q_positions.reshape(-1, 1).expand(b, 1)  # read in place (stride 0 when shared)
    topk = block_indices.shape[2]
    sink = min(sink_tokens, s_k)
    max_slots = sink + topk * block_size_k + max(window_tokens, max_window_tokens, 0)
    # 32-slot tiles: with RoPE re-positioning, 64-slot tiles made ptxas (sm_90, 4 warps, D=128)
    # spill ~3.6 KB per thread per tile; 32-slot tiles spill ~0.6 KB.
    block_n = 32
    num_splits = num_splits or default_split_count(max_slots, b * h_kv, block_n)
    slots_per_split = triton.cdiv(triton.cdiv(max_slots, num_splits), block_n) * block_n
    block_d = max(16, triton.next_power_of_2(d))
    acc, maxes, sums = split_partials(b, h, num_splits, block_d, q.device)
    rope = remap and rope_layout != 0
    k_mem, v_mem, paging = decode_addressing(k, v)
    q = q if q.stride(-1) == 1 else q.contiguous()
    group = h // h_kv
    _sparse_decode_split_kernel[(num_splits, h_kv, b)](
        q, k_mem, v_mem, pos, block_indices.to(torch.int32).contiguous(),
        inv_freq.float().contiguous() if rope else maxes, acc, maxes, sums, paging["table"],
        pos if window_start is None else window_start, s_k, topk, sink, sink_tokens,
        window_tokens, d, scale, softcap, slots_per_split,
        paging["blocks_per_row"], paging["fold"], paging["rows_per_page"],
        pos.stride(0), q.stride(0), q.stride(1), *paging["strides_k"], *paging["strides_v"],
        GROUP=group, QROWS=max(16, triton.next_power_of_2(group)), NUM_SPLITS=num_splits,
        BLOCK_N=block_n, BLOCK_T=min(128, max(16, triton.next_power_of_2(topk))),
        BLOCK_K=block_size_k, BLOCK_D=block_d, SOFTCAP=softcap > 0,
        REMAP=rope, ROTARY_DIM=max(rotary_dim, 2), LAYOUT=rope_layout if rope else 1,
        FAST_TRIG=rope and approximate_trig(q),
        DOT_PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        PAGE_TOKENS=paging["PAGE_TOKENS"], PAGED=paging["PAGED"],
        WINDOW_START=window_start is not None,
    )
    return merge_splits(acc, maxes, sums, torch.empty_like(q))
