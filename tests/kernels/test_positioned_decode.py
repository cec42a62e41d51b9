"""Positioned selections: the gather-and-rotate kernel and the decode kernel that reads them,
against their references, and the references against ``sparse_decode_ref`` (their meaning)."""

import pytest
import torch

from ihip_compile.kernels.positioned_decode_ref import positioned_decode_ref
from ihip_compile.kernels.positioned_kv_ref import position_selected_kv_ref
from ihip_compile.kernels.sparse_decode_ref import sparse_decode_ref
from tests.helpers import assert_matches_reference
from tests.kernels.conftest import DEVICE


def _inv_freq(rotary_dim):
    exps = torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim
    return (1.0 / 10000 ** exps).to(DEVICE)


def _case(batch, heads, kv_heads, s_k, d, dtype, seed, topk=40):
    """Random q/k/v and per row a sorted block list: row 1 has empty entries and a block
    among the sinks (never shown), so the rows also differ in their count of valid blocks."""
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(batch, n, s, d, generator=gen).to(DEVICE, dtype)
               for n, s in ((heads, 1), (kv_heads, s_k), (kv_heads, s_k), ))
    rows = []
    for row in range(batch):
        blocks = torch.randperm(s_k // 8 - 40, generator=gen)[:topk].sort().values
        if row % 2:
            blocks[0] = 0
            blocks = torch.where(torch.arange(topk) < topk - 9, blocks, -1)
        rows.append(blocks)
    return q, k, v, torch.stack(rows).view(batch, 1, topk).to(DEVICE, torch.int32)


def _positions(batch, first):
    return (first - 10 * torch.arange(batch)).view(batch, 1).to(DEVICE)


def _chain_ref(q, k, v, blocks, p0, p1, *, window0, window1, **kw):
    positioned = position_selected_kv_ref(k, v, blocks, p0, window_tokens=window0,
                                          **_rope_only(kw))
    return positioned_decode_ref(q, k, v, positioned, p1, window_tokens=window1, **kw)


def _chain(q, k, v, blocks, p0, p1, *, window0, window1, num_splits=None, tile_slots=32, **kw):
    from ihip_compile.kernels.positioned_decode import positioned_decode
    from ihip_compile.kernels.positioned_kv import position_selected_kv

    positioned = position_selected_kv(k, v, blocks, p0, window_tokens=window0, **_rope_only(kw))
    return positioned_decode(q, k, v, positioned, p1, window_tokens=window1,
                             num_splits=num_splits, tile_slots=tile_slots, **kw)


def _rope_only(kw):
    return {n: kw[n] for n in ("sink_tokens", "inv_freq", "rotary_dim", "rope_layout")}


@pytest.mark.parametrize("layout,rotary_dim,d", [(1, 32, 32), (2, 32, 32), (1, 16, 24)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_positioning_matches_reference(layout, rotary_dim, d, dtype):
    from ihip_compile.kernels.positioned_kv import position_selected_kv

    _, k, v, blocks = _case(2, 2, 2, 1400, d, dtype, seed=layout + d)
    kw = dict(sink_tokens=5, window_tokens=64, inv_freq=_inv_freq(rotary_dim),
              rotary_dim=rotary_dim, rope_layout=layout)
    p0 = _positions(2, 1300)
    got, want = position_selected_kv(k, v, blocks, p0, **kw), position_selected_kv_ref(
        k, v, blocks, p0, **kw)
    assert torch.equal(got.keys, want.keys) and torch.equal(got.win_lo, want.win_lo)
    assert torch.equal(got.v, want.v) and got.sinks == want.sinks == 5
    assert_matches_reference(got.k, lambda kk: position_selected_kv_ref(
        kk, v.to(kk.dtype), blocks, p0, **kw).k, k)
    # Empty blocks, and the keys of block 0 that are sinks (0-4; 5-7 are shown as selected).
    assert (got.keys[1] == -1).sum() == 9 * 8 + 5


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (3, 1), (8, 2), (8, 1)])
@pytest.mark.parametrize("window0,window1,advance", [
    (64, 64, 0), (64, 80, 16), (64, 64, 9), (0, 0, 3), (150, 150, 0)])
def test_decode_matches_reference(heads, kv_heads, window0, window1, advance):
    """Steps after the positioning: the window widened by the steps since (the op's cached
    steps, where it stays put), a window that moved (the query turns), no window, and a
    window longer than a split."""
    q, k, v, blocks = _case(2, heads, kv_heads, 1400, 32, torch.float32, seed=heads + advance)
    kw = dict(scale=0.2, sink_tokens=5, inv_freq=_inv_freq(32), rotary_dim=32, rope_layout=1,
              softcap=3.0 if heads == 3 else 0.0)
    p0 = _positions(2, 1300)
    p1 = p0 + advance
    out = _chain(q, k, v, blocks, p0, p1, window0=window0, window1=window1, num_splits=3,
                 tile_slots=16 if heads == 8 else 32, **kw)
    assert_matches_reference(out, _chain_ref, q, k, v, blocks, p0, p1, window0=window0,
                             window1=window1, **kw)


@pytest.mark.parametrize("window0,window1,advance", [(64, 80, 16), (64, 64, 9), (0, 0, 3)])
def test_reference_is_sparse_decode_with_renumbering(window0, window1, advance):
    q, k, v, blocks = _case(2, 4, 2, 1400, 32, torch.float64, seed=advance)
    kw = dict(scale=0.2, sink_tokens=5, inv_freq=_inv_freq(32), rotary_dim=32, rope_layout=1)
    p0 = _positions(2, 1300)
    got = _chain_ref(q, k, v, blocks, p0, p0 + advance, window0=window0, window1=window1, **kw)
    want = sparse_decode_ref(q, k, v, blocks, p0 + advance, window_tokens=window1, remap=True,
                             **kw)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-12)


