"""Decode attention read in a bank's slots (``bank_kv``) equals decode of the same keys laid out
by position: bit for bit against the kernel on ``BankKV.as_tensor``, and against the reference."""

import pytest
import torch

from ihip_compile.kernels.bank_kv import BankKV, decode_addressing
from ihip_compile.kernels.block_selection import select_blocks
from ihip_compile.kernels.selection_scope import fold_heads
from ihip_compile.kernels.sparse_decode_ref import sparse_decode_ref
from tests.helpers import assert_matches_reference
from tests.kernels.bank_slots import PAGE, scatter_into_bank
from tests.kernels.conftest import DEVICE

SMALL = dict(stage_chunks=(32, 16, 8), stage_keeps=(64, 32, 32), selected_tokens=32)


def _inputs(b, heads, kv_heads, s_k, dtype, seed, d=32):
    gen = torch.Generator().manual_seed(seed)
    q = torch.randn(b, heads, 1, d, generator=gen).to(DEVICE, dtype)
    k, v = (torch.randn(b, kv_heads, s_k, d, generator=gen).to(DEVICE, dtype) for _ in "kv")
    pos = torch.full((b, 1), s_k - 1, device=DEVICE)
    return q, k, v, pos


def _paged(k, v, seed, blocks_per_row=None):
    b, _, s_k, _ = k.shape
    blocks_per_row = blocks_per_row or -(-s_k // PAGE) + 3
    k_slots, table = scatter_into_bank(k, blocks_per_row, spare_slots=5, seed=seed)
    v_slots, _ = scatter_into_bank(v, blocks_per_row, spare_slots=5, seed=seed)
    return (BankKV(k_slots, table, b, blocks_per_row, s_k),
            BankKV(v_slots, table, b, blocks_per_row, s_k))


@pytest.mark.parametrize("b,heads,kv_heads", [(1, 2, 2), (2, 3, 1), (2, 8, 2)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_paged_decode_equals_decode_by_position(b, heads, kv_heads, dtype):
    from ihip_compile.kernels.sparse_decode import sparse_decode

    q, k, v, pos = _inputs(b, heads, kv_heads, 203, dtype, seed=heads + b)
    blocks = select_blocks(q, k, pos, sink_tokens=5, window_tokens=13, use_triton=False, **SMALL)
    kw = dict(scale=0.3, sink_tokens=5, window_tokens=13, block_size_k=PAGE)
    pk, pv = _paged(k, v, seed=b)
    assert torch.equal(pk.as_tensor(), k) and torch.equal(pv.as_tensor(), v)
    paged = sparse_decode(q, pk, pv, blocks, pos, num_splits=3, **kw)
    assert torch.equal(paged, sparse_decode(q, k, v, blocks, pos, num_splits=3, **kw))
    assert_matches_reference(paged, sparse_decode_ref, q, k, v, blocks, pos, **kw)
    assert torch.equal(sparse_decode_ref(q, pk, pv, blocks, pos, **kw),
                       sparse_decode_ref(q, k, v, blocks, pos, **kw))


def test_paged_decode_with_renumbering_and_softcap():
    from ihip_compile.kernels.sparse_decode import sparse_decode

    q, k, v, pos = _inputs(1, 4, 1, 190, torch.float32, seed=2)
    blocks = select_blocks(q, k, pos, sink_tokens=4, window_tokens=10, use_triton=False, **SMALL)
    inv_freq = (1.0 / 10000 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32)).to(DEVICE)
    kw = dict(scale=0.3, sink_tokens=4, window_tokens=10, remap=True, inv_freq=inv_freq,
              rotary_dim=32, rope_layout=1, softcap=2.0, block_size_k=PAGE)
    pk, pv = _paged(k, v, seed=4)
    assert torch.equal(sparse_decode(q, pk, pv, blocks, pos, **kw),
                       sparse_decode(q, k, v, blocks, pos, **kw))


def test_paged_decode_per_kv_head_selection():
    # One selection per KV head: the kernel's sequences are (row, KV head) pairs of one bank.
    from ihip_compile.kernels.sparse_decode import sparse_decode

    q, k, v, pos = _inputs(2, 6, 3, 150, torch.float32, seed=5)
    qf, kf, vf = fold_heads(q, 3), fold_heads(k, 3), fold_heads(v, 3)
    pos_f = pos.repeat_interleave(3, dim=0)
    blocks = select_blocks(qf, kf, pos_f, sink_tokens=4, window_tokens=12, use_triton=False,
                           **SMALL)
    pk, pv = _paged(k, v, seed=6)
    kw = dict(scale=0.3, sink_tokens=4, window_tokens=12, block_size_k=PAGE)
    assert torch.equal(fold_heads(pk, 3).as_tensor(), kf)
    assert torch.equal(sparse_decode(qf, fold_heads(pk, 3), fold_heads(pv, 3), blocks, pos_f,
                                     **kw),
                       sparse_decode(qf, kf, vf, blocks, pos_f, **kw))


def test_blocks_not_in_the_bank_are_never_read():
    # Only the attended blocks are held; the others' table entries are -1 (no slot to read).
    from ihip_compile.kernels.sparse_decode import sparse_decode

    q, k, v, pos = _inputs(1, 4, 2, 260, torch.float32, seed=7)
    sink, window = 8, 16
    blocks = select_blocks(q, k, pos, sink_tokens=sink, window_tokens=window, use_triton=False,
                           **SMALL)
    pk, pv = _paged(k, v, seed=8)
    attended = set(blocks[blocks >= 0].tolist()) | set(range(sink // PAGE))
    attended |= set(range((259 - window + 1) // PAGE, 259 // PAGE + 1))
    table = pk.slot_of_block.clone()
    table[[i for i in range(table.numel()) if i not in attended]] = -1
    pk, pv = (BankKV(t.slots, table, 1, t.blocks_per_row, t.length) for t in (pk, pv))
    kw = dict(scale=0.3, sink_tokens=sink, window_tokens=window, block_size_k=PAGE)
    assert torch.equal(sparse_decode(q, pk, pv, blocks, pos, **kw),
                       sparse_decode(q, k, v, blocks, pos, **kw))


def test_bad_pairs_are_refused():
    k = torch.zeros(4, 1, PAGE, 16)
    table = torch.arange(4)
    pk = BankKV(k, table, 1, 4, 30)
    with pytest.raises(ValueError, match="both"):
        decode_addressing(pk, torch.zeros(1, 1, 30, 16))
    with pytest.raises(ValueError, match="same bank"):
        decode_addressing(pk, BankKV(k, table.clone(), 1, 4, 30))
    with pytest.raises(ValueError, match="do not fit"):
        BankKV(k, table, 1, 4, 33)


@pytest.mark.parametrize("groups", [1, 2])
def test_reference_reads_only_the_rows_it_attends_and_they_equal_the_tensors(groups):
    from ihip_compile.kernels.bank_kv import rows_at

    _, k, _, _ = _inputs(2, 4, 4, 77, torch.float32, seed=9)
    pk, _ = _paged(k, k, seed=3)
    table = pk.slot_of_block.clone()
    table[1] = -1  # block 1 of row 0 is not in the bank: its rows read as zeros
    pk = BankKV(pk.slots, table, 2, pk.blocks_per_row, 77).fold(groups)
    keys = torch.randint(0, 77, (2 * groups, 3, 5), generator=torch.Generator().manual_seed(1))
    keys[0, 0, 0] = 9  # in block 1
    want = rows_at(pk.as_tensor(), keys.to(DEVICE))
    got = rows_at(pk, keys.to(DEVICE))
    assert torch.equal(got, want) and not want[0, 0, 0].any()


@pytest.mark.parametrize("dtype,remap", [(torch.float32, False), (torch.bfloat16, True)])
def test_fp8_slots_are_widened_as_read(dtype, remap):
    # FP8 storage: decode reads the narrow slots and widens each row to q's dtype before any
    # rotation, the same values a copy widened first would hold.
    from ihip_compile.kernels.sparse_decode import sparse_decode

    q, k, v, pos = _inputs(2, 4, 2, 170, dtype, seed=11)
    k8, v8 = k.to(torch.float8_e4m3fn), v.to(torch.float8_e4m3fn)
    wide_k, wide_v = k8.to(dtype), v8.to(dtype)
    blocks = select_blocks(q, wide_k, pos, sink_tokens=4, window_tokens=10, use_triton=False,
                           **SMALL)
    inv_freq = (1.0 / 10000 ** (torch.arange(0, 32, 2, dtype=torch.float32) / 32)).to(DEVICE)
    kw = dict(scale=0.3, sink_tokens=4, window_tokens=10, block_size_k=PAGE, remap=remap,
              inv_freq=inv_freq, rotary_dim=32, rope_layout=1)
    pk, pv = _paged(k8, v8, seed=12)
    assert pk.dtype == torch.float8_e4m3fn
    assert torch.equal(sparse_decode(q, pk, pv, blocks, pos, **kw),
                       sparse_decode(q, wide_k, wide_v, blocks, pos, **kw))
    assert torch.equal(sparse_decode_ref(q, pk, pv, blocks, pos, **kw),
                       sparse_decode_ref(q, wide_k, wide_v, blocks, pos, **kw))
