"""Pruning RoPE through keys moved once per stage: the same scores and selections as rotating
every probe, chosen only where it is cheaper."""

import pytest
import torch

from ihip_compile.kernels import block_selection, positioned_scoring
from ihip_compile.kernels.prune_stage_ref import score_chunks_ref
from ihip_compile.kernels.rope_delta_ref import rotate_by_delta
from tests.helpers import assert_matches_reference
from tests.kernels.conftest import DEVICE

D = 32


def _inv_freq(d=D):
    return 1.0 / 10000 ** (torch.arange(0, d, 2, dtype=torch.float64) / d)


def _cache_keys(raw, inv, layout):
    """Keys as a cache holds them: key s rotated at position s."""
    pos = torch.arange(raw.shape[2]).view(1, 1, -1)
    return rotate_by_delta(raw, pos, inv, raw.shape[-1], layout)


@pytest.mark.parametrize("rope_mode", [1, 2])
@pytest.mark.parametrize("layout", [1, 2])
def test_moved_inputs_give_the_scores_of_rotated_probes(rope_mode, layout):
    gen = torch.Generator().manual_seed(layout + 2 * rope_mode)
    s_k, blocks, chunk, window = 300, 5, 16, 20
    q = torch.randn(2, 6, blocks, 3, D, generator=gen, dtype=torch.float64)
    k = _cache_keys(torch.randn(2, 2, s_k, D, generator=gen, dtype=torch.float64), _inv_freq(),
                    layout)
    starts = torch.arange(0, s_k, chunk, dtype=torch.int32).expand(2, blocks, -1)
    pos = torch.tensor([[40, 190, 230, 270, 299], [60, 61, 62, 250, 298]], dtype=torch.int32)
    key_hi = (pos - window).clamp(min=4)
    rope = dict(inv_freq=_inv_freq(), rotary_dim=D, rope_layout=layout)
    kw = dict(key_lo=4, chunk_size=chunk, window_tokens=window)
    rotated_probes = score_chunks_ref(q, k, starts, key_hi, pos, rope_mode=rope_mode, **rope, **kw)
    q_moved, k_moved, mode = positioned_scoring.positioned_scoring_inputs(
        q, k, pos, rope_mode, rope, chunk_size=chunk, window_tokens=window, n_probed=10 ** 9,
        use_triton=False, memo={})
    assert mode == 0
    moved = score_chunks_ref(q_moved, k_moved, starts, key_hi, pos, **kw)
    torch.testing.assert_close(moved, rotated_probes, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moved_keys_kernel_matches_reference(dtype):
    gen = torch.Generator().manual_seed(3)
    k = torch.randn(2, 3, 77, D, generator=gen).to(DEVICE, dtype)
    inv = _inv_freq().float().to(DEVICE)
    delta = positioned_scoring.key_targets(2, 77, 8, DEVICE)

    def reference(keys, inv_freq):
        rope = dict(inv_freq=inv_freq, rotary_dim=D, rope_layout=1)
        return positioned_scoring.moved_keys(keys, delta, rope, use_triton=False)

    out = positioned_scoring.moved_keys(k, delta, dict(inv_freq=inv, rotary_dim=D, rope_layout=1),
                                        use_triton=True)
    assert_matches_reference(out, reference, k, inv)


@pytest.mark.parametrize("rope_mode", [1, 2])
def test_selection_is_the_same_either_way(monkeypatch, rope_mode):
    gen = torch.Generator().manual_seed(11)
    s_k, s_q = 2048, 2048
    q = torch.randn(1, 4, s_q, D, generator=gen, dtype=torch.float64)
    k = _cache_keys(torch.randn(1, 2, s_k, D, generator=gen, dtype=torch.float64), _inv_freq(), 1)
    kw = dict(block_size_q=64, sink_tokens=16, window_tokens=64, selected_tokens=128,
              stage_chunks=(64, 16, 8), stage_keeps=(512, 256, 128), rope_mode=rope_mode,
              inv_freq=_inv_freq(), rotary_dim=D, rope_layout=1, use_triton=False)
    positions = torch.arange(s_k - s_q, s_k)
    modes = []
    real = positioned_scoring.positioned_scoring_inputs

    def spy(*args, **kwargs):
        out = real(*args, **kwargs)
        modes.append(out[2])
        return out

    monkeypatch.setattr(block_selection, "positioned_scoring_inputs", spy)
    moved = block_selection.select_blocks(q, k, positions, **kw)
    assert modes[0] == 0  # stage 0 probed moved keys
    monkeypatch.setattr(block_selection, "positioned_scoring_inputs",
                        lambda q_pooled, keys, pos, mode, *rest, **kw: (q_pooled, keys, mode))
    rotated_probes = block_selection.select_blocks(q, k, positions, **kw)
    assert torch.equal(moved, rotated_probes)


def test_moving_only_where_probes_outnumber_keys():
    keys = torch.empty(1, 8, 1 << 20, 128, dtype=torch.bfloat16, device="meta")
    stage_0 = 4096 * positioned_scoring.probes_per_chunk(256, 8)
    assert not positioned_scoring.worth_positioning(1, 1, keys, stage_0)  # decode: 1 block
    assert not positioned_scoring.worth_positioning(1, 1, keys, 1 << 20)  # exact decode probes
    assert positioned_scoring.worth_positioning(1, 1, keys, 512 * stage_0)  # a 32k chunk
    assert positioned_scoring.worth_positioning(2, 1, keys, 512 * stage_0)
    assert not positioned_scoring.worth_positioning(0, 1, keys, 512 * stage_0)  # true positions
    assert not positioned_scoring.worth_positioning(1, 0, keys, 512 * stage_0)  # no RoPE
    fp8 = keys.to(torch.float8_e4m3fn)
    assert not positioned_scoring.worth_positioning(1, 1, fp8, 512 * stage_0)


def test_relative_mode_moves_the_keys_once_for_all_stages():
    k = _cache_keys(torch.randn(1, 1, 64, D, dtype=torch.float64), _inv_freq(), 1)
    q = torch.randn(1, 2, 3, 1, D, dtype=torch.float64)
    pos = torch.tensor([[63, 63, 63]])
    rope = dict(inv_freq=_inv_freq(), rotary_dim=D, rope_layout=1)
    memo = {}
    first = positioned_scoring.positioned_scoring_inputs(
        q, k, pos, 1, rope, chunk_size=16, window_tokens=4, n_probed=10 ** 6, use_triton=False,
        memo=memo)
    later = positioned_scoring.positioned_scoring_inputs(
        q, k, pos, 1, rope, chunk_size=8, window_tokens=4, n_probed=1, use_triton=False, memo=memo)
    assert later[1] is first[1] and later[2] == 0
    assert later[0] is first[0], "the same queries are turned once for every stage"
    other_view = q.clone()  # a shared first stage scores another view of the queries
    again = positioned_scoring.positioned_scoring_inputs(
        other_view, k, pos, 1, rope, chunk_size=8, window_tokens=4, n_probed=1,
        use_triton=False, memo=memo)
    assert again[0] is not first[0] and torch.equal(again[0], first[0])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("layout", [1, 2])
def test_turned_queries_kernel_matches_reference(dtype, layout):
    gen = torch.Generator().manual_seed(layout)
    q = torch.randn(2, 3, 5, 4, D, generator=gen).to(DEVICE, dtype)
    turns = torch.randint(-3_000_000, 100, (2, 5), generator=gen).to(DEVICE)
    rope = dict(inv_freq=_inv_freq().float().to(DEVICE), rotary_dim=D, rope_layout=layout)

    def reference(queries, inv_freq):
        return positioned_scoring.turned_queries(queries, turns, dict(rope, inv_freq=inv_freq),
                                                 use_triton=False)

    out = positioned_scoring.turned_queries(q, turns, rope, use_triton=True)
    assert out.shape == q.shape and out.dtype == dtype
    assert_matches_reference(out, reference, q, rope["inv_freq"])


def test_probe_count_per_chunk():
    assert positioned_scoring.probes_per_chunk(256, 8) == 8 + 2 * 5
    assert positioned_scoring.probes_per_chunk(256, 2) == 2 + 2 * 7
    assert positioned_scoring.probes_per_chunk(8, 8) == 8
    assert positioned_scoring.probes_per_chunk(1, 8) == 1


def test_keys_in_host_memory_are_moved_like_the_plain_tensor():
    from ihip_compile.kernels.host_keys import BlockMajorKeys

    gen = torch.Generator().manual_seed(5)
    b, h, s, block = 2, 2, 203, 8
    k = torch.randn(b, h, s, D, generator=gen)
    n = -(-s // block) + 3  # spare blocks past the valid keys, as a growing store has
    padded = torch.zeros(b, h, n * block, D)
    padded[:, :, :s] = k
    blocks = padded.view(b, h, n, block, D).permute(0, 2, 1, 3, 4).reshape(b * n, h, block, D)
    in_host = BlockMajorKeys(blocks.contiguous(), b, s, torch.device("cpu"))
    rope = dict(inv_freq=_inv_freq().float(), rotary_dim=D, rope_layout=1)
    delta = positioned_scoring.key_targets(1, s, 16, "cpu")
    moved = positioned_scoring.moved_keys(in_host, delta, rope, use_triton=False)
    assert torch.equal(moved, positioned_scoring.moved_keys(k, delta, rope, use_triton=False))
