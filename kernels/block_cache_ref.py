"""Gather K/V blocks from a GPU block bank and a staging buffer of just-fetched blocks: the spec.

The offloaded KV cache keeps every key and value in host memory, cut into blocks of BLOCK_K tokens
(block-major: one block holds all H_KV heads, so it crosses PCIe as one contiguous copy). A GPU
bank holds the recently used blocks. A read names the blocks it wants; each comes either from its
bank slot (a hit) or from a staging buffer the caller filled from host memory (a miss).

    bank      [N_SLOTS, H_KV, BLOCK_K, D]   storage dtype (model dtype or float8_e4m3fn)
    staging   [N_STAGED, H_KV, BLOCK_K, D]  storage dtype, blocks copied from host this read
    slots     [N] int                       bank slot of requested block i, or -1 for a miss
    staged    [N] int                       row of staging for a miss (ignored where slots >= 0);
                                            -1 in both: no block, zeros (nothing is read)
    returns   [N, H_KV, BLOCK_K, D]         out_dtype
    (or, given out [M, H_KV, BLOCK_K, D] and dest [N]: block i written to out[dest[i]] where
     dest[i] >= 0, and out returned)

Exactness: with the model dtype as storage the result is a bit-exact copy; FP8 storage is widened
to out_dtype (the FP8 rounding happened once, when the tokens were written).
"""

from __future__ import annotations

import torch


def gather_blocks_ref(
    bank: torch.Tensor,
    staging: torch.Tensor,
    slots: torch.Tensor,
    staged: torch.Tensor,
    *,
    out_dtype: torch.dtype | None = None,
    out: torch.Tensor | None = None,
    dest: torch.Tensor | None = None,
) -> torch.Tensor:
    """With ``dest`` [N] (row of ``out`` [M, H_KV, BLOCK_K, D] for block i; -1: not written) the
    blocks are written into ``out``, which is returned."""
    out_dtype = out_dtype or (bank.dtype if out is None else out.dtype)
    hit = slots >= 0
    # Indexing goes through same-width integer views: CPU indexing does not cover float8 types.
    from_bank = as_bits(bank)[slots.clamp(min=0).long()]
    if staging.shape[0] > 0:
        from_staging = as_bits(staging)[staged.clamp(min=0, max=staging.shape[0] - 1).long()]
    else:
        from_staging = torch.zeros_like(from_bank)
    from_staging = torch.where(staged[:, None, None, None] >= 0, from_staging, 0)
    chosen = torch.where(hit[:, None, None, None], from_bank, from_staging)
    blocks = chosen.view(bank.dtype).to(out_dtype)
    if dest is None:
        return blocks
    written = dest >= 0
    out[dest[written].long()] = blocks[written]
    return out


_BITS = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def as_bits(t: torch.Tensor) -> torch.Tensor:
    """The same memory seen as integers of the same width (for copies that must be bit-exact)."""
    return t.view(_BITS[t.element_size()])
