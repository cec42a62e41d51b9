"""Pruning stages scoring keys in a bank's slots (``bank_kv.BankKV``, through a page table) score
them as they would the same keys laid out by position: the probe search and the exact chunk
maxima, per layer and per KV head (folded), FP8 slots widened as read; keys of blocks not in the
bank read as zeros, as ``BankKV.as_tensor`` (the reference's input) has them."""

import pytest
import torch

from ihip_compile.kernels.bank_kv import BankKV
from ihip_compile.kernels.block_selection import select_blocks
from ihip_compile.kernels.prune_stage_ref import score_chunks_ref
from ihip_compile.kernels.selection_scope import fold_heads
from tests.helpers import assert_matches_reference
from tests.kernels.bank_slots import PAGE, scatter_into_bank
from tests.kernels.conftest import DEVICE

D = 32
INV_FREQ = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)


def _in_bank(k: torch.Tensor, seed: int, compute_dtype=None) -> BankKV:
    b, _, s_k, _ = k.shape
    blocks_per_row = -(-s_k // PAGE) + 2
    slots, table = scatter_into_bank(k, blocks_per_row, spare_slots=7, seed=seed)
    return BankKV(slots, table, b, blocks_per_row, s_k, compute_dtype=compute_dtype)


def _stage_inputs(batch, groups, keys, chunk, seed, heads=4, kv_heads=2):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(batch * groups, heads // groups, 1, 2, D, generator=gen).to(DEVICE)
    k = torch.randn(batch, kv_heads, keys, D, generator=gen).to(DEVICE)
    n = keys // chunk
    starts = torch.stack([torch.randperm(n, generator=gen)[: n - 2] * chunk
                          for _ in range(batch * groups)]).view(batch * groups, 1, -1)
    starts[0, 0, 1] = -1  # an empty candidate
    key_hi = torch.full((batch * groups, 1), keys - 5, dtype=torch.int32)
    args = (starts.to(torch.int32).to(DEVICE), key_hi.to(DEVICE), (key_hi + 4).to(DEVICE))
    return q, k, args


# first_probes below the chunk: the halving search; equal to it: exact maxima (its own kernel).
@pytest.mark.parametrize("chunk,first_probes", [(32, 4), (32, 32), (8, 8)])
@pytest.mark.parametrize("batch,groups", [(1, 1), (2, 1), (2, 2)])
def test_scores_in_bank_slots_equal_scores_by_position(chunk, first_probes, batch, groups):
    from ihip_compile.kernels.prune_stage import score_chunks

    q, k, args = _stage_inputs(batch, groups, 203, chunk, seed=chunk + 3 * batch + groups)
    kw = dict(key_lo=3, chunk_size=chunk, rope_mode=1, inv_freq=INV_FREQ.to(DEVICE),
              rotary_dim=D, rope_layout=1, window_tokens=8, first_probes=first_probes)
    in_bank = _in_bank(k, seed=batch).fold(groups)
    assert torch.equal(in_bank.as_tensor(), fold_heads(k, groups))
    got = score_chunks(q, in_bank, *args, **kw)
    assert torch.equal(got, score_chunks(q, fold_heads(k, groups), *args, **kw))
    assert_matches_reference(got, score_chunks_ref, q, fold_heads(k, groups), *args, **kw)


@pytest.mark.parametrize("first_probes", [4, 32])
def test_keys_of_blocks_not_in_the_bank_read_as_zeros(first_probes):
    from ihip_compile.kernels.prune_stage import score_chunks

    q, k, args = _stage_inputs(1, 1, 160, 32, seed=first_probes)
    in_bank = _in_bank(k, seed=9)
    in_bank.slot_of_block[[2, 3, 11]] = -1
    plain = in_bank.as_tensor()
    assert not plain[:, :, 16:32].any() and torch.equal(plain[:, :, :16], k[:, :, :16])
    kw = dict(key_lo=3, chunk_size=32, rope_mode=0, window_tokens=8, first_probes=first_probes)
    got = score_chunks(q, in_bank, *args, **kw)
    assert torch.equal(got, score_chunks(q, plain, *args, **kw))
    assert_matches_reference(got, score_chunks_ref, q, plain, *args, **kw)


@pytest.mark.parametrize("first_probes", [4, 32])
def test_fp8_slots_score_like_the_widened_keys(first_probes):
    from ihip_compile.kernels.prune_stage import score_chunks

    q, k, args = _stage_inputs(1, 1, 180, 32, seed=11)
    q = q.to(torch.bfloat16)
    k8 = k.to(torch.float8_e4m3fn)
    in_bank = _in_bank(k8, seed=2, compute_dtype=torch.bfloat16)
    assert in_bank.dtype == torch.bfloat16
    assert torch.equal(in_bank.as_tensor(), k8.to(torch.bfloat16))
    kw = dict(key_lo=3, chunk_size=32, rope_mode=1, inv_freq=INV_FREQ.to(DEVICE), rotary_dim=D,
              rope_layout=1, window_tokens=8, first_probes=first_probes)
    got = score_chunks(q, in_bank, *args, **kw)
    assert torch.equal(got, score_chunks(q, k8.to(torch.bfloat16), *args, **kw))


@pytest.mark.parametrize("use_triton", [False, True])
def test_later_stages_selected_in_bank_slots_equal_the_selection_by_position(use_triton):
    # A decode refresh of stage 1 onward, from stage 0's kept chunks, as the offloaded cache
    # runs it: the same blocks whether the keys lie in the bank's slots or by position.
    gen = torch.Generator().manual_seed(21)
    s_k = 517
    q = torch.randn(1, 6, 1, D, generator=gen).to(DEVICE)
    k = torch.randn(1, 3, s_k, D, generator=gen).to(DEVICE)
    pos = torch.tensor([[s_k - 1]], device=DEVICE)
    kw = dict(sink_tokens=8, window_tokens=24, selected_tokens=32, stage_chunks=(64, 16, 8),
              stage_keeps=(192, 64, 32), rope_mode=1, inv_freq=INV_FREQ.to(DEVICE),
              rotary_dim=D, rope_layout=1, use_triton=use_triton)
    _, stages = select_blocks(q, k, pos, return_stages=True, **kw)
    from_bank = select_blocks(q, _in_bank(k, seed=4), pos, start_stage=1, candidates=stages[0],
                              **kw)
    by_position = select_blocks(q, k, pos, start_stage=1, candidates=stages[0], **kw)
    assert torch.equal(from_bank, by_position)
    assert (from_bank >= 0).sum() > 0
