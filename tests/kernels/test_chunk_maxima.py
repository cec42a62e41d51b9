"""The streaming exact-maxima stage kernel against its spec: the stage reference probing every key."""

import pytest
import torch

from ihip_compile.kernels.prune_stage_ref import score_chunks_ref
from tests.helpers import assert_matches_reference
from tests.kernels.conftest import DEVICE


def _inputs(batch, heads, kv_heads, blocks, pooled, keys, chunk, dtype, seed, d=48, rotary=32):
    """d 48 by default: not a power of two, padded columns."""
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, blocks, pooled, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(batch, kv_heads, keys, d, generator=gen).to(DEVICE, dtype)
    first = torch.randint(0, chunk, (1,), generator=gen).item()  # starts off the chunk grid
    starts = torch.arange(first, keys, chunk, dtype=torch.int32).expand(batch, blocks, -1).clone()
    starts[..., 1] = -1  # an empty slot
    key_hi = torch.randint(keys // 2, keys + 1, (batch, blocks), generator=gen, dtype=torch.int32)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, rotary, 2, dtype=torch.float32) / rotary)
    return (q, k, starts.to(DEVICE), key_hi.to(DEVICE), (key_hi + 5).to(DEVICE),
            inv_freq.to(DEVICE))


@pytest.mark.parametrize("rope_mode", [0, 1, 2])
@pytest.mark.parametrize("chunk", [8, 32, 128])
@pytest.mark.parametrize("batch,heads,kv_heads,pooled", [(1, 4, 1, 1), (2, 6, 2, 3), (1, 8, 8, 2)])
def test_exact_maxima_match_reference(rope_mode, chunk, batch, heads, kv_heads, pooled):
    from ihip_compile.kernels.chunk_maxima import score_chunk_maxima

    q, k, starts, key_hi, pos, inv = _inputs(batch, heads, kv_heads, 2, pooled, 301, chunk,
                                             torch.float32, chunk + heads)
    kw = dict(key_lo=7, chunk_size=chunk, rope_mode=rope_mode, inv_freq=inv, rotary_dim=32,
              rope_layout=1 if rope_mode else 0, window_tokens=9)
    out = score_chunk_maxima(q, k, starts, key_hi, pos, rope=rope_mode != 0, **kw)
    assert_matches_reference(out, score_chunks_ref, q, k, starts, key_hi, pos, first_probes=chunk,
                             **kw)
    assert torch.isinf(out[..., 1]).all()  # the empty slot


@pytest.mark.parametrize("layout", [1, 2])
def test_half_precision_and_interleaved_rope(layout):
    from ihip_compile.kernels.chunk_maxima import score_chunk_maxima

    q, k, starts, key_hi, pos, inv = _inputs(1, 4, 2, 1, 1, 257, 64, torch.float16, layout)
    kw = dict(key_lo=3, chunk_size=64, rope_mode=1, inv_freq=inv, rotary_dim=32,
              rope_layout=layout, window_tokens=0)
    out = score_chunk_maxima(q, k, starts, key_hi, pos, rope=True, **kw)
    assert_matches_reference(out, score_chunks_ref, q, k, starts, key_hi, pos, first_probes=64,
                             **kw)


@pytest.mark.parametrize("d,dtype", [(64, torch.float32), (128, torch.float16)])
def test_rotation_of_whole_heads_by_halves(d, dtype):
    """rotate_half over a whole power-of-two head: the kernel turns keys as two halves, each the
    other's partner (``probe_scores._max_over_heads_by_halves``)."""
    from ihip_compile.kernels.chunk_maxima import score_chunk_maxima

    q, k, starts, key_hi, pos, inv = _inputs(1, 4, 2, 2, 2, 300, 32, dtype, d, d=d, rotary=d)
    kw = dict(key_lo=3, chunk_size=32, rope_mode=1, inv_freq=inv, rotary_dim=d, rope_layout=1,
              window_tokens=5)
    out = score_chunk_maxima(q, k, starts, key_hi, pos, rope=True, **kw)
    assert_matches_reference(out, score_chunks_ref, q, k, starts, key_hi, pos, first_probes=32,
                             **kw)


def test_stages_probing_every_key_take_the_streaming_kernel(monkeypatch):
    from ihip_compile.kernels import prune_stage

    calls = []
    streaming = prune_stage.score_chunk_maxima
    monkeypatch.setattr(prune_stage, "score_chunk_maxima",
                        lambda *a, **kw: calls.append(kw["chunk_size"]) or streaming(*a, **kw))
    q, k, starts, key_hi, pos, _ = _inputs(1, 4, 2, 2, 2, 200, 16, torch.float32, 0)
    kw = dict(key_lo=0, chunk_size=16)
    exact = prune_stage.score_chunks(q, k, starts, key_hi, pos, first_probes=16, **kw)
    assert calls == [16]
    assert_matches_reference(exact, score_chunks_ref, q, k, starts, key_hi, pos, first_probes=16,
                             **kw)
    prune_stage.score_chunks(q, k, starts, key_hi, pos, first_probes=8, **kw)
    assert calls == [16]  # the search keeps the halving kernel


@pytest.mark.parametrize("chunk,block_keys", [(8, 16), (8, 64), (1, 16), (32, 64), (16, 128)])
def test_short_chunks_sharing_a_program_match_reference(chunk, block_keys):
    """Several chunks per program (block_keys // chunk of them): a candidate count that is no
    multiple of that, an empty slot, chunks cut by key_hi, GQA and RoPE."""
    from ihip_compile.kernels.chunk_maxima import score_chunk_maxima

    q, k, starts, key_hi, pos, inv = _inputs(2, 6, 2, 2, 2, 333, chunk, torch.float32, chunk)
    starts = starts[..., :-1]  # an odd count of candidates
    kw = dict(key_lo=5, chunk_size=chunk, rope_mode=1, inv_freq=inv, rotary_dim=32,
              rope_layout=1, window_tokens=4)
    out = score_chunk_maxima(q, k, starts, key_hi, pos, rope=True, block_keys=block_keys, **kw)
    assert_matches_reference(out, score_chunks_ref, q, k, starts, key_hi, pos, first_probes=chunk,
                             **kw)
    assert torch.isinf(out[..., 1]).all()  # the empty slot


def test_block_keys_must_be_a_power_of_two_of_at_least_16():
    from ihip_compile.kernels.chunk_maxima import score_chunk_maxima

    q, k, starts, key_hi, pos, _ = _inputs(1, 2, 1, 1, 1, 64, 8, torch.float32, 0)
    with pytest.raises(ValueError, match="block_keys"):
        score_chunk_maxima(q, k, starts, key_hi, pos, key_lo=0, chunk_size=8, rope_mode=0,
                           inv_freq=None, rotary_dim=0, rope_layout=0, window_tokens=0,
                           rope=False, block_keys=24)
