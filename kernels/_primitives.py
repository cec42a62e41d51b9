"""Small ``@triton.jit`` helpers shared by the kernels: RoPE re-positioning, gathered row loads,
soft-capping and the online-softmax update.

``load_rows_moved`` (``row_rotation`` + ``turn_rows``) follows ``rope_delta_ref.rotate_by_delta``
(its torch reference and spec): rows already rotated at their true positions are turned by
``delta`` more positions, in fp32.
"""

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


def jit_growing(*names: str):
    """``triton.jit`` for a kernel whose int arguments ``names`` are lengths or positions that
    move as a sequence grows. Triton specialises int arguments on being 1 or a multiple of 16
    and compiles a variant for each combination the first time it comes; a kernel that runs
    only at decode refreshes, whose lengths advance by 8 to 32 between calls, can meet a new
    combination hundreds of steps in: a compile in the middle of a generation. These are not
    specialised on (they bound loops and masks, not vectorised addresses)."""
    return triton.jit(do_not_specialize=list(names))


@triton.jit
def rope_pairing(cols, ROTARY_DIM: tl.constexpr, LAYOUT: tl.constexpr):
    """Per column: partner column, sign, frequency index, and whether the column rotates."""
    HALF: tl.constexpr = ROTARY_DIM // 2
    if LAYOUT == 1:  # rotate_half: pairs (c, c + R/2)
        first = cols < HALF
        partner = tl.where(first, cols + HALF, cols - HALF)
        freq_index = cols % HALF
    else:  # interleaved: pairs (2i, 2i + 1)
        first = cols % 2 == 0
        partner = tl.where(first, cols + 1, cols - 1)
        freq_index = cols // 2
    rotated = cols < ROTARY_DIM
    partner = tl.where(rotated, partner, cols)
    sign = tl.where(first, -1.0, 1.0)
    freq_index = tl.minimum(freq_index, HALF - 1)
    return partner, sign, freq_index, rotated


# 2*pi as three fp32 parts (Cody-Waite): 8 and 12 significant bits, then the rest. The multiple
# k is split into k_hi (a multiple of 2**10) and k_lo (|k_lo| <= 512), so every product of a k part
# with one of the first two parts is exact in fp32 and so are the subtractions, with or without
# fused multiply-adds (the Triton interpreter has none) for |angle| < 2**25 rad.
_TWO_PI_1 = tl.constexpr(6.28125)
_TWO_PI_2 = tl.constexpr(0.0019350051879882812)
_TWO_PI_3 = tl.constexpr(3.019916050561733e-07)
_INV_TWO_PI = tl.constexpr(0.15915494309189535)
_K_SPLIT = tl.constexpr(1024.0)


@triton.jit
def reduce_angle(angle):
    """``angle`` (fp32 radians) minus the nearest multiple of 2*pi: the same cos and sin within
    ~1.5e-7 for |angle| < 2**25 (RoPE distances up to 33M tokens), and a result within +-4 rad.

    Why: RoPE angles of re-positioned keys reach delta * inv_freq ~ 1e6 rad at 1M tokens, where
    the GPU's precise cos/sin fall into a slow range reduction (a loop through local memory, per
    element); reduced here first, they take the short polynomial path.
    """
    k = tl.floor(angle * _INV_TWO_PI + 0.5)
    k_hi = tl.floor(k / _K_SPLIT + 0.5) * _K_SPLIT
    k_lo = k - k_hi
    r = angle - k_hi * _TWO_PI_1 - k_lo * _TWO_PI_1
    r = r - k_hi * _TWO_PI_2 - k_lo * _TWO_PI_2
    return r - k * _TWO_PI_3


def approximate_trig(x: torch.Tensor) -> bool:
    """Whether kernels rotating ``x`` take the GPU's approximate cos/sin (``FAST_TRIG``).

    Yes for 16-bit data on the GPU: on reduced angles their absolute error (~1e-6) is far below
    a bf16/fp16 element's rounding (~4e-3 / ~5e-4 relative), and the precise ones made the
    prefill attention kernel 3x slower (68 vs 23 ms for a 32k chunk at 1M keys on an H200, of
    which 12 ms without any rotation; scripts/sparse_attention_costs.py).
    fp32 data keeps the precise ones; the Triton interpreter has only those.
    """
    return (x.is_cuda and x.dtype in (torch.bfloat16, torch.float16)
            and not triton.knobs.runtime.interpret)


@triton.jit
def rotation_cos_sin(delta, freq, FAST_TRIG: tl.constexpr):
    """delta [N] positions, freq [D] -> cos and sin [N, D] (fp32) of the rotation by delta."""
    angle = reduce_angle(delta.to(tl.float32)[:, None] * freq[None, :])
    if FAST_TRIG:
        return libdevice.fast_cosf(angle), libdevice.fast_sinf(angle)
    return tl.cos(angle), tl.sin(angle)


