"""Block-sparse attention (prefill kernel and split-K decode kernel) against their references,
dense equality when the selection covers every key, and the RoPE renumbering rule checked
against an independent construction."""

import math

import pytest
import torch
import torch.nn.functional as F

from ihip_compile.kernels.block_selection import select_blocks
from ihip_compile.kernels.block_sparse_attention_ref import block_sparse_attention_ref
from ihip_compile.kernels.rope_delta_ref import rotate_by_delta
from ihip_compile.kernels.sparse_decode_ref import sparse_decode_ref
from tests.helpers import assert_matches_reference
from tests.kernels.conftest import DEVICE

SMALL = dict(stage_chunks=(32, 16, 8), stage_keeps=(64, 32, 32), selected_tokens=32)
ALL_KEYS = dict(stage_chunks=(32, 8), stage_keeps=(4096, 4096), selected_tokens=4096)


def _qkv(heads, kv_heads, s_q, s_k, dtype, seed, d=32):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(1, n, s, d, generator=gen).to(DEVICE, dtype)
               for n, s in ((heads, s_q), (kv_heads, s_k), (kv_heads, s_k)))
    return q, k, v, torch.arange(s_k - s_q, s_k, device=DEVICE).expand(1, s_q)


def _inv_freq(d):
    return (1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)).to(DEVICE)


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (3, 1), (4, 1), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_prefill_matches_reference(heads, kv_heads, dtype):
    from ihip_compile.kernels.block_sparse_attention import block_sparse_attention

    q, k, v, pos = _qkv(heads, kv_heads, 37, 203, dtype, heads)
    blocks = select_blocks(q, k, pos, block_size_q=16, sink_tokens=5, window_tokens=13,
                           use_triton=False, **SMALL)
    kw = dict(scale=0.3, block_size_q=16, sink_tokens=5, window_tokens=13)
    out = block_sparse_attention(q, k, v, pos, blocks, **kw)
    assert_matches_reference(out, block_sparse_attention_ref, q, k, v, pos, blocks, **kw)


@pytest.mark.parametrize("layout,softcap", [(1, 0.0), (2, 4.0)])
def test_prefill_matches_reference_with_remap_and_softcap(layout, softcap):
    from ihip_compile.kernels.block_sparse_attention import block_sparse_attention

    q, k, v, pos = _qkv(4, 2, 20, 157, torch.float32, 3, d=64)
    blocks = select_blocks(q, k, pos, block_size_q=16, sink_tokens=4, window_tokens=9,
                           use_triton=False, **SMALL)
    kw = dict(scale=0.2, block_size_q=16, sink_tokens=4, window_tokens=9, softcap=softcap,
              remap=True, inv_freq=_inv_freq(48), rotary_dim=48, rope_layout=layout)
    out = block_sparse_attention(q, k, v, pos, blocks, **kw)
    assert_matches_reference(out, block_sparse_attention_ref, q, k, v, pos, blocks, **kw)


@pytest.mark.parametrize("head_dim,dtype", [(64, torch.float32), (96, torch.float16),
                                             (32, torch.float32)])
