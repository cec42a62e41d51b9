"""The blocks a decode read names (``named_blocks``) against sets worked out on the host, and a
bank's fetch of named blocks against a fetch of the same blocks named beforehand."""

import pytest
import torch

from ihip_compile.kernels.block_bank import BlockBank
from ihip_compile.kernels.named_blocks import (
    WINDOW_BLOCKS_STEP, attended_blocks, kept_chunk_blocks,
)


def _rows(ids: torch.Tensor) -> list[list[int]]:
    """Each row's named blocks, checked to be named once each (the rest -1)."""
    rows = []
    for row in ids.tolist():
        named = [b for b in row if b >= 0]
        assert len(named) == len(set(named)), row
        rows.append(sorted(named))
    return rows


@pytest.mark.parametrize("chunk", [8, 32, 256])
def test_kept_chunk_blocks_cover_each_kept_chunk_once(chunk):
    g = torch.Generator().manual_seed(chunk)
    bk = 8
    starts = torch.randint(0, 50, (2, 3, 1, 5), generator=g, dtype=torch.int32) * chunk
    starts[0, 1, 0, 2:] = -1  # a head that kept fewer chunks
    named = kept_chunk_blocks(starts, chunk, bk)
    ids = named.ids()
    assert ids.shape[0] * ids.shape[1] == named.n
    for row, got in zip(starts.tolist(), _rows(ids)):
        flat = [s for head in row for block in head for s in block]
        want = {s // bk + j for s in flat if s >= 0 for j in range(chunk // bk)}
        assert got == sorted(want)


@pytest.mark.parametrize("window", [(30, 30), (12, 40), (5, 11)])
def test_attended_blocks_are_the_sinks_the_selection_and_the_window(window):
    g = torch.Generator().manual_seed(window[1])
    selected = torch.randint(-1, 60, (3, 2, 1, 7), generator=g, dtype=torch.int32)
    named = attended_blocks(selected, 3, window)
    ids = named.ids()
    width = -(-(window[1] - window[0] + 1) // WINDOW_BLOCKS_STEP) * WINDOW_BLOCKS_STEP
    assert ids.shape == (3, 3 + 14 + width)
    assert named.n == ids.numel()
    for row, got in zip(selected.tolist(), _rows(ids)):
        want = set(range(3)) | set(range(window[0], window[1] + 1))
        want |= {b for head in row for block in head for b in block if b >= 0}
        assert got == sorted(want)


def test_a_named_fetch_leaves_the_bank_as_a_fetch_of_its_blocks():
    shape = (2, 4, 3)
    host = {"keys": torch.randn((64, *shape), generator=torch.Generator().manual_seed(3))}
    named_bank, plain_bank = (BlockBank(n_slots=30, n_blocks=64, block_shapes={"keys": shape},
                                        dtype=torch.float32, device=torch.device("cpu"))
                              for _ in range(2))
    g = torch.Generator().manual_seed(4)
    for step in range(6):
        selected = torch.randint(-1, 64, (1, 1, 1, 8), generator=g, dtype=torch.int32)
        named = attended_blocks(selected, 2, (40 + step, 46 + step))
        assert named_bank.fetch_named(lambda *x: named.name(*x).reshape(-1), named.key,
                                      named.inputs, named.n, host)
        assert plain_bank.fetch(named.ids().reshape(-1), host)
        for a, b in ((named_bank.slot_of_block, plain_bank.slot_of_block),
                     (named_bank.last_used, plain_bank.last_used),
                     (named_bank.tensors["keys"], plain_bank.tensors["keys"])):
            assert torch.equal(a, b)
        assert (named_bank.hits, named_bank.misses) == (plain_bank.hits, plain_bank.misses)
    too_many = attended_blocks(selected, 2, (0, 40))
    assert not named_bank.fetch_named(too_many.name, too_many.key, too_many.inputs,
                                      too_many.n, host)