@triton.jit
def apply_rotation(x, x_partner, cos, sin, sign, rotated):
    """x, x_partner [N, D] fp32 turned by ``rotation_cos_sin``; sign, rotated [D] -> [N, D]."""
    turned = x * cos + sign[None, :] * x_partner * sin
    return tl.where(rotated[None, :], turned, x)


@triton.jit
def load_rows(base_ptr, rows, row_ok, stride_row, cols, col_ok):
    """Gather rows [N] of a row-major matrix -> [N, BLOCK_D] (masked entries are 0)."""
    ptrs = base_ptr + rows.to(tl.int64)[:, None] * stride_row + cols[None, :]
    return tl.load(ptrs, mask=row_ok[:, None] & col_ok[None, :], other=0.0)


@triton.jit
def row_rotation(delta, cols, inv_freq_ptr, ROTARY_DIM: tl.constexpr, LAYOUT: tl.constexpr,
                 FAST_TRIG: tl.constexpr):
    """The rotation by ``delta`` [N] positions of rows of columns ``cols``: partner column, sign
    and rotated flag per column, cos and sin [N, D]. Computed once, it serves every head whose
    rows share the positions (``turn_rows``)."""
    partner, sign, freq_index, rotated = rope_pairing(cols, ROTARY_DIM, LAYOUT)
    cos, sin = rotation_cos_sin(delta, tl.load(inv_freq_ptr + freq_index).to(tl.float32),
                                FAST_TRIG)
    return partner, sign, rotated, cos, sin


@triton.jit
def turn_rows(x, base_ptr, rows, row_ok, stride_row, col_ok, partner, sign, rotated, cos, sin):
    """Rows ``x`` (as ``load_rows`` gave them) turned by a ``row_rotation``; keeps x's dtype."""
    x_partner = load_rows(base_ptr, rows, row_ok, stride_row, partner, col_ok)
    moved = apply_rotation(x.to(tl.float32), x_partner.to(tl.float32), cos, sin, sign, rotated)
    return moved.to(x.dtype)


@triton.jit
def load_rows_moved(base_ptr, rows, row_ok, stride_row, cols, col_ok, delta, inv_freq_ptr,
                    ROPE: tl.constexpr, ROTARY_DIM: tl.constexpr, LAYOUT: tl.constexpr,
                    FAST_TRIG: tl.constexpr, OUT_DTYPE: tl.constexpr = None):
    """``load_rows``, then (ROPE) rotate each row by ``delta`` positions; keeps the input dtype,
    or widens the rows to ``OUT_DTYPE`` first (FP8 storage: rotated at the compute dtype).

    A tile whose deltas are all zero (sliding-window keys under renumbering, padding slots) is
    returned as loaded: rotating by 0 is the identity (cos 0 = 1, sin 0 = 0, exact in fp32), so
    skipping the partner gather and the per-element cos/sin changes no value of the result.
    """
    x = load_rows(base_ptr, rows, row_ok, stride_row, cols, col_ok)
    if OUT_DTYPE is not None:
        x = x.to(OUT_DTYPE)
    if ROPE:
        if tl.max(tl.abs(delta), 0) != 0:
            partner, sign, rotated, cos, sin = row_rotation(delta, cols, inv_freq_ptr,
                                                            ROTARY_DIM, LAYOUT, FAST_TRIG)
            x = turn_rows(x, base_ptr, rows, row_ok, stride_row, col_ok, partner, sign, rotated,
                          cos, sin)
    return x


@triton.jit
def load_halves_moved(base_ptr, rows, row_ok, stride_row, half_cols, half_ok, half, delta,
                      inv_freq_ptr, FAST_TRIG: tl.constexpr):
    """Rows [N] of a rotate_half layout whose every column rotates (rotary dim = head dim) as
    their two halves, columns c and c + ``half`` ([N, len(half_cols)] each), turned by ``delta``
    positions: each half is the other's partner, so no second gather (``turn_rows`` needs one).
    All-zero deltas: the halves as loaded (``load_rows_moved``)."""
    lo = load_rows(base_ptr, rows, row_ok, stride_row, half_cols, half_ok)
    hi = load_rows(base_ptr, rows, row_ok, stride_row, half_cols + half, half_ok)
    if tl.max(tl.abs(delta), 0) != 0:
        freq = tl.load(inv_freq_ptr + half_cols, mask=half_ok, other=0.0).to(tl.float32)
        cos, sin = rotation_cos_sin(delta, freq, FAST_TRIG)
        lo, hi = turn_halves(lo, hi, cos, sin)
    return lo, hi


