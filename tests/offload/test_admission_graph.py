"""A bank whose admissions replay as CUDA graphs against one that launches them (CUDA only).

The two banks get the same random reads, with repeated read sizes so that most reads replay a
capture (sizes padded to one capture's size among them); after every read their tables, clocks, counts and contents must be equal, and so must
what each read returned.
"""

import pytest
import torch

from ihip_compile.kernels.admission_graph import SIZE_STEP
from ihip_compile.kernels.block_bank import BlockBank

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
    graphs = graphed._plan_admission
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
    assert graphed._plan_admission.replays > 0
