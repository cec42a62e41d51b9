"""Triton kernel appending new tokens to host memory and to the banks holding their blocks.

Spec: ``token_append_ref.append_tokens_ref`` (layout, banks, bit-exact copies). On CUDA the
store's block-major host copy is pinned and registered, so a kernel can write it in place: one
launch writes the new keys and values over PCIe and into every bank that holds their blocks,
with no host-side copy and no stream sync (a device-to-host copy would wait for the stream,
and the host-side scatter into blocks and the bank updates would be ~25 small torch ops).
One program writes TOKENS tokens of one KV head of one row of one tensor.

Caution: writes to host memory are ordered with later work on the same stream only; host code
that reads the store's memory directly must synchronise first (``HostKVStore`` does).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from ihip_compile.kernels._primitives import jit_growing
from ihip_compile.kernels.block_cache_ref import as_bits
from ihip_compile.kernels.token_append_ref import append_tokens_ref

_TOKENS = 16
_MAX_BANKS = 2
_MAX_WRITES = 2


@triton.jit
def _append_rows(
    src_ptr, host_ptr, slots_a_ptr, bank_a_ptr, slots_b_ptr, bank_b_ptr, tile, head, row,
    start, s_new, blocks_per_row, head_dim,
    stride_src_b, stride_src_h, stride_src_s, stride_blk, stride_head, stride_tok,
    BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr, TOKENS: tl.constexpr, N_BANKS: tl.constexpr,
):
    """TOKENS new tokens of one KV head of one row into the host copy and the banks."""
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


@jit_growing("start")
def _append_tokens_kernel(
    src0, host0, slots0a, bank0a, slots0b, bank0b, src1, host1, slots1a, bank1a, slots1b, bank1b,
    start, start_ptr, s_new, blocks_per_row, dim0, dim1,
    s0_src_b, s0_src_h, s0_src_s, s0_blk, s0_head, s0_tok,
    s1_src_b, s1_src_h, s1_src_s, s1_blk, s1_head, s1_tok,
    BLOCK_K: tl.constexpr, BLOCK_D0: tl.constexpr, BLOCK_D1: tl.constexpr,
    TOKENS: tl.constexpr, N_BANKS0: tl.constexpr, N_BANKS1: tl.constexpr,
    N_WRITES: tl.constexpr, START_AT: tl.constexpr,
):
    # Axis 2 runs over (row, write) pairs: one launch appends the keys and the values.
    tile, head = tl.program_id(0), tl.program_id(1).to(tl.int64)
    if START_AT:  # read on the device: one captured launch serves every step
        start = tl.load(start_ptr)
    pair = tl.program_id(2)
    row, write = (pair // N_WRITES).to(tl.int64), pair % N_WRITES
    if write == 0:
        _append_rows(src0, host0, slots0a, bank0a, slots0b, bank0b, tile, head, row, start,
                     s_new, blocks_per_row, dim0, s0_src_b, s0_src_h, s0_src_s, s0_blk,
                     s0_head, s0_tok, BLOCK_K, BLOCK_D0, TOKENS, N_BANKS0)
    else:
        _append_rows(src1, host1, slots1a, bank1a, slots1b, bank1b, tile, head, row, start,
                     s_new, blocks_per_row, dim1, s1_src_b, s1_src_h, s1_src_s, s1_blk,
                     s1_head, s1_tok, BLOCK_K, BLOCK_D1, TOKENS, N_BANKS1)


def _checked_write(new: torch.Tensor, host: torch.Tensor, banks) -> tuple:
    """One write's launch arguments: (source, host, (slots, bank) x 2, n_banks), as bits."""
    banks = list(banks)
    if len(banks) > _MAX_BANKS:
        raise ValueError(f"at most {_MAX_BANKS} banks per write, got {len(banks)}")
    if host.dim() != 4 or not host.is_contiguous():
        raise ValueError(f"host must be a contiguous [B * N_BLOCKS, H_KV, BLOCK_K, D] tensor, "
                         f"got shape {tuple(host.shape)} strides {host.stride()}")
    for _, bank in banks:
        if bank.shape[1:] != host.shape[1:] or not bank.is_contiguous():
            raise ValueError(f"bank blocks {tuple(bank.shape[1:])} must match host blocks "
                             f"{tuple(host.shape[1:])}, contiguous")
    src = as_bits(new if new.stride(-1) == 1 else new.contiguous())
    dst = as_bits(host)
    pairs = [(slots, as_bits(bank)) for slots, bank in banks]
    # Unused bank arguments still need valid pointers; N_BANKS keeps the kernel off them.
    pairs += [pairs[0] if pairs else (dst, dst)] * (_MAX_BANKS - len(pairs))
    return src, dst, pairs, len(banks)


def append_tokens_kernel(writes, start: int, blocks_per_row: int,
                         start_at: torch.Tensor | None = None) -> None:
    """Triton launch of ``append_tokens_ref`` for each of ``writes`` ((new, host, banks), e.g.
    the keys and the values: one launch per two writes); same result. ``start_at`` (an int64
    tensor [1] on the device), when given, holds the first token's position instead of
    ``start`` (``append_step_graph``)."""
    writes = list(writes)
    if not writes:
        raise ValueError("append_tokens_kernel needs at least one write")
    batch, heads, s_new, _ = writes[0][0].shape
    for new, _, _ in writes:
        if (new.shape[0], new.shape[1], new.shape[2]) != (batch, heads, s_new):
            raise ValueError(f"writes of one append need the same batch, heads and tokens, got "
                             f"{[tuple(w[0].shape) for w in writes]}")
    if s_new == 0:
        return
    for lo in range(0, len(writes), _MAX_WRITES):
        _launch(writes[lo:lo + _MAX_WRITES], start, blocks_per_row, start_at)


def _launch(writes: list, start: int, blocks_per_row: int, start_at) -> None:
    """One launch of the kernel for one or two writes."""
    batch, heads, s_new, _ = writes[0][0].shape
    args = [_checked_write(*w) for w in writes]
    args += [args[0]] * (_MAX_WRITES - len(args))
    grid = (triton.cdiv(s_new, _TOKENS), heads, batch * len(writes))
    pointers = [t for src, dst, pairs, _ in args for t in (src, dst, *pairs[0], *pairs[1])]
    strides = [n for src, dst, _, _ in args
               for n in (src.stride(0), src.stride(1), src.stride(2), dst.stride(0),
                         dst.stride(1), dst.stride(2))]
    _append_tokens_kernel[grid](
        *pointers, start, args[0][0] if start_at is None else start_at, s_new, blocks_per_row,
        args[0][0].shape[-1], args[1][0].shape[-1],
        *strides, BLOCK_K=writes[0][1].shape[2],
        BLOCK_D0=triton.next_power_of_2(args[0][0].shape[-1]),
        BLOCK_D1=triton.next_power_of_2(args[1][0].shape[-1]), TOKENS=_TOKENS,
        N_BANKS0=args[0][3], N_BANKS1=args[1][3], N_WRITES=len(writes),
        START_AT=start_at is not None,
    )


def append_tokens(writes, start: int, blocks_per_row: int) -> None:
    """Each of ``writes`` ((new, host, banks)): the kernel, in one launch, where the tokens are
    on CUDA (``host`` registered with CUDA), else the reference."""
    writes = list(writes)
    if writes[0][0].is_cuda:
        append_tokens_kernel(writes, start, blocks_per_row)
    else:
        for new, host, banks in writes:
            append_tokens_ref(new, host, start, blocks_per_row, banks)
