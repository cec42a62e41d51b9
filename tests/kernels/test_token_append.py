"""The token-append kernel against its reference: new tokens land bit-exact in the block-major
copy and in every bank slot that holds their block, nowhere else."""

import pytest
import torch

from ihip_compile.kernels.block_cache_ref import as_bits
from ihip_compile.kernels.token_append_ref import append_tokens_ref
from tests.kernels.conftest import DEVICE

BLOCK = 8


def _store(batch, heads, dim, blocks_per_row, dtype, gen):
    host = torch.randn(batch * blocks_per_row, heads, BLOCK, dim, generator=gen).to(dtype)
    banks = []
    for n_slots in (3, 5):
        bank = torch.randn(n_slots, heads, BLOCK, dim, generator=gen).to(dtype)
        slot_of_block = torch.full((batch * blocks_per_row,), -1, dtype=torch.int64)
        held = torch.randperm(batch * blocks_per_row, generator=gen)[:n_slots]
        slot_of_block[held] = torch.randperm(n_slots, generator=gen)[:held.numel()]
        banks.append((slot_of_block, bank))
    return host, banks


def _on(device, host, banks):
    """Copies on ``device`` (copies on the CPU too: the inputs stay as they were)."""
    return host.to(device, copy=True), [(s.to(device), b.to(device, copy=True)) for s, b in banks]