@triton.jit
def turn_halves(lo, hi, cos, sin):
    """The two halves [N, D / 2] of rotate_half rows (columns c and c + D / 2, each the other's
    partner) turned by ``rotation_cos_sin`` of the first half's frequencies; keeps their dtype."""
    lo32, hi32 = lo.to(tl.float32), hi.to(tl.float32)
    return (lo32 * cos - hi32 * sin).to(lo.dtype), (hi32 * cos + lo32 * sin).to(hi.dtype)


@triton.jit
def soft_cap(scores, SOFTCAP: tl.constexpr, softcap):
    """Gemma 2's ``c * tanh(s / c)`` when SOFTCAP, else the scores unchanged (fp32)."""
    if SOFTCAP:
        # tanh(x) = 1 - 2 / (exp(2x) + 1): tl has no tanh on every backend (interpreter included).
        scores = softcap * (1.0 - 2.0 / (tl.exp(2.0 * scores / softcap) + 1.0))
    return scores


@triton.jit
def online_softmax_update(acc, running_max, running_sum, scores, v, DOT_PRECISION: tl.constexpr):
    """Fold one tile of scores [M, N] (fp32, -inf = masked) and values [N, D] into the state."""
    new_max = tl.maximum(running_max, tl.max(scores, 1))
    safe_max = tl.where(new_max == float("-inf"), 0.0, new_max)  # all masked so far: no NaN
    alpha = tl.exp(running_max - safe_max)
    p = tl.exp(scores - safe_max[:, None])
    running_sum = running_sum * alpha + tl.sum(p, 1)
    acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PRECISION)
    return acc, new_max, running_sum


@triton.jit
def decode_window(p, window, sink_tokens):
    """Window start and length of one query at key index ``p`` (``attention_block_plan`` for a
    one-query block: pos_min == pos_max == p)."""
    win_lo = tl.where(window > 0, tl.maximum(p + 1 - window, sink_tokens), p + 1)
    win_len = tl.where(window > 0, tl.maximum(p - win_lo + 1, 0), 0)
    return win_lo, win_len


@triton.jit
def count_valid_blocks(blocks_row_ptr, topk, BLOCK_T: tl.constexpr):
    """Entries >= 0 of a block-index row of ``topk`` entries (-1 marks an empty one)."""
    n_valid = tl.sum(tl.zeros((BLOCK_T,), tl.int32), 0)
    for t in range(0, topk, BLOCK_T):
        t_idx = t + tl.arange(0, BLOCK_T)
        row = tl.load(blocks_row_ptr + t_idx, mask=t_idx < topk, other=-1)
        n_valid += tl.sum((row >= 0).to(tl.int32), 0)
    return n_valid


@triton.jit
def attended_slots(slot, blocks_row_ptr, topk, sink, win_lo, win_len, n_valid, s_k,
                   BLOCK_K: tl.constexpr):
    """Map slot numbers of a query block's key list (sinks, selected blocks, window) to keys.

    Returns key index, usable flag, is-selected, is-window and the RoPE renumbering delta of each
    slot (``block_sparse_attention_ref`` has the rules).
    """
    n_sel = topk * BLOCK_K
    is_sink = slot < sink
    is_sel = (slot >= sink) & (slot < sink + n_sel)
    u = slot - sink
    rank = u // BLOCK_K
    block = tl.load(blocks_row_ptr + rank, mask=is_sel, other=-1)
    sel_start = block * BLOCK_K
    w = slot - sink - n_sel
    is_win = (w >= 0) & (w < win_len)
    key = tl.where(is_sink, slot, tl.where(is_sel, sel_start + u % BLOCK_K, win_lo + w))
    ok = (is_sink | (is_sel & (block >= 0)) | is_win) & (key < s_k) & (key >= 0)
    delta = tl.where(is_sink, win_lo - sink - n_valid * BLOCK_K,
                     tl.where(is_sel, win_lo - sel_start - (n_valid - rank) * BLOCK_K, 0))
    return key, ok, is_sel, is_win, delta


@triton.jit
def visible_slots(key, ok, is_sel, is_win, pos, sink, window):
    """[M, N] visibility of slot keys [N] to queries at key indices ``pos`` [M]: causal, the
    selected blocks outside each query's window, the window inside it (disjoint sets)."""
    k2, p2 = key[None, :], pos[:, None]
    vis = ok[None, :] & (k2 <= p2)
    vis = vis & (~is_sel[None, :] | ((k2 <= p2 - window) & (k2 >= sink)))
    vis = vis & (~is_win[None, :] | (k2 >= tl.maximum(p2 - window + 1, sink)))
    return vis


