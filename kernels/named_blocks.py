"""Which blocks a decode read names, as device work a bank can replay (``replayed_work``).

A decode refresh reads two lists of blocks per layer through its banks: the blocks covering the
chunks the last pruning stage kept (the pruning bank), and the sinks, the selected blocks and
the window (the attention bank). Each is worked out on the device from the selection, with no
host sync, by a dozen small ops whose launches cost more host time than the GPU spends on them.
A ``NamedBlocks`` is such a list as a function of its device inputs and a key naming every host
fact it bakes in, so that the bank can replay the naming together with its read as one graph.
The window's blocks are named over a fixed width, the unused entries naming no block: the
window widens by a block every few steps until stage 0 runs again, and one capture then serves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Hashable

import torch

from ihip_compile.kernels.block_bank import repeats
from ihip_compile.kernels.replayed_work import padded_size

# Window blocks are named in widths of a multiple of this.
WINDOW_BLOCKS_STEP = 8


@dataclass
class NamedBlocks:
    """Blocks per row ``name(*inputs)`` -> [B, N] (-1: none, each block once per row), made
    by device ops only; ``key`` names everything they bake in, input shapes included."""

    name: Callable[..., torch.Tensor]
    key: Hashable
    inputs: tuple
    n: int  # B * N

    def ids(self) -> torch.Tensor:
        return self.name(*self.inputs)


def distinct_blocks(parts: list[torch.Tensor]) -> torch.Tensor:
    """Union of block lists per row ([B, *] each, -1 = none) as [B, N], N the parts' total
    width: each block once, -1 in the other entries (nothing is read for them). Worked out on
    the device, with no host sync, so the host keeps queueing the next layers' work."""
    ids = torch.cat(parts, dim=1).long().sort(dim=1).values
    return torch.where(repeats(ids), -1, ids)


def chunk_blocks(starts: torch.Tensor, chunk: int, block_tokens: int) -> torch.Tensor:
    """Blocks covering chunks that start at ``starts`` [B, ...] (-1 = empty): [B, *].

    Selections per KV head ([B, H_KV, NQB, N]) give the union over heads: a bank block carries
    every KV head of its tokens."""
    per_chunk = torch.arange(max(1, chunk // block_tokens), device=starts.device)
    blocks = starts.long()[..., None] // block_tokens + per_chunk
    blocks = torch.where(starts[..., None] < 0, -1, blocks)
    return blocks.flatten(1)


def kept_chunk_blocks(candidates: torch.Tensor, chunk: int, block_tokens: int) -> NamedBlocks:
    """The distinct blocks covering the chunks of ``chunk`` tokens starting at ``candidates``
    [B, ...] (a pruning stage's kept chunks, -1: none): what the next stage scores."""
    def name(starts):
        return distinct_blocks([chunk_blocks(starts, chunk, block_tokens)])

    key = ("kept_chunks", tuple(candidates.shape), candidates.dtype, chunk, block_tokens)
    return NamedBlocks(name, key, (candidates,), candidates.numel() * max(1, chunk // block_tokens))


def attended_blocks(selected: torch.Tensor, sink_blocks: int, window_blocks: tuple[int, int]
                    ) -> NamedBlocks:
    """The distinct blocks a decode step attends per row: the first ``sink_blocks`` (the
    sinks), ``selected`` [B, ...] (-1: none) and the window's blocks ``window_blocks`` (first,
    last), named over a width of a multiple of ``WINDOW_BLOCKS_STEP``."""
    b = selected.shape[0]
    lo, hi = window_blocks
    width = padded_size(hi - lo + 1, WINDOW_BLOCKS_STEP)

    def name(chosen, first, last):
        device = chosen.device
        window = torch.arange(width, device=device) + first
        window = torch.where(window > last, -1, window)
        return distinct_blocks([torch.arange(sink_blocks, device=device).expand(b, -1),
                                chosen.flatten(1).long(), window.expand(b, -1)])

    key = ("attended", tuple(selected.shape), selected.dtype, sink_blocks, width)
    per_row = sink_blocks + selected[0].numel() + width
    return NamedBlocks(name, key, (selected, lo, hi), b * per_row)
