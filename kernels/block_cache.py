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
    bank_ptr, staging_ptr, slots_ptr, staged_ptr, out_ptr, dest_ptr,
    stride_bank_n, stride_bank_h, stride_bank_t,
    stride_stage_n, stride_stage_h, stride_stage_t,
    stride_out_n, stride_out_h, stride_out_t,
    head_dim,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, HAS_DEST: tl.constexpr,
):
    block = tl.program_id(0)
    head = tl.program_id(1)
    out_row = block.to(tl.int64)
    if HAS_DEST:
        out_row = tl.load(dest_ptr + block).to(tl.int64)
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
    out_offsets = out_row * stride_out_n + head * stride_out_h + tokens * stride_out_t + dims
    tl.store(out_ptr + out_offsets, values, mask=in_dim & (out_row >= 0))


def gather_blocks(
    bank: torch.Tensor,  # [N_SLOTS, H_KV, BLOCK_K, D]
    staging: torch.Tensor,  # [N_STAGED, H_KV, BLOCK_K, D]
    slots: torch.Tensor,  # [N] int, -1 = miss
    staged: torch.Tensor,  # [N] int, staging row of a miss
    *,
    out_dtype: torch.dtype | None = None,
    out_device: torch.device | None = None,
    out: torch.Tensor | None = None,  # [M, H_KV, BLOCK_K, D], D contiguous, with ``dest``
    dest: torch.Tensor | None = None,  # [N] int: row of ``out`` for block i, -1: not written
) -> torch.Tensor:  # [N, H_KV, BLOCK_K, D], or ``out``
    """Triton launch of ``gather_blocks_ref``; same arguments, same result. ``bank`` and
    ``staging`` may be host memory registered with CUDA; the result goes to ``out_device``
    (default: the bank's device), or with ``dest`` into rows of ``out`` (any view, such as a
    [B, H_KV, S, D] buffer's blocks: no temporary, no second copy)."""
    assert bank.dim() == 4 and bank.stride(-1) == 1, f"bank must be [N_SLOTS, H_KV, BLOCK_K, D] "\
        f"with contiguous D, got shape {tuple(bank.shape)} strides {bank.stride()}"
    assert staging.shape[1:] == bank.shape[1:] and staging.dtype == bank.dtype, (
        f"staging {tuple(staging.shape)} {staging.dtype} must match bank blocks "
        f"{tuple(bank.shape[1:])} {bank.dtype}"
    )
    assert slots.shape == staged.shape and slots.dim() == 1, "slots and staged must be [N]"
    n, (_, heads, block_k, head_dim) = slots.shape[0], bank.shape
    assert block_k & (block_k - 1) == 0, f"BLOCK_K must be a power of two, got {block_k}"
    if dest is None:
        out = torch.empty((n, heads, block_k, head_dim), dtype=out_dtype or bank.dtype,
                          device=out_device or bank.device)
    else:
        assert dest.shape == slots.shape and out is not None and out.shape[1:] == bank.shape[1:]\
            and out.stride(-1) == 1, (f"dest [N] needs out [M, H_KV, BLOCK_K, D] with contiguous "
                                      f"D, got {None if out is None else tuple(out.shape)}")
    if n == 0:
        return out
    # An empty staging buffer still needs a valid pointer; its loads are all masked off.
    staging = staging if staging.shape[0] > 0 else bank[:1]
    _gather_blocks_kernel[(n, heads)](
        bank, staging, slots, staged, out, slots if dest is None else dest,
        bank.stride(0), bank.stride(1), bank.stride(2),
        staging.stride(0), staging.stride(1), staging.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        head_dim,
        BLOCK_K=block_k, BLOCK_D=triton.next_power_of_2(head_dim), HAS_DEST=dest is not None,
    )
    return out
