"""A first pruning stage shared by neighbouring query blocks (``first_stage_blocks``): it is the
stage of one block made of theirs, each block then runs the later stages on its own copy, and a
needle that only one block's queries look for is still found for that block."""

import pytest
import torch

from ihip_compile import IHipConfig, select_blocks as public_select_blocks
from ihip_compile.kernels.block_selection import select_blocks
from ihip_compile.layer_policy import sparse_args_for_layer
from tests.kernels.conftest import DEVICE
from tests.kernels.test_block_selection import STAGES, _qk


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("share,s_q", [(2, 75), (4, 75), (4, 33)])
def test_shared_stage_is_one_grouped_block_then_each_block_alone(use_triton, share, s_q):
    q, k, pos = _qk(4, 2, s_q, 420, seed=share + s_q)
    kw = dict(sink_tokens=5, window_tokens=12, use_triton=use_triton, **STAGES)
    blocks, stages = select_blocks(q, k, pos, block_size_q=16, query_pool=2,
                                   first_stage_blocks=share, return_stages=True, **kw)
    n_blocks = -(-s_q // 16)
    _, grouped = select_blocks(q, k, pos, block_size_q=16 * share, query_pool=2 * share,
                               return_stages=True, **kw)
    assert torch.equal(stages[0], grouped[0].repeat_interleave(share, dim=1)[:, :n_blocks])
    later = select_blocks(q, k, pos, block_size_q=16, query_pool=2, start_stage=1,
                          candidates=stages[0], **kw)
    assert torch.equal(blocks, later)


def test_sharing_changes_nothing_for_one_block_or_one_stage():
    q, k, pos = _qk(4, 1, 1, 300, seed=1)
    kw = dict(block_size_q=16, sink_tokens=4, window_tokens=16, use_triton=False)
    assert torch.equal(select_blocks(q, k, pos, first_stage_blocks=4, **kw, **STAGES),
                       select_blocks(q, k, pos, **kw, **STAGES))
    q, k, pos = _qk(4, 1, 64, 300, seed=2)
    one_stage = dict(stage_chunks=(8,), stage_keeps=(32,), selected_tokens=32)
    assert torch.equal(select_blocks(q, k, pos, first_stage_blocks=4, **kw, **one_stage),
                       select_blocks(q, k, pos, **kw, **one_stage))


def test_a_needle_sought_by_one_block_is_found_for_that_block():
    """Four blocks share stage 0; each block's queries lean towards their own direction, and a
    bump of keys towards it sits at that block's own place in the cache."""
    d, s_k, block, blocks_n = 32, 2048, 16, 4
    sink, window = 16, 64
    gen = torch.Generator().manual_seed(7)
    q = 0.5 * torch.randn(1, 4, block * blocks_n, d, generator=gen)
    k = torch.randn(1, 2, s_k, d, generator=gen)
    centers = [200, 611, 1090, 1700]
    j = torch.arange(s_k, dtype=torch.float32)
    for b, center in enumerate(centers):
        direction = torch.randn(d, generator=gen)
        direction = direction / direction.norm()
        q[0, :, b * block:(b + 1) * block] += 4 * direction
        k[0] += 12.0 * torch.exp(-(((j - center) / 24.0) ** 2))[:, None] * direction
    pos = torch.arange(s_k - block * blocks_n, s_k, device=DEVICE)
    chosen = select_blocks(q.to(DEVICE), k.to(DEVICE), pos, block_size_q=block, sink_tokens=sink,
                           window_tokens=window, stage_chunks=(64, 16, 8),
                           stage_keeps=(768, 128, 64), selected_tokens=64, first_stage_blocks=4,
                           use_triton=False)
    for b, center in enumerate(centers):
        assert center // 8 in chosen[0, b].tolist(), f"block {b} missed its needle at {center}"


def test_bad_share_is_rejected_by_the_kernel_and_the_config():
    q, k, pos = _qk(2, 1, 32, 100, seed=3)
    with pytest.raises(ValueError, match="first_stage_blocks must be a power of two"):
        select_blocks(q, k, pos, block_size_q=16, sink_tokens=4, window_tokens=8,
                      first_stage_blocks=3, use_triton=False, **STAGES)
    for bad in (0, 3, True, 2.0):
        with pytest.raises(ValueError, match="first_stage_query_blocks"):
            IHipConfig(first_stage_query_blocks=bad)


def test_config_option_reaches_the_selection():
    config = IHipConfig.from_options(dict(
        first_stage_query_blocks=2, block_size_q=16, sink_tokens=4, sliding_window_tokens=12,
        selected_tokens=32, stages=[(32, 128), (16, 64), (8, 32)], dense_below_tokens=0))
    assert sparse_args_for_layer(config, 5)["first_stage_blocks"] == 2
    q, k, pos = _qk(4, 2, 64, 400, seed=4)
    got = public_select_blocks(q, k, config=config, layer=5)
    want = select_blocks(q, k, pos, block_size_q=16, sink_tokens=4, window_tokens=12,
                         first_stage_blocks=2, use_triton=q.is_cuda, **STAGES)
    assert torch.equal(got[:, 0], want)
    alone = select_blocks(q, k, pos, block_size_q=16, sink_tokens=4, window_tokens=12,
                          use_triton=q.is_cuda, **STAGES)
    assert not torch.equal(got[:, 0], alone), "the shared stage must change some selection"