def test_a_step_with_another_sink_layout_is_refused():
    q, k, v, blocks = _case(1, 2, 2, 400, 16, torch.float32, seed=0, topk=4)
    blocks = blocks.clamp(max=2)
    kw = dict(sink_tokens=16, inv_freq=_inv_freq(16), rotary_dim=16, rope_layout=1)
    at_9 = torch.tensor([9], device=DEVICE)
    positioned = position_selected_kv_ref(k[:, :, :10], v[:, :, :10], blocks, at_9,
                                          window_tokens=4, **kw)
    with pytest.raises(ValueError, match="sink slots"):
        positioned_decode_ref(q, k[:, :, :11], v[:, :, :11], positioned, scale=0.2,
                              window_tokens=4, **kw)
    with pytest.raises(ValueError, match="one query token"):
        positioned_decode_ref(q.expand(1, 2, 2, 16), k[:, :, :10], v[:, :, :10], positioned,
                              scale=0.2, window_tokens=4, **kw)
    with pytest.raises(ValueError, match="block_indices"):
        position_selected_kv_ref(k, v, blocks.view(1, 4), at_9, window_tokens=4, **kw)
    with pytest.raises(ValueError, match="one device"):
        position_selected_kv_ref(k, v, blocks, at_9.to("meta"), window_tokens=4, **kw)
    from ihip_compile.kernels.positioned_decode import positioned_decode
    with pytest.raises(ValueError, match="tile_slots"):
        positioned_decode(q, k[:, :, :10], v[:, :, :10], positioned, scale=0.2, window_tokens=4,
                          tile_slots=24, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_bf16_positioned_decode_matches_reference_on_gpu(head_dim):
    q, k, v, blocks = _case(1, 32, 8, 6000, head_dim, torch.bfloat16, seed=head_dim, topk=64)
    kw = dict(scale=head_dim ** -0.5, sink_tokens=64, inv_freq=_inv_freq(head_dim),
              rotary_dim=head_dim, rope_layout=1)
    p0 = _positions(1, 5900)
    for window1, advance in ((256, 0), (260, 4), (256, 7)):
        out = _chain(q, k, v, blocks, p0, p0 + advance, window0=256, window1=window1, **kw)
        assert_matches_reference(out, _chain_ref, q, k, v, blocks, p0, p0 + advance,
                                 window0=256, window1=window1, **kw)
