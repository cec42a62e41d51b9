"""The blocks a layer's last offloaded decode step attended, known to sit in its attention bank.

Between selection refreshes a decode step attends the same blocks as the step before: the same
selection, sinks and window, unless the window entered a new block. The attention bank of a layer
is read by that layer's decode only, and blocks are written through, so after a read that left
every block resident (``BlockBank.last_read_resident``) and with no slot changing hands since
(``BlockBank.admissions``), the same slots still hold those blocks, newest tokens included. Such a
step attends them in the bank's slots (``bank_kv``) with no read, no host sync and no lookup; any
other step (a refresh, a new window block, a full bank, a prefill in between) reads through the
bank as usual and records a new plan.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ihip_compile.kernels.block_bank import BlockBank


@dataclass
class ResidentBlocks:
    """A layer's attended blocks, all in its attention bank when recorded."""

    selection: torch.Tensor  # held, so its memory is not reused: same data_ptr = same selection
    window_blocks: tuple[int, int]  # first and last block of the attended window
    counted: int  # entries of the read (blocks named, some maybe twice), counted as hits
    bank: BlockBank
    admissions: int  # the bank's count when recorded

    def still_serves(self, selection: torch.Tensor, window_blocks: tuple[int, int],
                     bank: BlockBank) -> bool:
        """True when this step attends exactly these blocks and the slots still hold them."""
        return (bank is self.bank and bank.admissions == self.admissions
                and window_blocks == self.window_blocks
                and selection.data_ptr() == self.selection.data_ptr()
                and selection.shape == self.selection.shape
                and selection.stride() == self.selection.stride())


def window_first_key(first_query: int, window: int, sink: int) -> int:
    """First key of the sliding window of queries from key index ``first_query`` on (``window``
    keys each, never into the ``sink`` sinks)."""
    return max(sink, first_query - window + 1)


def record(selection: torch.Tensor, window_blocks: tuple[int, int], counted: int,
           bank: BlockBank) -> ResidentBlocks | None:
    """The plan of a read that just went through ``bank``; None if it left some block out."""
    if not bank.last_read_resident:
        return None
    return ResidentBlocks(selection, window_blocks, counted, bank, bank.admissions)
