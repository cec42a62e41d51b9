"""The pruning-stage kernel against its reference: chunk scores of the halving probe search."""

import pytest
import torch

from ihip_compile.kernels.prune_stage_ref import score_chunks_ref
from tests.helpers import assert_matches_reference
from tests.kernels.conftest import DEVICE, record_launches


def _inputs(heads, kv_heads, blocks, pooled, keys, chunk, dtype, seed, d=32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(1, heads, blocks, pooled, d, generator=gen).to(DEVICE, dtype)
    k = torch.randn(1, kv_heads, keys, d, generator=gen).to(DEVICE, dtype)
    starts = torch.arange(0, keys, chunk, dtype=torch.int32).expand(1, blocks, -1).clone()
    starts[..., -1] = -1  # an empty slot
    key_hi = torch.randint(keys // 2, keys, (1, blocks), generator=gen, dtype=torch.int32)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    return q, k, starts.to(DEVICE), key_hi.to(DEVICE), (key_hi + 9).to(DEVICE), inv_freq.to(DEVICE)


# (18, 9): more KV heads than the usual 8 in the kernel's loop over heads.
@pytest.mark.parametrize("heads,kv_heads", [(2, 2), (3, 1), (4, 1), (8, 1), (18, 9)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_scores_match_reference_gqa(heads, kv_heads, dtype):
    from ihip_compile.kernels.prune_stage import score_chunks

    q, k, starts, key_hi, pos, _ = _inputs(heads, kv_heads, 2, 4, 157, 16, dtype, heads)
    kw = dict(key_lo=3, chunk_size=16)
    out = score_chunks(q, k, starts, key_hi, pos, **kw)
    assert_matches_reference(out, score_chunks_ref, q, k, starts, key_hi, pos, **kw)
    assert torch.isinf(out[..., -1]).all()  # the empty slot


@pytest.mark.parametrize("rope_mode", [1, 2])
@pytest.mark.parametrize("chunk,first_probes", [(1, 8), (8, 8), (32, 2), (32, 8)])
@pytest.mark.parametrize("d", [16, 32])  # 16: halves too narrow for a tensor-core product
def test_scores_match_reference_with_pruning_rope(rope_mode, chunk, first_probes, d):
    from ihip_compile.kernels.prune_stage import score_chunks

    q, k, starts, key_hi, pos, inv = _inputs(4, 2, 1, 1, 131, chunk, torch.float32, chunk, d)
    kw = dict(key_lo=5, chunk_size=chunk, rope_mode=rope_mode, inv_freq=inv, rotary_dim=d,
              rope_layout=1, window_tokens=7, first_probes=first_probes)
    out = score_chunks(q, k, starts, key_hi, pos, **kw)
    assert_matches_reference(out, score_chunks_ref, q, k, starts, key_hi, pos, **kw)


@pytest.mark.parametrize("chunk_tile,rope_mode,chunk,d", [
    (32, 1, 8, 32), (64, 0, 8, 32), (64, 2, 8, 32), (64, 0, 32, 128), (32, 1, 32, 128),
    (128, 0, 32, 128)])
def test_wide_chunk_tiles_score_like_the_reference(chunk_tile, rope_mode, chunk, d):
    """Prefill launches take 32, 64 or 128 chunks per program; tests' small inputs would take
    16. Head dim 128 with halving steps: on a GPU, the launch shape must fit the shared memory
    (128 chunks in 16-bit inputs only, as the op launches them)."""
    from ihip_compile.kernels.prune_stage import score_chunks

    dtype = torch.bfloat16 if chunk_tile == 128 and DEVICE == "cuda" else torch.float32
    q, k, starts, key_hi, pos, inv = _inputs(4, 2, 3, 2, 700, chunk, dtype, chunk_tile, d)
    kw = dict(key_lo=5, chunk_size=chunk, rope_mode=rope_mode, inv_freq=inv, rotary_dim=d,
              rope_layout=1, window_tokens=7)
    out = score_chunks(q, k, starts, key_hi, pos, chunk_tile=chunk_tile, **kw)
    assert_matches_reference(out, score_chunks_ref, q, k, starts, key_hi, pos, **kw)


@pytest.mark.parametrize("chunk_tile,first_group", [
    (None, 1), (None, 2), (None, 8), (4, 8), (8, 8), (16, 2)])
@pytest.mark.parametrize("tied", [False, True])
def test_first_step_grouping_changes_no_score(chunk_tile, first_group, tied):
    """Any number of chunks per program and of first-step parts per gathered load (the decode
    launch shapes among them) gives the reference's scores; with tied first-step probes the
    earliest part is halved, as in the reference's sequential scan."""
    from ihip_compile.kernels.prune_stage import score_chunks

    q, k, starts, key_hi, pos, inv = _inputs(4, 2, 1, 1, 300, 64, torch.float32, first_group)
    if tied:  # the middle key of every 8-key part equals part 0's: the first probes all tie
        q, k = q.round(), k.round()  # small integers: every product sum exact, ties exact
        middles = torch.arange(4, 300, 8, device=k.device)
        k[:, :, middles] = k[:, :, (middles // 64 * 64 + 4).clamp(max=299)]
    kw = dict(key_lo=5, chunk_size=64, rope_mode=0, window_tokens=7, first_probes=8)
    out = score_chunks(q, k, starts, key_hi, pos, chunk_tile=chunk_tile, first_group=first_group,
                       **kw)
    assert_matches_reference(out, score_chunks_ref, q, k, starts, key_hi, pos, **kw)


def test_a_decode_stage_launches_one_kernel_variant_at_every_length(monkeypatch):
    """Triton compiles a kernel per set of compile-time arguments: a decode stage 0 over more
    keys must reuse the variant of fewer keys, or a growing sequence stops for a compile (~3 s
    on an H200) each time it crosses a length range, mid-prompt or mid-generation."""
    from ihip_compile.kernels import prune_stage

    launched = record_launches(monkeypatch, prune_stage, "_score_chunks_kernel")
    for keys in (3000, 40_000, 300_000):
        q, k, starts, key_hi, pos, inv = _inputs(32, 8, 1, 1, keys, 256, torch.float32, 0,
                                                 d=16)
        prune_stage.score_chunks(q, k, starts, key_hi, pos, key_lo=5, chunk_size=256,
                                 rope_mode=1, inv_freq=inv, rotary_dim=16, rope_layout=1,
                                 window_tokens=7, first_probes=32)
    assert len(launched) == 3 and launched[0] == launched[1] == launched[2]


@pytest.mark.parametrize("rows", [16, 64, 112, 128, 256, 512])
@pytest.mark.parametrize("rotating", [False, True])
def test_launches_shrink_to_fit_more_query_rows(rows, rotating):
    """Every launch the stage may take, fitted to a program's query rows, loads at most the
    row-probes that fit shared memory (both halves counted where a program loads them at once)
    and keeps the launch as tuned while it fits."""
    from ihip_compile.kernels import prune_stage
    from ihip_compile.kernels.probe_scores import probes_per_load

    budget = probes_per_load(rows, rotating) * rows
    for launch in [(128, 1, 8), (64, 1, 4), (32, 1, 4), (16, 4, 4), (8, 4, 2), (4, 16, 4),
                   (16, 2, 2)]:
        tile, group, warps = prune_stage.fit_query_rows(launch, rows, rotating)
        paired = 2 if tile <= 16 else 1
        assert warps == launch[2]
        if rows <= 64:  # the rows the launches were measured with
            assert (tile, group) == launch[:2]
            continue
        assert tile * max(group, paired) * rows <= budget
        if launch[0] * max(launch[1], 2 if launch[0] <= 16 else 1) * rows <= budget:
            assert (tile, group) == launch[:2]


def test_prefill_launch_by_key_width_and_rotation():
    """Unrotated 16-bit keys take 128 chunks a program on 8 warps (measured fastest); fp32 keys
    keep 64 on 4 (twice the bytes a tile); rotating in the kernel, 32."""
    from ihip_compile.kernels.prune_stage import wide_launch

    assert wide_launch(False, 2) == (128, 1, 8)
    assert wide_launch(False, 4) == (64, 1, 4)
    assert wide_launch(True, 2) == wide_launch(True, 4) == (32, 1, 4)


@pytest.mark.gpu
@pytest.mark.parametrize("heads,kv_heads", [(28, 4), (16, 2), (32, 2)])
@pytest.mark.parametrize("blocks,rope_mode,chunk,first_probes", [
    (32, 0, 32, 8), (32, 1, 32, 8), (2, 1, 32, 8), (2, 0, 64, 64), (2, 1, 64, 64), (2, 1, 8, 8)])
def test_many_query_heads_per_kv_head_compile_at_head_dim_128(heads, kv_heads, blocks,
                                                              rope_mode, chunk, first_probes):
    """GQA 7, 8 and 16 with a prefill block's 16 pooled queries: 128 and 256 query rows per
    program, more than the launches were tuned for; on a GPU they must still fit and score as
    the reference does: the probe search over many chunks per query block and over few, and
    exact chunk maxima (every key probed)."""
    from ihip_compile.kernels.prune_stage import score_chunks

    q, k, starts, key_hi, pos, inv = _inputs(heads, kv_heads, blocks, 16, 65536, chunk,
                                             torch.bfloat16, heads, d=128)
    kw = dict(key_lo=5, chunk_size=chunk, rope_mode=rope_mode, inv_freq=inv, rotary_dim=128,
              rope_layout=1, window_tokens=7, first_probes=first_probes)
    out = score_chunks(q, k, starts, key_hi, pos, **kw)
    assert_matches_reference(out, score_chunks_ref, q, k, starts, key_hi, pos, **kw)


def test_chunks_outside_candidate_range_score_minus_inf():
    q, k, starts, key_hi, pos, _ = _inputs(2, 1, 1, 1, 96, 16, torch.float32, 1)
    key_hi.fill_(40)
    scores = score_chunks_ref(q, k, starts, key_hi, pos, key_lo=20, chunk_size=16)
    finite = torch.isfinite(scores)[0, 0].tolist()
    assert finite == [False, True, True, False, False, False]  # chunks [16,32) and [32,48) only


def test_first_split_as_wide_as_the_chunk_scores_every_key():
    q, k, starts, key_hi, pos, _ = _inputs(3, 1, 1, 2, 64, 8, torch.float64, 2)
    key_hi.fill_(64)
    scores = score_chunks_ref(q, k, starts, key_hi, pos, key_lo=0, chunk_size=8, first_probes=8)
    every_key = torch.einsum("hpd,sd->sph", q[0, :, 0], k[0, 0]).flatten(1).amax(1)
    exact = every_key.view(8, 8).amax(1)
    assert torch.allclose(scores[0, 0, :-1], exact[:-1])  # the last slot is empty (-1)


@pytest.mark.parametrize("first_probes", [0, 3])
def test_bad_first_probes_rejected(first_probes):
    q, k, starts, key_hi, pos, _ = _inputs(2, 1, 1, 1, 64, 8, torch.float32, 0)
    with pytest.raises(ValueError, match="first_probes"):
        score_chunks_ref(q, k, starts, key_hi, pos, key_lo=0, chunk_size=8,
                         first_probes=first_probes)


# One program scores up to 8 heads' worth of sequences side by side: odd sequence counts leave
# some of its rows empty, and each sequence has its own candidates, window start and position.
@pytest.mark.parametrize("seqs,kv_heads", [(3, 1), (6, 1), (11, 1), (5, 2)])
def test_sequences_scored_side_by_side_match_reference(seqs, kv_heads):
    from ihip_compile.kernels.prune_stage import score_chunks

    gen = torch.Generator().manual_seed(seqs)
    d, keys, chunk, blocks = 32, 150, 16, 2
    q = torch.randn(seqs, 3 * kv_heads, blocks, 2, d, generator=gen).to(DEVICE)
    k = torch.randn(seqs, kv_heads, keys, d, generator=gen).to(DEVICE)
    starts = torch.stack([torch.randperm(keys // chunk, generator=gen)[:6] * chunk
                          for _ in range(seqs * blocks)]).view(seqs, blocks, 6).to(torch.int32)
    starts[0, 0, 2] = -1
    key_hi = torch.randint(keys // 2, keys, (seqs, blocks), generator=gen, dtype=torch.int32)
    inv = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    args = (q, k, starts.to(DEVICE), key_hi.to(DEVICE), (key_hi + 5).to(DEVICE))
    kw = dict(key_lo=4, chunk_size=chunk, rope_mode=1, inv_freq=inv.to(DEVICE), rotary_dim=d,
              rope_layout=1)
    out = score_chunks(*args, **kw)
    assert_matches_reference(out, score_chunks_ref, *args, **kw)


def _block_major(k, block):
    """[B, H_KV, S, D] -> the offloaded store's [B * N_BLOCKS, H_KV, BLOCK, D] (zero tail)."""
    b, h, s, d = k.shape
    n = -(-s // block)
    padded = torch.zeros(b, h, n * block, d, dtype=k.dtype, device=k.device)
    padded[:, :, :s] = k
    blocks = padded.view(b, h, n, block, d).permute(0, 2, 1, 3, 4).reshape(b * n, h, block, d)
    blocks = blocks.cpu().contiguous()
    if k.is_cuda:  # registered with CUDA as the store registers its host copies: GPU-readable
        torch.cuda.cudart().cudaHostRegister(blocks.data_ptr(),
                                             blocks.numel() * blocks.element_size(), 0)
    return blocks


@pytest.mark.parametrize("batch,groups", [(1, 1), (2, 1), (1, 2)])
def test_block_major_keys_in_host_memory_score_like_the_plain_tensor(batch, groups):
    from ihip_compile.kernels.host_keys import BlockMajorKeys
    from ihip_compile.kernels.prune_stage import score_chunks
    from ihip_compile.kernels.selection_scope import fold_heads

    gen = torch.Generator().manual_seed(batch + 5 * groups)
    keys, d = 203, 32
    q = torch.randn(batch * groups, 4 // groups, 1, 2, d, generator=gen).to(DEVICE)
    k = torch.randn(batch, 2, keys, d, generator=gen).to(DEVICE)
    starts = torch.arange(0, keys, 32, dtype=torch.int32).expand(batch * groups, 1, -1)
    key_hi = torch.full((batch * groups, 1), keys - 4, dtype=torch.int32)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    kw = dict(key_lo=3, chunk_size=32, rope_mode=1, inv_freq=inv_freq.to(DEVICE), rotary_dim=d,
              rope_layout=1, window_tokens=8)
    args = (starts.to(DEVICE), key_hi.to(DEVICE), (key_hi + 3).to(DEVICE))
    blocks = _block_major(k, 8)
    try:
        in_place = BlockMajorKeys(blocks, batch, keys, q.device).fold(groups)
        assert torch.equal(in_place.as_tensor(), fold_heads(k, groups))
        got = score_chunks(q, in_place, *args, **kw)
        assert torch.equal(got, score_chunks(q, fold_heads(k, groups), *args, **kw))
    finally:
        if k.is_cuda:
            torch.cuda.cudart().cudaHostUnregister(blocks.data_ptr())


def test_folding_block_major_keys_of_several_rows_is_refused():
    from ihip_compile.kernels.host_keys import BlockMajorKeys

    keys = BlockMajorKeys(torch.zeros(6, 2, 8, 4), batch=2, length=20, device=torch.device("cpu"))
    with pytest.raises(ValueError, match="batch 1"):
        keys.fold(2)


@pytest.mark.parametrize("dtype,layout", [(torch.float32, 1), (torch.bfloat16, 1),
                                          (torch.bfloat16, 2)])
def test_fp8_block_major_keys_score_like_the_widened_tensor(dtype, layout):
    # FP8 storage: the stage kernel widens each key it reads to the queries' dtype, before the
    # rotation (by halves for rotate_half, by partner columns for interleaved pairs), so it
    # scores exactly the keys a widened copy would hold.
    from ihip_compile.kernels.host_keys import BlockMajorKeys
    from ihip_compile.kernels.prune_stage import score_chunks

    gen = torch.Generator().manual_seed(17)
    keys, d = 180, 32
    q = torch.randn(1, 4, 1, 2, d, generator=gen).to(DEVICE, dtype)
    k8 = torch.randn(1, 2, keys, d, generator=gen).to(DEVICE, torch.float8_e4m3fn)
    starts = torch.arange(0, keys, 32, dtype=torch.int32).expand(1, 1, -1).to(DEVICE)
    key_hi = torch.full((1, 1), keys - 4, dtype=torch.int32, device=DEVICE)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    kw = dict(key_lo=3, chunk_size=32, rope_mode=1, inv_freq=inv_freq.to(DEVICE), rotary_dim=d,
              rope_layout=layout, window_tokens=8)
    blocks = _block_major(k8, 8)
    try:
        in_place = BlockMajorKeys(blocks, 1, keys, q.device, compute_dtype=dtype)
        assert in_place.dtype == dtype and torch.equal(in_place.as_tensor(), k8.to(dtype))
        got = score_chunks(q, in_place, starts, key_hi, key_hi + 3, **kw)
        assert torch.equal(got, score_chunks(q, k8.to(dtype), starts, key_hi, key_hi + 3, **kw))
    finally:
        if k8.is_cuda:
            torch.cuda.cudart().cudaHostUnregister(blocks.data_ptr())


@pytest.mark.parametrize("batch,groups,copied_keys", [(1, 1, 203), (2, 1, 150), (1, 2, 203)])
def test_first_probes_read_in_a_device_copy_score_like_the_host_keys(batch, groups, copied_keys):
    # Keys in host memory with a device copy of those the first step probes (``probe_key_copy``,
    # here of the first ``copied_keys`` keys only): the same scores, and the copy is what the
    # first step reads (altering it changes them).
    from ihip_compile.kernels.host_keys import BlockMajorKeys
    from ihip_compile.kernels.probe_key_copy import ProbeKeyCopy
    from ihip_compile.kernels.prune_stage import score_chunks
    from ihip_compile.kernels.selection_scope import fold_heads

    gen = torch.Generator().manual_seed(batch + 3 * groups)
    keys, d, chunk, parts = 203, 32, 32, 4
    q = torch.randn(batch * groups, 4 // groups, 1, 2, d, generator=gen).to(DEVICE)
    k = torch.randn(batch, 2, keys, d, generator=gen).to(DEVICE)
    starts = torch.arange(0, keys, chunk, dtype=torch.int32).expand(batch * groups, 1, -1)
    key_hi = torch.full((batch * groups, 1), keys - 4, dtype=torch.int32)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float32) / d)
    kw = dict(key_lo=3, chunk_size=chunk, rope_mode=1, inv_freq=inv_freq.to(DEVICE),
              rotary_dim=d, rope_layout=1, window_tokens=8, first_probes=parts)
    args = (starts.to(DEVICE), key_hi.to(DEVICE), (key_hi + 3).to(DEVICE))
    blocks = _block_major(k, 8)
    try:
        stride = chunk // parts
        copy = ProbeKeyCopy(stride).update(blocks, batch, copied_keys, keys, q.device)
        positions = torch.arange(copy.shape[2]) * stride + stride // 2
        assert torch.equal(copy, k[:, :, positions.to(DEVICE)])
        in_host = BlockMajorKeys(blocks, batch, keys, q.device).fold(groups)
        with_copy = BlockMajorKeys(blocks, batch, keys, q.device, 1, None, copy, stride)
        want = score_chunks(q, in_host, *args, **kw)
        got = score_chunks(q, with_copy.fold(groups), *args, **kw)
        assert torch.equal(got, want)
        assert_matches_reference(got, score_chunks_ref, q, fold_heads(k, groups), *args, **kw)
        altered = BlockMajorKeys(blocks, batch, keys, q.device, 1, None, copy * 100, stride)
        assert not torch.equal(score_chunks(q, altered.fold(groups), *args, **kw), want)
    finally:
        if k.is_cuda:
            torch.cuda.cudart().cudaHostUnregister(blocks.data_ptr())