@triton.jit
def page_rows(key, ok, page_table_row, rows_per_page, PAGE_TOKENS: tl.constexpr,
              PAGED: tl.constexpr):
    """Rows of keys ``key`` in the memory a kernel reads: the keys themselves in a [S, D]
    matrix; in pages (``bank_kv``: bank slots), row s is in page ``page_table_row[s // PAGE]``,
    whose first row is that page number times ``rows_per_page``."""
    if PAGED:
        page = tl.load(page_table_row + key // PAGE_TOKENS, mask=ok, other=0)
        return page.to(tl.int64) * rows_per_page + key % PAGE_TOKENS
    return key.to(tl.int64)


@triton.jit
def fold_slot_tile(q, acc, running_max, running_sum, slot, slot_ok, pos, blocks_row, topk, sink,
                   window, win_lo, win_len, n_valid, s_k, k_base, v_base, stride_k_s,
                   stride_v_s, cols, col_ok, inv_freq_ptr, scale, softcap, page_table_row,
                   rows_per_page,
                   BLOCK_K: tl.constexpr, SOFTCAP: tl.constexpr, REMAP: tl.constexpr,
                   ROTARY_DIM: tl.constexpr, LAYOUT: tl.constexpr, FAST_TRIG: tl.constexpr,
                   DOT_PRECISION: tl.constexpr, PAGE_TOKENS: tl.constexpr = 1,
                   PAGED: tl.constexpr = False):
    """One tile of a query block's key list: gather K (re-positioned if REMAP) and V, mask,
    and fold into the online-softmax state of the query rows ``q`` at key indices ``pos``.
    PAGED: K and V lie in pages (``page_rows``, the same for both) rather than one row per
    key. K and V stored narrower than q (FP8 bank slots) are widened to q's dtype as loaded."""
    key, ok, is_sel, is_win, delta = attended_slots(
        slot, blocks_row, topk, sink, win_lo, win_len, n_valid, s_k, BLOCK_K)
    ok = ok & slot_ok
    rows = page_rows(key, ok, page_table_row, rows_per_page, PAGE_TOKENS, PAGED)
    # V is gathered before the K work, not after the scores: both gathers depend only on the key
    # indices, so they are in flight together (a decode program walks a single tile).
    values = load_rows(v_base, rows, ok, stride_v_s, cols, col_ok).to(q.dtype)
    keys = load_rows_moved(k_base, rows, ok, stride_k_s, cols, col_ok, delta, inv_freq_ptr,
                           REMAP, ROTARY_DIM, LAYOUT, FAST_TRIG, q.dtype)
    scores = tl.dot(q, tl.trans(keys), input_precision=DOT_PRECISION)
    return fold_scores(scores, values, acc, running_max, running_sum, key, ok, is_sel, is_win,
                       pos, sink, window, scale, softcap, SOFTCAP, DOT_PRECISION)


@triton.jit
def fold_slot_tile_halves(q_lo, q_hi, acc, running_max, running_sum, slot, slot_ok, pos,
                          blocks_row, topk, sink, window, win_lo, win_len, n_valid, s_k, k_base,
                          v_base, stride_k_s, stride_v_s, cols, col_ok, half_cols, half_ok, half,
                          inv_freq_ptr, scale, softcap, BLOCK_K: tl.constexpr,
                          SOFTCAP: tl.constexpr, FAST_TRIG: tl.constexpr,
                          DOT_PRECISION: tl.constexpr):
    """``fold_slot_tile`` with renumbering for a rotate_half layout rotating every column: the
    queries come as their halves (``load_halves_moved``), the scores are the sum of the halves'
    products."""
    key, ok, is_sel, is_win, delta = attended_slots(
        slot, blocks_row, topk, sink, win_lo, win_len, n_valid, s_k, BLOCK_K)
    ok = ok & slot_ok
    values = load_rows(v_base, key, ok, stride_v_s, cols, col_ok)
    k_lo, k_hi = load_halves_moved(k_base, key, ok, stride_k_s, half_cols, half_ok, half, delta,
                                   inv_freq_ptr, FAST_TRIG)
    scores = tl.dot(q_lo, tl.trans(k_lo), input_precision=DOT_PRECISION)
    scores = tl.dot(q_hi, tl.trans(k_hi), scores, input_precision=DOT_PRECISION)
    return fold_scores(scores, values, acc, running_max, running_sum, key, ok, is_sel, is_win,
                       pos, sink, window, scale, softcap, SOFTCAP, DOT_PRECISION)


@triton.jit
def fold_scores(scores, values, acc, running_max, running_sum, key, ok, is_sel, is_win, pos,
                sink, window, scale, softcap, SOFTCAP: tl.constexpr, DOT_PRECISION: tl.constexpr):
    """A tile's raw products [M, N]: scaled, soft-capped, masked to what each query sees, and
    folded with its values into the online-softmax state."""
    scores = soft_cap(scores * scale, SOFTCAP, softcap)
    vis = visible_slots(key, ok, is_sel, is_win, pos, sink, window)
    scores = tl.where(vis, scores, float("-inf"))
    return online_softmax_update(acc, running_max, running_sum, scores, values, DOT_PRECISION)