def test_prefill_renumbering_by_halves_matches_reference(head_dim, dtype):
    """rotate_half over the whole head: keys turned as two halves, each the other's partner
    (no partner gather); the same as the per-column rotation and as the reference."""
    from ihip_compile.kernels.block_sparse_attention import (
        block_sparse_attention, rotates_by_halves,
    )

    assert rotates_by_halves(1, head_dim, head_dim)
    assert not rotates_by_halves(2, head_dim, head_dim)  # interleaved pairs
    assert not rotates_by_halves(1, head_dim // 2, head_dim)  # partial rotary
    q, k, v, pos = _qkv(8, 2, 45, 301, dtype, head_dim, d=head_dim)
    blocks = select_blocks(q, k, pos, block_size_q=16, sink_tokens=6, window_tokens=11,
                           use_triton=False, **SMALL)
    blocks[0, 1, -1] = -1  # an empty slot
    kw = dict(scale=0.2, block_size_q=16, sink_tokens=6, window_tokens=11, remap=True,
              inv_freq=_inv_freq(head_dim), rotary_dim=head_dim, rope_layout=1)
    out = block_sparse_attention(q, k, v, pos, blocks, **kw)
    per_column = block_sparse_attention(q, k, v, pos, blocks, split_halves=False, **kw)
    assert_matches_reference(out, block_sparse_attention_ref, q, k, v, pos, blocks, **kw)
    assert_matches_reference(per_column, block_sparse_attention_ref, q, k, v, pos, blocks, **kw)


@pytest.mark.parametrize("heads,kv_heads,per_program", [(8, 2, 2), (8, 2, 4), (16, 2, 8)])
@pytest.mark.parametrize("remap", [False, True])
def test_prefill_heads_sharing_key_tiles_match_reference(heads, kv_heads, per_program, remap):
    from ihip_compile.kernels.block_sparse_attention import block_sparse_attention

    q, k, v, pos = _qkv(heads, kv_heads, 37, 203, torch.float32, heads + per_program, d=48)
    blocks = select_blocks(q, k, pos, block_size_q=16, sink_tokens=5, window_tokens=13,
                           use_triton=False, **SMALL)
    kw = dict(scale=0.3, block_size_q=16, sink_tokens=5, window_tokens=13, remap=remap,
              inv_freq=_inv_freq(48), rotary_dim=48, rope_layout=1)
    out = block_sparse_attention(q, k, v, pos, blocks, heads_per_program=per_program, **kw)
    assert_matches_reference(out, block_sparse_attention_ref, q, k, v, pos, blocks, **kw)


def test_default_heads_per_program_divides_the_group_within_the_register_budget():
    from ihip_compile.kernels.block_sparse_attention import default_heads_per_program

    assert default_heads_per_program(4, 64, 128) == 4  # Llama-3.1-8B: the measured launch
    assert default_heads_per_program(8, 64, 128) == 4
    assert default_heads_per_program(3, 64, 64) == 1  # SmolLM2: 3 heads share no power of two
    assert default_heads_per_program(6, 64, 128) == 2
    assert default_heads_per_program(4, 64, 256) == 2  # wider heads: fewer per program
    assert default_heads_per_program(8, 16, 64) == 4


def test_heads_per_program_must_divide_the_group():
    from ihip_compile.kernels.block_sparse_attention import block_sparse_attention

    q, k, v, pos = _qkv(6, 2, 16, 64, torch.float32, 0)
    blocks = select_blocks(q, k, pos, block_size_q=16, sink_tokens=4, window_tokens=8,
                           use_triton=False, **SMALL)
    with pytest.raises(ValueError, match="power of two dividing the 3"):
        block_sparse_attention(q, k, v, pos, blocks, scale=0.3, block_size_q=16, sink_tokens=4,
                               window_tokens=8, heads_per_program=2)


@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (3, 1), (4, 1), (8, 1)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_matches_reference(heads, kv_heads, dtype):
    from ihip_compile.kernels.sparse_decode import sparse_decode

    q, k, v, pos = _qkv(heads, kv_heads, 1, 211, dtype, heads + 1)
    blocks = select_blocks(q, k, pos, sink_tokens=5, window_tokens=13, use_triton=False, **SMALL)
    kw = dict(scale=0.3, sink_tokens=5, window_tokens=13, softcap=3.0 if heads == 3 else 0.0)
    out = sparse_decode(q, k, v, blocks, pos, num_splits=3, **kw)
    assert_matches_reference(out, sparse_decode_ref, q, k, v, blocks, pos, **kw)


def test_decode_matches_reference_with_remap():
    from ihip_compile.kernels.sparse_decode import sparse_decode

    q, k, v, pos = _qkv(4, 1, 1, 190, torch.float32, 2)
    blocks = select_blocks(q, k, pos, sink_tokens=4, window_tokens=10, use_triton=False, **SMALL)
    kw = dict(scale=0.3, sink_tokens=4, window_tokens=10, remap=True, inv_freq=_inv_freq(32),
              rotary_dim=32, rope_layout=1)
    out = sparse_decode(q, k, v, blocks, pos, **kw)
    assert_matches_reference(out, sparse_decode_ref, q, k, v, blocks, pos, **kw)


@pytest.mark.parametrize("use_triton", [False, True])
@pytest.mark.parametrize("s_q,s_k", [(1, 97), (33, 97), (70, 70)])
def test_full_budget_equals_dense_sdpa(use_triton, s_q, s_k):
    q, k, v, pos = _qkv(6, 2, s_q, s_k, torch.float32, s_q)
    blocks = select_blocks(q, k, pos, block_size_q=16, sink_tokens=3, window_tokens=10,
                           use_triton=use_triton, **ALL_KEYS)
    kw = dict(scale=0.25, sink_tokens=3, window_tokens=10)
    if s_q == 1:
        if use_triton:
            from ihip_compile.kernels.sparse_decode import sparse_decode as attend
        else:
            attend = sparse_decode_ref
        out = attend(q, k, v, blocks, pos, **kw)
    else:
        if use_triton:
            from ihip_compile.kernels.block_sparse_attention import block_sparse_attention as attend
        else:
            attend = block_sparse_attention_ref
        out = attend(q, k, v, pos, blocks, block_size_q=16, **kw)
    mask = torch.arange(s_k, device=DEVICE)[None, :] <= pos[0][:, None]
    dense = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=0.25, enable_gqa=True)
    assert_matches_reference(out, lambda *a: dense.to(a[0].dtype), q)


