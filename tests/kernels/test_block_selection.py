"""Hierarchical block selection: Triton stages equal the reference stages, the output is well
formed, a budget covering every key selects every candidate block, planted needles are found,
and a cached stage output restarts the chain exactly."""

import math

import pytest
import torch

from ihip_compile.kernels.block_selection import select_blocks
from tests.kernels.conftest import DEVICE

STAGES = dict(stage_chunks=(32, 16, 8), stage_keeps=(128, 64, 32), selected_tokens=32)


def _qk(heads, kv_heads, s_q, s_k, dtype=torch.float32, seed=0, d=32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, s_q, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(1, kv_heads, s_k, d, generator=gen).to(DEVICE, dtype)
    return q, k, torch.arange(s_k - s_q, s_k, device=DEVICE)


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (3, 1), (4, 1), (8, 1)])
@pytest.mark.parametrize("s_q", [1, 19])
def test_triton_selection_equals_reference(heads, kv_heads, s_q):
    q, k, pos = _qk(heads, kv_heads, s_q, 203, seed=heads + s_q)
    kw = dict(block_size_q=16, sink_tokens=5, window_tokens=11, **STAGES)
    got = select_blocks(q, k, pos, use_triton=True, **kw)
    want = select_blocks(q, k, pos, use_triton=False, **kw)
    assert torch.equal(got, want)


def test_output_is_sorted_unique_and_inside_the_candidate_range():
    q, k, pos = _qk(4, 2, 37, 301, seed=3)
    sink, window = 6, 13
    blocks = select_blocks(q, k, pos, block_size_q=16, sink_tokens=sink, window_tokens=window,
                           use_triton=False, **STAGES)
    assert blocks.shape == (1, 3, 4) and blocks.dtype == torch.int32
    for qb, row in enumerate(blocks[0].tolist()):
        valid = [x for x in row if x >= 0]
        assert row == valid + [-1] * (len(row) - len(valid)), "-1 slots must come last"
        assert valid == sorted(set(valid)), "blocks sorted and unique"
        last_pos = int(pos[min(qb * 16 + 15, 36)])
        for blk in valid:  # overlaps [sink, last_pos - window + 1)
            assert blk * 8 + 8 > sink and blk * 8 < last_pos - window + 1


@pytest.mark.parametrize("use_triton", [False, True])
def test_budget_covering_all_keys_selects_every_candidate_block(use_triton):
    q, k, pos = _qk(3, 1, 1, 150, seed=5)
    blocks = select_blocks(q, k, pos, block_size_q=16, sink_tokens=5, window_tokens=13,
                           stage_chunks=(32, 8), stage_keeps=(1024, 1024), selected_tokens=1024,
                           use_triton=use_triton)
    end = 150 - 13  # window of the query at 149 starts at 137
    assert [x for x in blocks[0, 0].tolist() if x >= 0] == list(range(0, math.ceil(end / 8)))


def _plant_needle(q, k, center, width, strength, block_rows):
    """Keys around ``center`` turn towards the query block's mean direction, peaking at center."""
    heads, kv_heads = q.shape[1], k.shape[1]
    group = heads // kv_heads
    j = torch.arange(k.shape[2], device=k.device, dtype=torch.float32)
    bump = torch.exp(-(((j - center) / width) ** 2))
    for g in range(kv_heads):
        direction = q[0, g * group:(g + 1) * group, block_rows].float().mean((0, 1))
        direction = direction / direction.norm()
        k[0, g] += (strength * bump[:, None] * direction).to(k.dtype)


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("key_dtype", [None, torch.float8_e4m3fn])
def test_planted_needles_are_always_found(use_triton, key_dtype):
    # key_dtype: the keys scored as rounded to it (``fp8_pruning_keys``), the needles the same.
    d, s_k, s_q = 32, 2048, 16
    sink, window = 16, 64
    gen = torch.Generator().manual_seed(11)
    centers = [sink + 3, 300, 777, 1001, 1500, s_k - window - 9] if not use_triton else [520, 1801]
    for trial, center in enumerate(centers):
        direction = torch.randn(d, generator=gen)
        direction = 4 * direction / direction.norm()
        q = (direction + 0.5 * torch.randn(1, 4, s_q, d, generator=gen)).to(DEVICE)
        k = torch.randn(1, 2, s_k, d, generator=gen).to(DEVICE)
        _plant_needle(q, k, center, width=24.0, strength=12.0, block_rows=slice(0, s_q))
        if key_dtype is not None:
            k = k.to(key_dtype).to(q.dtype)
        pos = torch.arange(s_k - s_q, s_k, device=DEVICE)
        blocks = select_blocks(q, k, pos, block_size_q=16, sink_tokens=sink, window_tokens=window,
                               stage_chunks=(64, 16, 8), stage_keeps=(512, 128, 64),
                               selected_tokens=64, use_triton=use_triton)
        assert center // 8 in blocks[0, 0].tolist(), f"needle at {center} missed (trial {trial})"


