"""Triton kernel appending new tokens to host memory and to the banks holding their blocks.

Spec: ``token_append_ref.append_tokens_ref`` (layout, banks, bit-exact copies). On CUDA the
store's block-major host copy is pinned and registered, so a kernel can write it in place: one
launch per tensor writes the new tokens over PCIe and into every bank that holds their blocks,
with no host-side copy and no stream sync (a device-to-host copy would wait for the stream,
and the host-side scatter into blocks and the bank updates would be ~25 small torch ops).
One program writes TOKENS tokens of one KV head of one row.

Caution: writes to host memory are ordered with later work on the same stream only; host code
that reads the store's memory directly must synchronise first (``HostKVStore`` does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ihip_compile.kernels.block_cache_ref import as_bits
from ihip_compile.kernels.token_append_ref import append_tokens_ref

_TOKENS = 16
_MAX_BANKS = 2


@triton.jit
def _append_tokens_kernel(
    src_ptr, host_ptr, slots_a_ptr, bank_a_ptr, slots_b_ptr, bank_b_ptr,
    start, s_new, blocks_per_row, head_dim,
    stride_src_b, stride_src_h, stride_src_s, stride_blk, stride_head, stride_tok,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, TOKENS: tl.constexpr, N_BANKS: tl.constexpr,
):
    tile, head, row = tl.program_id(0), tl.program_id(1).to(tl.int64), tl.program_id(2).to(tl.int64)
    t = tile * TOKENS + tl.arange(0, TOKENS)
    cols = tl.arange(0, BLOCK_D)
    ok = (t < s_new)[:, None] & (cols < head_dim)[None, :]
    src = (src_ptr + row * stride_src_b + head * stride_src_h
           + t.to(tl.int64)[:, None] * stride_src_s + cols[None, :])
    tokens = tl.load(src, mask=ok)
    pos = start + t.to(tl.int64)
    block = row * blocks_per_row + pos // BLOCK_K
    # Host and banks share the block layout [*, H_KV, BLOCK_K, D]: only the block index differs.
    in_block = head * stride_head + (pos % BLOCK_K)[:, None] * stride_tok + cols[None, :]
    tl.store(host_ptr + block[:, None] * stride_blk + in_block, tokens, mask=ok)
    if N_BANKS >= 1:
        slot = tl.load(slots_a_ptr + block, mask=t < s_new, other=-1)
        tl.store(bank_a_ptr + slot[:, None] * stride_blk + in_block, tokens,
                 mask=ok & (slot[:, None] >= 0))
    if N_BANKS >= 2:
        slot = tl.load(slots_b_ptr + block, mask=t < s_new, other=-1)
        tl.store(bank_b_ptr + slot[:, None] * stride_blk + in_block, tokens,
                 mask=ok & (slot[:, None] >= 0))


def append_tokens_kernel(new: torch.Tensor, host: torch.Tensor, start: int, blocks_per_row: int,
                         banks=()) -> None:
    """Triton launch of ``append_tokens_ref``; same arguments, same result."""
    banks = list(banks)
    if len(banks) > _MAX_BANKS:
        raise ValueError(f"at most {_MAX_BANKS} banks per append, got {len(banks)}")
    if host.dim() != 4 or not host.is_contiguous():
        raise ValueError(f"host must be a contiguous [B * N_BLOCKS, H_KV, BLOCK_K, D] tensor, "
                         f"got shape {tuple(host.shape)} strides {host.stride()}")
    for _, bank in banks:
        if bank.shape[1:] != host.shape[1:] or not bank.is_contiguous():
            raise ValueError(f"bank blocks {tuple(bank.shape[1:])} must match host blocks "
                             f"{tuple(host.shape[1:])}, contiguous")
    batch, heads, s_new, head_dim = new.shape
    if s_new == 0:
        return
    src = as_bits(new if new.stride(-1) == 1 else new.contiguous())
    dst = as_bits(host)
    pairs = [(slots, as_bits(bank)) for slots, bank in banks]
    # Unused bank arguments still need valid pointers; N_BANKS keeps the kernel off them.
    pairs += [pairs[0] if pairs else (dst, dst)] * (_MAX_BANKS - len(pairs))
    (slots_a, bank_a), (slots_b, bank_b) = pairs
    grid = (triton.cdiv(s_new, _TOKENS), heads, batch)
    _append_tokens_kernel[grid](
        src, dst, slots_a, bank_a, slots_b, bank_b,
        start, s_new, blocks_per_row, head_dim,
        src.stride(0), src.stride(1), src.stride(2), dst.stride(0), dst.stride(1), dst.stride(2),
        BLOCK_K=host.shape[2], BLOCK_D=triton.next_power_of_2(head_dim), TOKENS=_TOKENS,
        N_BANKS=len(banks),
    )


def append_tokens(new: torch.Tensor, host: torch.Tensor, start: int, blocks_per_row: int,
                  banks=()) -> None:
    """The kernel where the tokens are on CUDA (``host`` registered with CUDA), else the
    reference."""
    if new.is_cuda:
        append_tokens_kernel(new, host, start, blocks_per_row, banks)
    else:
        append_tokens_ref(new, host, start, blocks_per_row, banks)
