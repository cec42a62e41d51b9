"""The block-cache gather: Triton kernel against its torch reference (interpreter on CPU)."""

import os

import pytest
import torch

from ihip_compile.kernels.block_cache_ref import gather_blocks_ref

needs_triton = pytest.mark.skipif(
    not (torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1"),
    reason="Triton needs CUDA or TRITON_INTERPRET=1",
)


def _case(n_slots, n_staged, n, heads, block_k, head_dim, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    bank = torch.randn(n_slots, heads, block_k, head_dim, generator=g).to(dtype)
    staging = torch.randn(n_staged, heads, block_k, head_dim, generator=g).to(dtype)
    slots = torch.randint(-1, n_slots, (n,), generator=g)
    staged = torch.cumsum((slots < 0).long(), 0) - 1
    staged[n // 2] = slots[n // 2] = -1  # an entry naming no block
    return bank, staging[: max(int((slots < 0).sum()), 0)], slots, staged


def test_reference_copies_hits_from_bank_and_misses_from_staging():
    bank, staging, slots, staged = _case(5, 9, 9, 2, 8, 4, torch.float32)
    out = gather_blocks_ref(bank, staging, slots, staged)
    for i in range(slots.numel()):
        if slots[i] >= 0:
            want = bank[slots[i]]
        else:
            want = staging[staged[i]] if staged[i] >= 0 else torch.zeros_like(bank[0])
        assert torch.equal(out[i], want)
    assert not out[slots.numel() // 2].any()  # no block: zeros


def test_reference_widens_fp8_storage():
    bank = torch.randn(3, 2, 8, 4).to(torch.float8_e4m3fn)
    slots = torch.tensor([2, 0])
    out = gather_blocks_ref(bank, bank[:0], slots, torch.zeros(2, dtype=torch.long),
                            out_dtype=torch.float32)
    assert torch.equal(out, bank[slots.tolist()].to(torch.float32))


@needs_triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim", [4, 6])
def test_kernel_matches_reference_bit_for_bit(dtype, head_dim):
    from ihip_compile.kernels.block_cache import gather_blocks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bank, staging, slots, staged = (t.to(device) for t in
                                    _case(4, 7, 7, 2, 8, head_dim, dtype, seed=head_dim))
    assert bool((slots < 0).any()) and bool((slots >= 0).any())
    out = gather_blocks(bank, staging, slots, staged)
    assert torch.equal(out, gather_blocks_ref(bank, staging, slots, staged))


@needs_triton
def test_kernel_with_only_hits_needs_no_staging():
    from ihip_compile.kernels.block_cache import gather_blocks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bank = torch.randn(3, 1, 8, 4, device=device)
    slots = torch.tensor([2, 1, 2], device=device)
    staged = torch.full((3,), -1, device=device)
    out = gather_blocks(bank, bank[:0], slots, staged)
    assert torch.equal(out, bank[slots])


def _strided_destination(rows, heads, block_k, head_dim, dtype, device):
    """Rows of blocks inside a [H_KV, S, D] buffer (the op's scratch layout): a strided view."""
    buffer = torch.full((heads, rows * block_k, head_dim), 7.0, dtype=dtype, device=device)
    return buffer, buffer.view(heads, rows, block_k, head_dim).transpose(0, 1)


def test_reference_writes_blocks_to_their_destination_rows_only():
    bank, staging, slots, staged = _case(4, 7, 7, 2, 8, 4, torch.float32, seed=3)
    buffer, out = _strided_destination(9, 2, 8, 4, torch.float32, "cpu")
    dest = torch.tensor([8, 0, -1, 3, 5, 1, 6])
    got = gather_blocks_ref(bank, staging, slots, staged, out=out, dest=dest)
    blocks = gather_blocks_ref(bank, staging, slots, staged)
    assert got.data_ptr() == buffer.data_ptr()
    for i, row in enumerate(dest.tolist()):
        if row >= 0:
            assert torch.equal(out[row], blocks[i])
    untouched = [r for r in range(9) if r not in dest.tolist()]
    assert (out[untouched] == 7).all()


@needs_triton
# Integer types: a bank's admissions copy blocks as their bits (``BlockBank.fetch``).
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.int16, torch.uint8])
def test_kernel_writes_destination_rows_as_the_reference(dtype):
    from ihip_compile.kernels.block_cache import gather_blocks

    device = "cuda" if torch.cuda.is_available() else "cpu"
    bank, staging, slots, staged = (t.to(device) for t in _case(5, 9, 9, 3, 8, 6, dtype, seed=5))
    dest = torch.tensor([4, -1, 0, 10, 2, 7, -1, 1, 9], device=device)
    got_buffer, got = _strided_destination(11, 3, 8, 6, dtype, device)
    want_buffer, want = _strided_destination(11, 3, 8, 6, dtype, device)
    gather_blocks(bank, staging, slots, staged, out=got, dest=dest)
    gather_blocks_ref(bank, staging, slots, staged, out=want, dest=dest)
    assert torch.equal(got_buffer, want_buffer)
