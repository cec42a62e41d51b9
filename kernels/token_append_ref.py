"""Append new tokens to a block-major K/V copy and to the GPU banks that hold their blocks: the spec.

The offloaded store keeps each layer's keys (and values) block-major, [B * N_BLOCKS, H_KV,
BLOCK_K, D]: block ``b * N_BLOCKS + pos // BLOCK_K`` of row b holds token ``pos`` at offset
``pos % BLOCK_K``. A bank ([N_SLOTS(+1), H_KV, BLOCK_K, D], ``block_bank.BlockBank``) holding
that block gets the token too (written through), so a block never differs between the two.

    new            [B, H_KV, S, D]             storage dtype, tokens at positions start.. start+S-1
    host           [B * N_BLOCKS, H_KV, BLOCK_K, D]
    banks          (slot_of_block [B * N_BLOCKS] int, bank [N_SLOTS(+1), H_KV, BLOCK_K, D]) pairs;
                   a block with slot -1 is not in that bank

Copies are bit-exact (through same-width integer views: CPU indexing lacks float8 types).
"""

from __future__ import annotations

import torch

from ihip_compile.kernels.block_cache_ref import as_bits


def append_tokens_ref(new: torch.Tensor, host: torch.Tensor, start: int, blocks_per_row: int,
                      banks=()) -> None:
    batch, _, s_new, _ = new.shape
    bk = host.shape[2]
    positions = torch.arange(start, start + s_new, device=host.device)
    rows = torch.arange(batch, device=host.device)[:, None] * blocks_per_row
    blocks = rows + positions // bk  # [B, S]
    offsets = (positions % bk).expand(batch, -1)  # [B, S]
    tokens = as_bits(new).permute(0, 2, 1, 3).to(host.device)  # [B, S, H_KV, D]
    as_bits(host)[blocks, :, offsets] = tokens
    for slot_of_block, bank in banks:
        slots = slot_of_block.to(host.device)[blocks]
        held = slots >= 0
        as_bits(bank)[slots[held], :, offsets[held]] = tokens[held].to(bank.device)
