"""Decode with the window's first key read on the device (``sparse_decode``'s ``window_start``,
what a replayed decode step uses) equals decode with the window's length, bit for bit; and
splits sized for a wider window (``max_window_tokens``) change nothing beyond rounding."""

import pytest
import torch

from ihip_compile.kernels.block_selection import select_blocks
from ihip_compile.kernels.sparse_decode_ref import sparse_decode_ref
from tests.helpers import assert_matches_reference
from tests.kernels.conftest import DEVICE
from tests.kernels.test_bank_kv_decode import SMALL, _inputs, _paged

INV_FREQ = 1.0 / 10000 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32)


@pytest.mark.parametrize("b,heads,kv_heads,s_k,window,paged", [
    (1, 2, 2, 203, 13, False), (2, 6, 2, 190, 29, True), (2, 3, 1, 77, 70, True),
])
def test_window_start_on_the_device_equals_the_window_length(b, heads, kv_heads, s_k, window,
                                                             paged):
    from ihip_compile.kernels.sparse_decode import sparse_decode

    q, k, v, pos = _inputs(b, heads, kv_heads, s_k, torch.float32, seed=s_k)
    blocks = select_blocks(q, k, pos, sink_tokens=5, window_tokens=window, use_triton=False,
                           **SMALL)
    if paged:
        k, v = _paged(k, v, seed=b)
    kw = dict(scale=0.3, sink_tokens=5, block_size_k=8, remap=True, inv_freq=INV_FREQ.to(DEVICE),
              rotary_dim=32, rope_layout=1, num_splits=3)
    kw["max_window_tokens"] = window + 40  # both split alike, by it
    start = torch.tensor([s_k - window], device=DEVICE)
    # With window_start, window_tokens only sizes the splits: give it a value that would not do.
    from_start = sparse_decode(q, k, v, blocks, pos, window_tokens=1, window_start=start, **kw)
    assert torch.equal(from_start, sparse_decode(q, k, v, blocks, pos, window_tokens=window, **kw))


def test_window_start_before_the_sinks_keeps_the_sinks_once():
    from ihip_compile.kernels.sparse_decode import sparse_decode

    q, k, v, pos = _inputs(1, 4, 2, 60, torch.float32, seed=1)
    blocks = torch.full((1, 1, 2), -1, dtype=torch.int32, device=DEVICE)
    kw = dict(scale=0.3, sink_tokens=16, block_size_k=8)
    got = sparse_decode(q, k, v, blocks, pos, window_tokens=64,
                        window_start=torch.tensor([0], device=DEVICE), **kw)
    assert_matches_reference(got, sparse_decode_ref, q, k, v, blocks, pos, window_tokens=60, **kw)


@pytest.mark.parametrize("max_window", [0, 45, 400])
def test_splits_sized_for_a_wider_window_match_the_reference(max_window):
    from ihip_compile.kernels.sparse_decode import sparse_decode

    q, k, v, pos = _inputs(2, 4, 2, 211, torch.float32, seed=max_window)
    kw = dict(scale=0.3, sink_tokens=5, window_tokens=21, block_size_k=8)
    blocks = select_blocks(q, k, pos, sink_tokens=5, window_tokens=21, use_triton=False,
                           **SMALL)
    got = sparse_decode(q, k, v, blocks, pos, max_window_tokens=max_window, **kw)
    assert_matches_reference(got, sparse_decode_ref, q, k, v, blocks, pos, **kw)