def test_restart_from_cached_stage_equals_full_run():
    q, k, pos = _qk(4, 1, 1, 400, seed=9)
    kw = dict(block_size_q=16, sink_tokens=4, window_tokens=16, use_triton=False, **STAGES)
    full, stages = select_blocks(q, k, pos, return_stages=True, **kw)
    assert len(stages) == 3
    for start in (1, 2):
        again, tail = select_blocks(q, k, pos, start_stage=start, candidates=stages[start - 1],
                                    return_stages=True, **kw)
        assert torch.equal(again, full) and len(tail) == 3 - start
    # Stopping early gives the same stages so far; their last output restarts the rest.
    _, head = select_blocks(q, k, pos, end_stage=2, return_stages=True, **kw)
    assert len(head) == 2 and all(torch.equal(a, b) for a, b in zip(head, stages))


@pytest.mark.parametrize("use_triton", [False, True])
def test_a_prompts_last_query_block_is_selected_as_a_single_block(use_triton):
    # 128-key first chunks: a single block probes 16 keys of each (the probe floor), a block
    # of a longer call 8. The queries that end a prompt (its question) get the floor too.
    q, k, pos = _qk(4, 2, 150, 2000, seed=11)
    kw = dict(block_size_q=64, sink_tokens=4, window_tokens=16, use_triton=use_triton,
              stage_chunks=(128, 16, 8), stage_keeps=(256, 64, 32), selected_tokens=32)
    whole = select_blocks(q, k, pos, **kw)
    assert whole.shape[1] == 3
    # The last block holds 22 queries: it and the block before it hold the last 64.
    for lo, hi in ((64, 128), (128, 150)):
        alone = select_blocks(q[:, :, lo:hi], k, pos[lo:hi], **kw)
        assert torch.equal(whole[:, lo // 64: lo // 64 + 1], alone)
    # The first block keeps its own selection: the first two blocks' run (whole blocks)
    # re-selects only its last one.
    first_two = select_blocks(q[:, :, :128], k, pos[:128], **kw)
    assert torch.equal(whole[:, :1], first_two[:, :1])
    _, stages = select_blocks(q, k, pos, return_stages=True, **kw)
    assert stages[-1].shape[1] == 3  # the cached-stage path is unchanged


@pytest.mark.parametrize("bad,match", [
    (dict(stage_chunks=(32, 12), stage_keeps=(64, 48)), "power of two"),
    (dict(stage_chunks=(8, 32), stage_keeps=(64, 64)), "shrink"),
    (dict(stage_chunks=(32,), stage_keeps=(64, 32)), "same non-zero length"),
    (dict(selected_tokens=12), "selected_tokens"),
    (dict(start_stage=1), "candidates"),
    (dict(end_stage=0), "end_stage"),
    (dict(end_stage=4), "end_stage"),
])
def test_bad_stage_arguments_are_rejected(bad, match):
    q, k, pos = _qk(2, 1, 1, 100)
    kw = dict(block_size_q=16, sink_tokens=4, window_tokens=8, use_triton=False, **STAGES)
    kw.update(bad)
    with pytest.raises(ValueError, match=match):
        select_blocks(q, k, pos, **kw)


def test_first_split_finds_narrow_needles_between_halving_probes():
    """A bump centred on a 64-key chunk's boundary is 16 keys from the plain halving's first
    probes (offsets 16 and 48) but at most 4 from an 8-way first split's (offsets 4, 12, ...)."""
    d, s_k, s_q = 32, 2048, 1
    gen = torch.Generator().manual_seed(21)
    for center in (256, 640, 1024, 1536):
        direction = torch.randn(d, generator=gen)
        q = (4 * direction / direction.norm() + 0.5 * torch.randn(1, 4, s_q, d, generator=gen))
        k = torch.randn(1, 2, s_k, d, generator=gen)
        _plant_needle(q, k, center, width=5.0, strength=12.0, block_rows=slice(0, s_q))
        pos = torch.tensor([s_k - 1])
        blocks = select_blocks(q, k, pos, sink_tokens=16, window_tokens=64,
                               stage_chunks=(64, 16, 8), stage_keeps=(512, 128, 64),
                               selected_tokens=64, first_probes=8, use_triton=False)
        assert {center // 8 - 1, center // 8} & set(blocks[0, 0].tolist()), center
