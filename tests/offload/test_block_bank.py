"""The block bank's device-side bookkeeping against what an LRU bank must guarantee.

Random reads (duplicates, reads larger than the bank) through a small bank; after each read the
tables agree with each other and with the bank's contents, the counts match a host-side model of
which blocks were resident, every block of a read that fits is resident after it, and no block
was evicted while an older untouched one stayed.
"""

import gc
import weakref

import pytest
import torch

from ihip_compile.kernels.block_bank import BlockBank

N_BLOCKS, SHAPE = 40, (2, 4, 3)


def _host(seed: int) -> torch.Tensor:
    return torch.randn((N_BLOCKS, *SHAPE), generator=torch.Generator().manual_seed(seed))


def _resident(bank: BlockBank) -> dict[int, int]:
    """block -> slot, from block_of_slot, checked against slot_of_block."""
    held = {int(b): s for s, b in enumerate(bank.block_of_slot.tolist()) if b >= 0}
    for block, slot in held.items():
        assert int(bank.slot_of_block[block]) == slot
    assert int((bank.slot_of_block >= 0).sum()) == len(held)
    return held


@pytest.mark.parametrize("n_slots", [1, 5, 12])
def test_random_reads_keep_the_tables_consistent_and_evict_least_recently_used(n_slots):
    host = _host(n_slots)
    bank = BlockBank(n_slots=n_slots, n_blocks=N_BLOCKS, block_shapes={"keys": SHAPE},
                     dtype=host.dtype, device=torch.device("cpu"))
    g = torch.Generator().manual_seed(100 + n_slots)
    last_read = {}  # block -> index of the last read that named it
    for step in range(30):
        n = int(torch.randint(1, 2 * n_slots + 3, (), generator=g))
        ids = torch.randint(0, N_BLOCKS, (n,), generator=g)
        before = _resident(bank)
        hits0, misses0 = bank.hits, bank.misses
        got = bank.read(ids, {"keys": host}, host.dtype)["keys"]
        assert torch.equal(got, host[ids])
        distinct = set(ids.tolist())
        assert bank.hits - hits0 == len(distinct & before.keys())
        assert bank.misses - misses0 == len(distinct - before.keys())
        for block in distinct:
            last_read[block] = step
        after = _resident(bank)
        for block, slot in after.items():
            assert torch.equal(bank.tensors["keys"][slot], host[block])
        assert len(after) == min(n_slots, len(before.keys() | distinct))
        assert bank.last_read_resident == (n <= n_slots)
        if n <= n_slots:
            assert distinct <= after.keys()
        evicted = before.keys() - after.keys()
        kept_untouched = (before.keys() & after.keys()) - distinct
        if evicted and kept_untouched:
            assert max(last_read[b] for b in evicted) <= min(last_read[b] for b in kept_untouched)
        assert not evicted & distinct


def test_a_bank_with_replayed_reads_is_freed_as_soon_as_it_is_dropped():
    """Its replayed reads (``replayed_work``) keep no reference back to the bank: no reference
    cycle keeps the bank's device memory until Python's cycle collector runs (no graph is
    captured here)."""
    gc.disable()
    try:
        bank = BlockBank(n_slots=4, n_blocks=N_BLOCKS, block_shapes={"keys": SHAPE},
                         dtype=torch.float32, device=torch.device("cpu"), graph_pool=object())
        alive = weakref.ref(bank)
        del bank
        assert alive() is None
    finally:
        gc.enable()


@pytest.mark.parametrize("dtype", [torch.float32, torch.float8_e4m3fn])
def test_fetch_leaves_the_bank_as_a_read_does(dtype):
    """Two banks take the same random reads, one by ``read``, one by ``fetch``: the tables, the
    counts and every resident block agree bit for bit. A fetch naming more blocks than the slots
    does nothing and says so; the reading bank then reads them, and the two go on agreeing."""
    host = _host(7).to(dtype)
    banks = [BlockBank(n_slots=6, n_blocks=N_BLOCKS, block_shapes={"keys": SHAPE},
                       dtype=dtype, device=torch.device("cpu")) for _ in range(2)]
    read, fetched = banks
    g = torch.Generator().manual_seed(8)
    for _ in range(25):
        n = int(torch.randint(0, 9, (), generator=g))
        ids = torch.randint(-1, N_BLOCKS, (n,), generator=g)
        read.read(ids, {"keys": host}, dtype)
        fits = fetched.fetch(ids, {"keys": host})
        assert fits == (n <= 6)
        if not fits:
            fetched.read(ids, {"keys": host}, dtype)
        for name in ("slot_of_block", "block_of_slot", "last_used"):
            assert torch.equal(getattr(read, name), getattr(fetched, name)), name
        assert (read.hits, read.misses) == (fetched.hits, fetched.misses)
        assert fetched.last_read_resident == read.last_read_resident
        for block, slot in _resident(fetched).items():
            assert torch.equal(fetched.tensors["keys"][slot].view(torch.uint8),
                               host[block].view(torch.uint8))