def test_no_selected_blocks_attends_sinks_and_window_only():
    q, k, v, pos = _qkv(2, 1, 1, 120, torch.float64, 4)
    blocks = torch.full((1, 1, 3), -1, dtype=torch.int32, device=DEVICE)
    out = sparse_decode_ref(q, k, v, blocks, pos, scale=0.5, sink_tokens=4, window_tokens=8)
    keys = torch.cat([torch.arange(4), torch.arange(112, 120)]).to(DEVICE)
    want = F.scaled_dot_product_attention(q, k[:, :, keys], v[:, :, keys], scale=0.5,
                                          enable_gqa=True)
    assert (out - want).abs().max() < 1e-12


def test_remap_renumbers_like_streaming_llm():
    """Raw keys placed at their renumbered positions, attended densely, give the remapped result."""
    d, s_k, sink, window = 32, 160, 4, 10
    gen = torch.Generator().manual_seed(5)
    q_raw, k_raw, v = (torch.randn(1, 1, n, d, generator=gen, dtype=torch.float64)
                       for n in (1, s_k, s_k))
    inv = _inv_freq(d).cpu()
    rope = lambda x, p: rotate_by_delta(x, p, inv, d, 1)  # noqa: E731  raw -> position p
    keys_at_true = rope(k_raw, torch.arange(s_k))
    q_at_true = rope(q_raw, torch.tensor([s_k - 1]))
    blocks = torch.tensor([[[3, 7, 11, -1]]], dtype=torch.int32)
    got = sparse_decode_ref(q_at_true, keys_at_true, v, blocks, scale=0.2, sink_tokens=sink,
                            window_tokens=window, remap=True, inv_freq=inv, rotary_dim=d,
                            rope_layout=1)
    selected = [b * 8 + t for b in (3, 7, 11) for t in range(8)]
    attended = list(range(sink)) + selected + list(range(s_k - window, s_k))
    new_pos = torch.arange(len(attended))  # sinks 0.., selected consecutively, then the window
    k_new = rope(k_raw[:, :, attended], new_pos)
    q_new = rope(q_raw, torch.tensor([len(attended) - 1]))
    want = F.scaled_dot_product_attention(q_new, k_new, v[:, :, attended], scale=0.2)
    assert (got - want).abs().max() < 1e-10
    assert math.isfinite(got.abs().max().item())


@pytest.mark.parametrize("head_dim", [96])
def test_head_dim_not_a_power_of_two(head_dim):
    """D = 96 pads the tile to 128 columns and masks the rest (prefill and decode)."""
    from ihip_compile.kernels.block_sparse_attention import block_sparse_attention
    from ihip_compile.kernels.sparse_decode import sparse_decode

    q, k, v, pos = _qkv(2, 1, 17, 120, torch.float32, 8, d=head_dim)
    kw = dict(scale=0.1, sink_tokens=4, window_tokens=9, remap=True,
              inv_freq=_inv_freq(head_dim), rotary_dim=head_dim, rope_layout=1)
    blocks = select_blocks(q, k, pos, block_size_q=16, sink_tokens=4, window_tokens=9,
                           use_triton=False, **SMALL)
    out = block_sparse_attention(q, k, v, pos, blocks, block_size_q=16, **kw)
    assert_matches_reference(out, block_sparse_attention_ref, q, k, v, pos, blocks,
                             block_size_q=16, **kw)
    q1, pos1 = q[:, :, -1:], pos[:, -1:]
    blocks1 = select_blocks(q1, k, pos1, sink_tokens=4, window_tokens=9, use_triton=False,
                            **SMALL)
    out1 = sparse_decode(q1, k, v, blocks1, pos1, **kw)
    assert_matches_reference(out1, sparse_decode_ref, q1, k, v, blocks1, pos1, **kw)


