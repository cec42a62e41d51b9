"""Standalone launcher of the in-kernel RoPE re-positioning (``_primitives.load_rows_moved``).

The attention and pruning kernels call the jit helper directly. ``rotate_by_delta`` tests it;
``rotate_positions`` moves whole key tensors, one rotation per position shared by all heads
(``positioned_scoring``). Their spec is ``rope_delta_ref.rotate_by_delta``.
"""

import torch
import triton
import triton.language as tl

from ihip_compile.kernels._primitives import (
    approximate_trig, load_rows, load_rows_moved, row_rotation, turn_rows,
)


@triton.jit
def _rotate_rows_kernel(x_ptr, delta_ptr, inv_freq_ptr, out_ptr, n_rows, head_dim,
                        ROTARY_DIM: tl.constexpr, LAYOUT: tl.constexpr, FAST_TRIG: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < n_rows, cols < head_dim
    delta = tl.load(delta_ptr + rows, mask=row_ok, other=0)
    x = load_rows_moved(x_ptr, rows, row_ok, head_dim, cols, col_ok, delta, inv_freq_ptr,
                        True, ROTARY_DIM, LAYOUT, FAST_TRIG)
    tl.store(out_ptr + rows.to(tl.int64)[:, None] * head_dim + cols[None, :], x,
             mask=row_ok[:, None] & col_ok[None, :])


def rotate_by_delta(x, delta, inv_freq, rotary_dim: int, layout: int) -> torch.Tensor:
    """x [N, D] contiguous, delta [N] int32 -> x rotated by delta positions (x's dtype)."""
    if x.dim() != 2 or delta.shape != x.shape[:1]:
        raise ValueError(f"x must be [N, D] and delta [N], got {tuple(x.shape)}, {tuple(delta.shape)}")
    x = x.contiguous()
    out = torch.empty_like(x)
    n, d = x.shape
    block_n = 16
    _rotate_rows_kernel[(triton.cdiv(n, block_n),)](
        x, delta.to(torch.int32).contiguous(), inv_freq.float().contiguous(), out, n, d,
        ROTARY_DIM=rotary_dim, LAYOUT=layout, FAST_TRIG=approximate_trig(x), BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(d),
    )
    return out


@triton.jit
def _rotate_positions_kernel(x_ptr, delta_ptr, inv_freq_ptr, out_ptr, n_pos, heads, head_dim,
                             stride_x_b, stride_x_h, stride_x_s,
                             ROTARY_DIM: tl.constexpr, LAYOUT: tl.constexpr,
                             FAST_TRIG: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    # One program: BLOCK_N positions of one sequence, every head. The heads of a position share
    # its rotation, so cos and sin are computed once for all of them. The input is read through
    # its strides (a cache's keys are often a slice of a longer buffer); the output is contiguous.
    pos = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    seq = tl.program_id(1).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    pos_ok, col_ok = pos < n_pos, cols < head_dim
    delta = tl.load(delta_ptr + pos, mask=pos_ok, other=0)
    partner, sign, rotated, cos, sin = row_rotation(delta, cols, inv_freq_ptr, ROTARY_DIM, LAYOUT,
                                                    FAST_TRIG)
    out_head = n_pos.to(tl.int64) * head_dim
    base, out = x_ptr + seq * stride_x_b, out_ptr + seq * heads * out_head
    for _ in range(heads):
        x = load_rows(base, pos, pos_ok, stride_x_s, cols, col_ok)
        moved = turn_rows(x, base, pos, pos_ok, stride_x_s, col_ok, partner, sign, rotated, cos, sin)
        tl.store(out + pos.to(tl.int64)[:, None] * head_dim + cols[None, :], moved,
                 mask=pos_ok[:, None] & col_ok[None, :])
        base += stride_x_h
        out += out_head


def rotate_positions(x, delta, inv_freq, rotary_dim: int, layout: int) -> torch.Tensor:
    """x [B, H, S, D] (any strides, D contiguous), delta [S] int -> a contiguous copy of x with
    position s of every head rotated by delta[s]."""
    if x.dim() != 4 or delta.shape != x.shape[2:3]:
        raise ValueError(f"x must be [B, H, S, D] and delta [S], got {tuple(x.shape)}, "
                         f"{tuple(delta.shape)}")
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = torch.empty(x.shape, dtype=x.dtype, device=x.device)
    b, h, s, d = x.shape
    block_n = 32
    _rotate_positions_kernel[(triton.cdiv(s, block_n), b)](
        x, delta.to(torch.int32).contiguous(), inv_freq.float().contiguous(), out, s, h, d,
        x.stride(0), x.stride(1), x.stride(2),
        ROTARY_DIM=rotary_dim, LAYOUT=layout, FAST_TRIG=approximate_trig(x), BLOCK_N=block_n,
        BLOCK_D=triton.next_power_of_2(d),
    )
    return out
