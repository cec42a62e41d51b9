"""A bank whose reads replay as CUDA graphs against one that launches them (CUDA only).

The two banks get the same random reads, with repeated read sizes so that most reads replay a
capture (sizes padded to one capture's size among them); after every read their tables, clocks,
counts and contents must be equal, and so must what each read returned. Fetches whose blocks
are named by device work (``named_blocks``) replay the naming too, and must leave the bank as
fetches of the same blocks named beforehand.
"""

import pytest
import torch

from ihip_compile.kernels.block_bank import SIZE_STEP, BlockBank
from ihip_compile.kernels.named_blocks import attended_blocks, kept_chunk_blocks

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")

N_BLOCKS, SHAPE = 64, (2, 8, 16)


def _bank(n_slots: int, pool) -> BlockBank:
    return BlockBank(n_slots=n_slots, n_blocks=N_BLOCKS, block_shapes={"keys": SHAPE},
                     dtype=torch.bfloat16, device=torch.device("cuda"), graph_pool=pool)


def _state(bank: BlockBank) -> list[torch.Tensor]:
    return [bank.slot_of_block, bank.block_of_slot, bank.last_used, bank._clock,
            bank._read_counts, bank.tensors["keys"]]


@pytest.mark.parametrize("n_slots", [3, 16])
def test_graphed_admissions_equal_launched_ones(n_slots):
    host = torch.randn((N_BLOCKS, *SHAPE), dtype=torch.bfloat16).pin_memory()
    graphed = _bank(n_slots, torch.cuda.graph_pool_handle())
    launched = _bank(n_slots, None)
    g = torch.Generator().manual_seed(n_slots)
    # Fewer, as many and more blocks than slots (one padded size), and two larger sizes.
    sizes = [1, n_slots, 2 * n_slots + 1, SIZE_STEP + 6, 2 * SIZE_STEP + 2]
    padded = {-(-n // SIZE_STEP) for n in sizes}
    for step in range(40):
        n = sizes[step % len(sizes)]
        ids = torch.randint(-1, N_BLOCKS, (n,), generator=g).cuda()
        got = graphed.read(ids, {"keys": host}, torch.bfloat16)["keys"]
        want = launched.read(ids, {"keys": host}, torch.bfloat16)["keys"]
        assert torch.equal(got, want)
        for a, b in zip(_state(graphed), _state(launched)):
            assert torch.equal(a, b)
    assert (graphed.hits, graphed.misses) == (launched.hits, launched.misses)
    graphs = graphed.replayed
    assert graphs.failure is None
    assert graphs.captures == len(padded)
    assert graphs.replays == 40 - len(padded)  # each size's first read runs the ops as they are


@pytest.mark.parametrize("n_slots", [3, 16])
def test_graphed_fetches_equal_launched_reads(n_slots):
    """A fetch (misses copied host to slot, nothing returned) through replayed admissions leaves
    the bank as a read with launched admissions does; a fetch too large for the slots does
    nothing, and the blocks are read instead."""
    host = torch.randn((N_BLOCKS, *SHAPE), dtype=torch.bfloat16).pin_memory()
    graphed = _bank(n_slots, torch.cuda.graph_pool_handle())
    launched = _bank(n_slots, None)
    g = torch.Generator().manual_seed(100 + n_slots)
    sizes = [1, n_slots, 2 * n_slots + 1, n_slots - 1]
    for step in range(24):
        n = sizes[step % len(sizes)]
        ids = torch.randint(-1, N_BLOCKS, (n,), generator=g).cuda()
        if not graphed.fetch(ids, {"keys": host}):
            assert n > n_slots
            graphed.read(ids, {"keys": host}, torch.bfloat16)
        launched.read(ids, {"keys": host}, torch.bfloat16)
        for a, b in zip(_state(graphed), _state(launched)):
            assert torch.equal(a, b), step
    assert graphed.replayed.replays > 0


def test_named_fetches_replay_the_naming_with_the_read():
    """Decode refreshes' reads: the blocks of kept chunks, and the sinks, selection and a
    widening window. Replayed with their naming, they leave the bank as fetches of the same
    blocks named as they are; a held count replays too, and counts as the plain one does."""
    host = torch.randn((N_BLOCKS, *SHAPE), dtype=torch.bfloat16).pin_memory()
    graphed = _bank(40, torch.cuda.graph_pool_handle())
    launched = _bank(40, None)
    g = torch.Generator().manual_seed(5)
    for step in range(12):
        chunks = torch.randint(0, N_BLOCKS // 4, (1, 1, 1, 6), generator=g) * 32
        chunks[..., -1] = -1
        selected = torch.randint(-1, N_BLOCKS, (1, 1, 1, 9), generator=g, dtype=torch.int32)
        last = 40 + step // 3  # the window widens by a block every few steps
        for named in (kept_chunk_blocks(chunks.cuda(), 32, 8),
                      attended_blocks(selected.cuda(), 2, (35, last))):
            assert graphed.fetch_named(lambda *x: named.name(*x).reshape(-1), named.key,
                                       named.inputs, named.n, {"keys": host})
            assert launched.fetch(named.ids().reshape(-1), {"keys": host})
            for a, b in zip(_state(graphed), _state(launched)):
                assert torch.equal(a, b), step
        held = kept_chunk_blocks(chunks.cuda(), 32, 8)
        graphed.count_held_named(lambda c: held.name(c).reshape(-1), held.key, held.inputs)
        launched.count_held(held.ids().reshape(-1))
        assert torch.equal(graphed._read_counts, launched._read_counts)
    assert graphed.replayed.failure is None
    assert graphed.replayed.captures == 4  # kept chunks, two window widths, the held count
    assert graphed.replayed.replays > 20