@pytest.mark.gpu
@pytest.mark.parametrize("head_dim", [64, 96, 128])
def test_bf16_kernels_match_reference_on_gpu(head_dim):
    from ihip_compile.kernels.block_sparse_attention import block_sparse_attention
    from ihip_compile.kernels.sparse_decode import sparse_decode

    q, k, v, pos = _qkv(32, 8, 200, 5000, torch.bfloat16, head_dim, d=head_dim)
    sel = dict(block_size_q=64, sink_tokens=64, window_tokens=256, stage_chunks=(256, 32, 8),
               stage_keeps=(2048, 1024, 512), selected_tokens=512)
    kw = dict(scale=head_dim ** -0.5, sink_tokens=64, window_tokens=256, remap=True,
              inv_freq=_inv_freq(head_dim), rotary_dim=head_dim, rope_layout=1)
    blocks = select_blocks(q, k, pos, **sel)
    out = block_sparse_attention(q, k, v, pos, blocks, block_size_q=64, **kw)
    assert_matches_reference(out, block_sparse_attention_ref, q, k, v, pos, blocks,
                             block_size_q=64, **kw)
    q1, pos1 = q[:, :, -1:], pos[:, -1:]
    blocks1 = select_blocks(q1, k, pos1, **sel)
    out1 = sparse_decode(q1, k, v, blocks1, pos1, **kw)
    assert_matches_reference(out1, sparse_decode_ref, q1, k, v, blocks1, pos1, **kw)


def test_batch_rows_with_their_own_positions():
    """Two sequences whose queries sit at different key indices (e.g. different prompt lengths)."""
    from ihip_compile.kernels.block_sparse_attention import block_sparse_attention
    from ihip_compile.kernels.sparse_decode import sparse_decode

    gen = torch.Generator().manual_seed(13)
    q, k, v = (torch.randn(2, n, s, 32, generator=gen).to(DEVICE)
               for n, s in ((4, 20), (2, 180), (2, 180)))
    pos = torch.stack([torch.arange(160, 180), torch.arange(90, 110)]).to(DEVICE)
    kw = dict(scale=0.2, sink_tokens=4, window_tokens=10)
    blocks = select_blocks(q, k, pos, block_size_q=16, use_triton=False, sink_tokens=4,
                           window_tokens=10, **SMALL)
    out = block_sparse_attention(q, k, v, pos, blocks, block_size_q=16, **kw)
    assert_matches_reference(out, block_sparse_attention_ref, q, k, v, pos, blocks,
                             block_size_q=16, **kw)
    blocks1 = select_blocks(q[:, :, -1:], k, pos[:, -1:], use_triton=False, sink_tokens=4,
                            window_tokens=10, **SMALL)
    out1 = sparse_decode(q[:, :, -1:], k, v, blocks1, pos[:, -1:], **kw)
    assert_matches_reference(out1, sparse_decode_ref, q[:, :, -1:], k, v, blocks1, pos[:, -1:],
                             **kw)
    assert blocks1[1].max() * 8 < 110  # the second row never selects keys past its query


@pytest.mark.parametrize("window", [0, 7, 150])
def test_decode_plan_derived_in_kernel(window):
    """The decode kernel derives the block plan itself: no window, a shared int32 [1] position
    for two rows, rows with different counts of valid blocks (RoPE renumbering depends on the
    count), more blocks than one 128-entry plan tile, and (window 150) key tiles made only of
    window keys, whose RoPE rotation (by 0) is skipped."""
    from ihip_compile.kernels.sparse_decode import sparse_decode

    gen = torch.Generator().manual_seed(21)
    q, k, v = (torch.randn(2, n, s, 32, generator=gen).to(DEVICE)
               for n, s in ((2, 1), (1, 1400), (1, 1400)))
    pos = torch.tensor([1383], dtype=torch.int32, device=DEVICE)
    blocks = torch.randperm(170, generator=gen)[:150].sort().values.to(DEVICE, torch.int32)
    blocks = torch.stack([blocks, torch.where(torch.arange(150, device=DEVICE) < 131, blocks, -1)])
    blocks = blocks.view(2, 1, 150)
    kw = dict(scale=0.2, sink_tokens=4, window_tokens=window, remap=True,
              inv_freq=_inv_freq(32), rotary_dim=32, rope_layout=1)
    out = sparse_decode(q, k, v, blocks, pos, num_splits=2, **kw)
    assert_matches_reference(out, sparse_decode_ref, q, k, v, blocks, pos, **kw)
