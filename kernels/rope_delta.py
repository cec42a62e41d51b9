"""Standalone launcher of the in-kernel RoPE re-positioning (``_primitives.load_rows_moved``).

Only for tests: the attention and pruning kernels call the jit helper directly. Its spec is
``rope_delta_ref.rotate_by_delta``.
"""

import torch
import triton
import triton.language as tl

from ihip_compile.kernels._primitives import load_rows_moved


@triton.jit
def _rotate_rows_kernel(x_ptr, delta_ptr, inv_freq_ptr, out_ptr, n_rows, head_dim,
                        ROTARY_DIM: tl.constexpr, LAYOUT: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols = tl.arange(0, BLOCK_D)
    row_ok, col_ok = rows < n_rows, cols < head_dim
    delta = tl.load(delta_ptr + rows, mask=row_ok, other=0)
    x = load_rows_moved(x_ptr, rows, row_ok, head_dim, cols, col_ok, delta, inv_freq_ptr,
                        True, ROTARY_DIM, LAYOUT)
    tl.store(out_ptr + rows[:, None] * head_dim + cols[None, :], x,
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
        ROTARY_DIM=rotary_dim, LAYOUT=layout, BLOCK_N=block_n, BLOCK_D=triton.next_power_of_2(d),
    )
    return out
