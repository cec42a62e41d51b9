"""The stage hand-off kernel against its spec: top-k, position sort and split in torch."""

import pytest
import torch

from ihip_compile.kernels.stage_handoff_ref import stage_handoff_ref
from tests.kernels.conftest import DEVICE, record_launches


def _row_inputs(batch, blocks, n, chunk, empty_tail, seed, grid=False):
    """Ascending chunk starts with ``empty_tail`` -1 slots last (scores -inf there), and scores
    with some -inf chunks in the middle (outside a query block's key range)."""
    gen = torch.Generator().manual_seed(seed)
    scores = torch.randn(batch, blocks, n, generator=gen)
    if grid:  # stage 0: one shared grid, expanded
        starts = (torch.arange(n, dtype=torch.int32) * chunk).expand(batch, blocks, n)
    else:  # a later stage: rows of sorted starts, each its own
        gaps = torch.randint(1, 4, (batch, blocks, n), generator=gen, dtype=torch.int32)
        starts = (gaps.cumsum(-1) * chunk).to(torch.int32)
    if empty_tail:
        starts = starts.clone()
        starts[..., n - empty_tail:] = -1
        scores[..., n - empty_tail:] = float("-inf")
    unusable = torch.rand(batch, blocks, n, generator=gen) < 0.2
    scores = scores.masked_fill(unusable, float("-inf"))
    return scores.to(DEVICE), starts.to(DEVICE)


@pytest.mark.parametrize("n,keep,chunk,next_chunk", [
    (4096, 128, 256, 32), (1024, 256, 32, 8), (1000, 37, 16, 4), (257, 256, 8, 8), (13, 5, 64, 64),
])
@pytest.mark.parametrize("grid", [True, False])
def test_handoff_matches_reference(n, keep, chunk, next_chunk, grid):
    from ihip_compile.kernels.stage_handoff import stage_handoff

    scores, starts = _row_inputs(2, 3, n, chunk, empty_tail=n // 7, seed=n + keep, grid=grid)
    got = stage_handoff(scores, starts, keep, chunk, next_chunk)
    want = stage_handoff_ref(scores, starts, keep, chunk, next_chunk)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_last_stage_gives_block_indices():
    from ihip_compile.kernels.stage_handoff import stage_handoff

    scores, starts = _row_inputs(1, 2, 1024, 8, empty_tail=3, seed=5)
    kept, blocks = stage_handoff(scores, starts, 256, 8, 8, block_div=8)
    assert torch.equal(blocks, stage_handoff_ref(scores, starts, 256, 8, 8, block_div=8)[1])
    valid = kept >= 0
    assert torch.equal(blocks[valid], kept[valid] // 8) and (blocks[~valid] == -1).all()


def test_fewer_usable_chunks_than_kept_leave_empty_slots_last():
    from ihip_compile.kernels.stage_handoff import stage_handoff

    _, starts = _row_inputs(1, 1, 64, 32, empty_tail=0, seed=2)
    scores = torch.full((1, 1, 64), float("-inf"), device=DEVICE)
    scores[..., :10] = torch.rand(10).to(DEVICE)  # only 10 usable chunks for 16 places
    kept, children = stage_handoff(scores, starts, 16, 32, 8)
    assert torch.equal(kept[0, 0, :10], starts[0, 0, :10]) and (kept[0, 0, 10:] == -1).all()
    assert (children[0, 0, 40:] == -1).all()


def test_ties_at_the_cut_keep_the_earliest_chunks():
    from ihip_compile.kernels.stage_handoff import stage_handoff

    scores = torch.zeros(1, 1, 40, device=DEVICE)
    scores[..., 30] = 1.0
    starts = (torch.arange(40, dtype=torch.int32) * 8).view(1, 1, 40).to(DEVICE)
    kept, _ = stage_handoff(scores, starts, 4, 8, 8)
    assert kept.tolist() == [[[0, 8, 16, 240]]]


@pytest.mark.parametrize("byte", [0, 1, 2, 3])
def test_scores_that_differ_in_one_byte_only_are_ranked(byte):
    """The cut is found a few bits at a time, highest first: rows whose float bits differ in a
    single byte (the others those of 1.0) rank by that byte alone, whichever it is."""
    from ihip_compile.kernels.stage_handoff import stage_handoff

    gen = torch.Generator().manual_seed(byte)
    finite = [d for d in range(256) if d not in (0x7F, 0xFF)]  # top byte: no inf or NaN
    digits = torch.tensor(finite)[torch.randperm(len(finite), generator=gen)[:200]]
    bits = (0x3F800000 & ~(0xFF << 8 * byte)) | (digits << 8 * byte)
    scores = bits.to(torch.int32).view(torch.float32).view(1, 1, 200).to(DEVICE)
    starts = (torch.arange(200, dtype=torch.int32) * 32).view(1, 1, 200).to(DEVICE)
    got = stage_handoff(scores, starts, 37, 32, 8)
    want = stage_handoff_ref(scores, starts, 37, 32, 8)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


def test_plain_split_keeps_every_non_empty_chunk():
    from ihip_compile.kernels.stage_handoff import stage_handoff

    _, starts = _row_inputs(2, 2, 300, 32, empty_tail=20, seed=9)
    kept, children = stage_handoff(None, starts, 0, 32, 8, keep_kept=False)
    assert kept is None
    assert torch.equal(children, stage_handoff_ref(None, starts, 0, 32, 8)[1])


def test_rows_longer_than_a_tile_match_reference_with_ties_across_tiles():
    """The kernel reads a row a tile at a time: the cut, the ties taken at it (earliest first)
    and the compaction carry across tiles."""
    from ihip_compile.kernels import stage_handoff as module

    n = 2 * module.TILE + 300
    scores, starts = _row_inputs(1, 2, n, 8, empty_tail=50, seed=11)
    got = module.stage_handoff(scores, starts, 700, 8, 8)
    want = stage_handoff_ref(scores, starts, 700, 8, 8)
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    tied = torch.zeros(1, 1, n, device=DEVICE)
    tied[..., -3:] = 1.0  # three best chunks in the last tile, then ties over every tile
    grid = (torch.arange(n, dtype=torch.int32) * 8).view(1, 1, n).to(DEVICE)
    keep = module.TILE + 10
    kept, _ = module.stage_handoff(tied, grid, keep, 8, 8)
    assert kept[0, 0].tolist() == grid[0, 0, :keep - 3].tolist() + grid[0, 0, -3:].tolist()


def test_bad_shapes_are_named():
    from ihip_compile.kernels.stage_handoff import stage_handoff

    scores, starts = _row_inputs(1, 2, 64, 32, empty_tail=0, seed=1)
    with pytest.raises(ValueError, match="scores must be"):
        stage_handoff(scores[..., :10], starts, 8, 32, 8)
    with pytest.raises(ValueError, match="next_chunk must divide"):
        stage_handoff(scores, starts, 8, 32, 12)


def test_rows_of_any_length_launch_one_kernel_variant(monkeypatch):
    """Triton compiles the kernel per set of compile-time arguments: a growing sequence must not
    compile a new variant each time its stage 0 holds more chunks, mid-prompt or mid-generation."""
    from ihip_compile.kernels import stage_handoff as module

    launched = record_launches(monkeypatch, module, "_stage_handoff_kernel")
    for n in (300, 4096, 40_000):
        scores, starts = _row_inputs(1, 1, n, 256, empty_tail=0, seed=n, grid=True)
        module.stage_handoff(scores, starts, 128, 256, 32)
    assert len(launched) == 3 and launched[0] == launched[1] == launched[2]
