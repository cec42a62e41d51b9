"""Gather K/V blocks from the GPU block bank or the staging buffer of fetched misses (Triton).

Spec: ``block_cache_ref.gather_blocks_ref`` (shapes, sentinels, dtypes). One program copies
one block of one KV head: BLOCK_K tokens by D, widening FP8 storage to the output dtype.

Changes vs a plain ``torch.where(hit, bank[slots], staging[staged])``: one pass over the output,
no [N, H_KV, BLOCK_K, D] temporaries for the two candidate sources.
Caution: the kernel trusts ``slots`` and ``staged``; the bank's bookkeeping keeps them in range.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _gather_blocks_kernel(
    bank_ptr, staging_ptr, slots_ptr, staged_ptr, out_ptr,
    stride_bank_n, stride_bank_h, stride_bank_t,
    stride_stage_n, stride_stage_h, stride_stage_t,
    stride_out_n, stride_out_h, stride_out_t,
    head_dim,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
):
    block = tl.program_id(0)
    head = tl.program_id(1)
    tokens = tl.arange(0, BLOCK_K)[:, None]
    dims = tl.arange(0, BLOCK_D)[None, :]
    in_dim = dims < head_dim
    slot = tl.load(slots_ptr + block).to(tl.int64)
    row = tl.load(staged_ptr + block).to(tl.int64)
    is_hit = slot >= 0
    is_miss = (slot < 0) & (row >= 0)  # both negative: no block, zeros
    bank_offsets = slot * stride_bank_n + head * stride_bank_h + tokens * stride_bank_t + dims
    stage_offsets = row * stride_stage_n + head * stride_stage_h + tokens * stride_stage_t + dims
    from_bank = tl.load(bank_ptr + bank_offsets, mask=in_dim & is_hit, other=0.0)
    from_staging = tl.load(staging_ptr + stage_offsets, mask=in_dim & is_miss, other=0.0)
    values = tl.where(is_hit, from_bank, from_staging).to(out_ptr.dtype.element_ty)
    out_offsets = block * stride_out_n + head * stride_out_h + tokens * stride_out_t + dims
    tl.store(out_ptr + out_offsets, values, mask=in_dim)


def gather_blocks(
    bank: torch.Tensor,  # [N_SLOTS, H_KV, BLOCK_K, D]
    staging: torch.Tensor,  # [N_STAGED, H_KV, BLOCK_K, D]
    slots: torch.Tensor,  # [N] int, -1 = miss
    staged: torch.Tensor,  # [N] int, staging row of a miss
    *,
    out_dtype: torch.dtype | None = None,
    out_device: torch.device | None = None,
) -> torch.Tensor:  # [N, H_KV, BLOCK_K, D]
    """Triton launch of ``gather_blocks_ref``; same arguments, same result. ``bank`` and
    ``staging`` may be host memory registered with CUDA; the result goes to ``out_device``
    (default: the bank's device)."""
    assert bank.dim() == 4 and bank.stride(-1) == 1, f"bank must be [N_SLOTS, H_KV, BLOCK_K, D] "\
        f"with contiguous D, got shape {tuple(bank.shape)} strides {bank.stride()}"
    assert staging.shape[1:] == bank.shape[1:] and staging.dtype == bank.dtype, (
        f"staging {tuple(staging.shape)} {staging.dtype} must match bank blocks "
        f"{tuple(bank.shape[1:])} {bank.dtype}"
    )
    assert slots.shape == staged.shape and slots.dim() == 1, "slots and staged must be [N]"
    n, (_, heads, block_k, head_dim) = slots.shape[0], bank.shape
    assert block_k & (block_k - 1) == 0, f"BLOCK_K must be a power of two, got {block_k}"
    out = torch.empty((n, heads, block_k, head_dim), dtype=out_dtype or bank.dtype,
                      device=out_device or bank.device)
    if n == 0:
        return out
    # An empty staging buffer still needs a valid pointer; its loads are all masked off.
    staging = staging if staging.shape[0] > 0 else bank[:1]
    _gather_blocks_kernel[(n, heads)](
        bank, staging, slots, staged, out,
        bank.stride(0), bank.stride(1), bank.stride(2),
        staging.stride(0), staging.stride(1), staging.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        head_dim,
        BLOCK_K=block_k, BLOCK_D=triton.next_power_of_2(head_dim),
    )
    return out
