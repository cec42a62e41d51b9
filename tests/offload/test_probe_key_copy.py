"""The device copy of stage 0's first probes: which keys it holds as a store grows."""

import pytest
import torch

from ihip_compile.kernels.probe_key_copy import ProbeKeyCopy

BLOCK, HEADS, DIM = 8, 2, 4


def _host(batch: int, keys: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keys [B, H, S, D] and the store's block-major host copy of them."""
    k = torch.randn(batch, HEADS, keys, DIM, generator=torch.Generator().manual_seed(keys))
    blocks = k.view(batch, HEADS, keys // BLOCK, BLOCK, DIM).permute(0, 2, 1, 3, 4)
    return k, blocks.reshape(-1, HEADS, BLOCK, DIM).contiguous()


@pytest.mark.parametrize("stride", [4, 8, 32])
def test_copy_grown_step_by_step_holds_every_probed_key(stride):
    batch, keys = 2, 256
    k, host = _host(batch, keys)
    copy = ProbeKeyCopy(stride)
    for length in (0, 1, stride // 2, stride // 2 + 1, 70, 71, 200, keys):
        # A small capacity first: the copy makes room again as the store grows.
        got = copy.update(host, batch, length, min(length, 64), torch.device("cpu"))
        positions = torch.arange(copy.entries_for(length)) * stride + stride // 2
        assert bool((positions < length).all())
        assert copy.entries_for(length) * stride + stride // 2 >= length  # no key left out
        assert torch.equal(got, k[:, :, positions])


def test_copy_takes_room_for_what_the_store_holds_not_its_capacity():
    k, host = _host(1, 64)
    copy = ProbeKeyCopy(8)
    copy.update(host, 1, 64, 1 << 24, torch.device("cpu"))  # a cache made for 16M tokens
    assert copy.keys.shape[2] < (1 << 24) // 8 // 100


def test_only_sparse_first_steps_keep_a_copy():
    from ihip_compile.kernels.probe_key_copy import MIN_STRIDE, copy_stride

    assert copy_stride(256, 8) == 32  # the default first stage
    assert copy_stride(256, 16) == MIN_STRIDE
    assert copy_stride(256, 256) == 0  # every key probed: a copy would be the whole cache
    assert copy_stride(1, 8) == 0