@pytest.mark.parametrize("batch,heads,dim", [(1, 3, 16), (2, 2, 24)])
@pytest.mark.parametrize("start,s_new", [(0, 1), (5, 1), (7, 19), (3, 40)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float8_e4m3fn])
def test_append_matches_reference(batch, heads, dim, start, s_new, dtype):
    from ihip_compile.kernels.token_append import append_tokens_kernel

    gen = torch.Generator().manual_seed(start * 100 + s_new)
    blocks_per_row = -(-(start + s_new) // BLOCK) + 1
    host, banks = _store(batch, heads, dim, blocks_per_row, dtype, gen)
    # Non-contiguous source, as a model's transposed projection gives it.
    new = torch.randn(batch, s_new, heads, dim, generator=gen).to(dtype).transpose(1, 2)
    want_host, want_banks = host.clone(), [(s, b.clone()) for s, b in banks]
    append_tokens_ref(new, want_host, start, blocks_per_row, want_banks)
    got_host, got_banks = _on(DEVICE, host, banks)
    append_tokens_kernel([(new.to(DEVICE), got_host, got_banks)], start, blocks_per_row)
    assert torch.equal(as_bits(got_host).cpu(), as_bits(want_host))
    for (_, got), (_, want) in zip(got_banks, want_banks):
        assert torch.equal(as_bits(got).cpu(), as_bits(want))
    # The reference wrote something: the check above cannot pass by both doing nothing.
    assert not torch.equal(as_bits(want_host), as_bits(host))


def test_append_with_one_bank_and_without_banks():
    from ihip_compile.kernels.token_append import append_tokens_kernel

    gen = torch.Generator().manual_seed(3)
    host, banks = _store(1, 2, 16, 4, torch.float32, gen)
    new = torch.randn(1, 2, 11, 16, generator=gen)
    for use in ([], banks[:1]):
        want_host, want_banks = host.clone(), [(s, b.clone()) for s, b in use]
        append_tokens_ref(new, want_host, 9, 4, want_banks)
        got_host, got_banks = _on(DEVICE, host, use)
        append_tokens_kernel([(new.to(DEVICE), got_host, got_banks)], 9, 4)
        assert torch.equal(got_host.cpu(), want_host)
        for (_, got), (_, want) in zip(got_banks, want_banks):
            assert torch.equal(got.cpu(), want)


def test_mismatched_bank_blocks_rejected():
    from ihip_compile.kernels.token_append import append_tokens_kernel

    host = torch.zeros(4, 2, BLOCK, 16, device=DEVICE)
    bank = torch.zeros(2, 2, BLOCK, 32, device=DEVICE)
    slots = torch.full((4,), -1, dtype=torch.int64, device=DEVICE)
    with pytest.raises(ValueError, match="bank blocks"):
        append_tokens_kernel([(torch.zeros(1, 2, 1, 16, device=DEVICE), host, [(slots, bank)])],
                             0, 4)


@pytest.mark.parametrize("batch,start,s_new", [(1, 0, 1), (2, 6, 1), (2, 3, 21)])
@pytest.mark.parametrize("with_fp8_keys", [False, True])
def test_several_writes_land_as_alone(batch, start, s_new, with_fp8_keys):
    # Keys with two banks, values of another head dim with one, and (a third write: a second
    # launch) the keys again in float8 with one bank: each lands as alone.
    from ihip_compile.kernels.token_append import append_tokens_kernel

    gen = torch.Generator().manual_seed(batch * 10 + s_new)
    blocks_per_row = -(-(start + s_new) // BLOCK) + 1
    keys_host, key_banks = _store(batch, 2, 16, blocks_per_row, torch.bfloat16, gen)
    values_host, value_banks = _store(batch, 2, 24, blocks_per_row, torch.bfloat16, gen)
    new_k = torch.randn(batch, s_new, 2, 16, generator=gen).to(torch.bfloat16).transpose(1, 2)
    new_v = torch.randn(batch, 2, s_new, 24, generator=gen).to(torch.bfloat16)
    stores = [(new_k, keys_host, key_banks), (new_v, values_host, value_banks[:1])]
    if with_fp8_keys:
        fp8_host, fp8_banks = _store(batch, 2, 16, blocks_per_row, torch.float8_e4m3fn, gen)
        stores.append((new_k.to(torch.float8_e4m3fn), fp8_host, fp8_banks[1:]))
    wants, writes = [], []
    for new, host, banks in stores:
        want_host, want_banks = host.clone(), [(s, b.clone()) for s, b in banks]
        append_tokens_ref(new, want_host, start, blocks_per_row, want_banks)
        wants.append((want_host, want_banks))
        got_host, got_banks = _on(DEVICE, host, banks)
        writes.append((new.to(DEVICE), got_host, got_banks))
    append_tokens_kernel(writes, start, blocks_per_row)
    for (_, got_host, got_banks), (want_host, want_banks) in zip(writes, wants):
        assert torch.equal(as_bits(got_host.cpu()), as_bits(want_host))
        for (_, got), (_, want) in zip(got_banks, want_banks):
            assert torch.equal(as_bits(got.cpu()), as_bits(want))


def test_writes_of_one_launch_must_agree_on_tokens():
    from ihip_compile.kernels.token_append import append_tokens_kernel

    host = torch.zeros(4, 2, BLOCK, 16, device=DEVICE)
    writes = [(torch.zeros(1, 2, n, 16, device=DEVICE), host, []) for n in (1, 2)]
    with pytest.raises(ValueError, match="same batch, heads and tokens"):
        append_tokens_kernel(writes, 0, 4)
    with pytest.raises(ValueError, match="at least one write"):
        append_tokens_kernel([], 0, 4)


@pytest.mark.parametrize("start,s_new", [(0, 1), (13, 1), (7, 19)])
def test_start_read_on_the_device_matches_reference(start, s_new):
    # start_at replaces start (a captured decode append reads it there); the start argument,
    # deliberately wrong here, is ignored.
    from ihip_compile.kernels.token_append import append_tokens_kernel

    gen = torch.Generator().manual_seed(start + 7)
    blocks_per_row = -(-(start + s_new) // BLOCK) + 2
    host, banks = _store(2, 2, 16, blocks_per_row, torch.float32, gen)
    new = torch.randn(2, 2, s_new, 16, generator=gen)
    want_host, want_banks = host.clone(), [(s, b.clone()) for s, b in banks]
    append_tokens_ref(new, want_host, start, blocks_per_row, want_banks)
    got_host, got_banks = _on(DEVICE, host, banks)
    start_at = torch.tensor([start], dtype=torch.int64, device=DEVICE)
    append_tokens_kernel([(new.to(DEVICE), got_host, got_banks)], start + 3, blocks_per_row,
                         start_at=start_at)
    assert torch.equal(got_host.cpu(), want_host)
    for (_, got), (_, want) in zip(got_banks, want_banks):
        assert torch.equal(got.cpu(), want)
    assert not torch.equal(want_host, host)
