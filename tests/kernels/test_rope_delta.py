"""RoPE re-positioning: the jit helper against its reference, the reference against the models'
own RoPE formulas (rotate_half and GPT-J's interleaved), and composition of rotations."""

import pytest
import torch

from ihip_compile.kernels import rope_delta_ref
from tests.helpers import assert_matches_reference
from tests.kernels.conftest import DEVICE


def _inv_freq(rotary_dim, base=10000.0):
    return 1.0 / base ** (torch.arange(0, rotary_dim, 2, dtype=torch.float32) / rotary_dim)


def _hf_rope(x, positions, inv_freq, rotary_dim, layout):
    """RoPE as transformers applies it (from raw x at position 0 to ``positions``)."""
    rot, rest = x[..., :rotary_dim], x[..., rotary_dim:]
    freqs = positions.double()[:, None] * inv_freq.double()[None, :]
    if layout == 1:
        emb = torch.cat([freqs, freqs], -1)
        x1, x2 = rot[..., : rotary_dim // 2], rot[..., rotary_dim // 2:]
        turned = torch.cat([-x2, x1], -1)
    else:
        emb = freqs.repeat_interleave(2, -1)
        turned = torch.stack([-rot[..., 1::2], rot[..., ::2]], -1).flatten(-2)
    return torch.cat([rot * emb.cos() + turned * emb.sin(), rest], -1)


@pytest.mark.parametrize("layout", [1, 2])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (96, 32), (32, 24)])
def test_reference_matches_model_rope(layout, head_dim, rotary_dim):
    gen = torch.Generator().manual_seed(head_dim + layout)
    x = torch.randn(9, head_dim, generator=gen, dtype=torch.float64)
    pos = torch.randint(0, 5000, (9,), generator=gen)
    delta = torch.randint(-3000, 3000, (9,), generator=gen)
    inv = _inv_freq(rotary_dim)
    moved = rope_delta_ref.rotate_by_delta(_hf_rope(x, pos, inv, rotary_dim, layout), delta, inv,
                                           rotary_dim, layout)
    direct = _hf_rope(x, pos + delta, inv, rotary_dim, layout)
    assert (moved - direct).abs().max() < 1e-9


@pytest.mark.parametrize("layout", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (96, 32)])
@pytest.mark.parametrize("max_delta", [4000, 4_194_304])  # within a window; 4M-token distances
def test_kernel_matches_reference(layout, dtype, head_dim, rotary_dim, max_delta):
    from ihip_compile.kernels.rope_delta import rotate_by_delta

    gen = torch.Generator().manual_seed(7)
    x = torch.randn(21, head_dim, generator=gen).to(DEVICE, dtype)
    delta = torch.randint(-max_delta, max_delta, (21,), generator=gen).to(DEVICE)
    inv = _inv_freq(rotary_dim).to(DEVICE)
    out = rotate_by_delta(x, delta, inv, rotary_dim, layout)
    assert_matches_reference(out, rope_delta_ref.rotate_by_delta, x, delta, inv, rotary_dim, layout)


@pytest.mark.parametrize("rotary_dim,layout", [(0, 1), (7, 1), (128, 1), (64, 3)])
def test_reference_rejects_bad_rotary_arguments(rotary_dim, layout):
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="rotary_dim|rope_layout"):
        rope_delta_ref.rotate_by_delta(x, torch.zeros(2), _inv_freq(max(rotary_dim, 2)),
                                       rotary_dim, layout)


@pytest.mark.parametrize("layout", [1, 2])
@pytest.mark.parametrize("head_dim,rotary_dim", [(64, 64), (96, 32)])
def test_rotate_positions_matches_reference(layout, head_dim, rotary_dim):
    from ihip_compile.kernels.rope_delta import rotate_positions

    gen = torch.Generator().manual_seed(head_dim + layout)
    longer = torch.randn(2, 3, 60, head_dim, generator=gen).to(DEVICE, torch.bfloat16)
    x = longer[:, :, :45]  # a slice of a longer buffer, as a cache's keys often are
    delta = torch.randint(-2_000_000, 2_000_000, (45,), generator=gen).to(DEVICE)
    inv = _inv_freq(rotary_dim).to(DEVICE)

    def per_position(x, delta, inv):
        return rope_delta_ref.rotate_by_delta(x, delta.view(1, 1, -1), inv, rotary_dim, layout)

    out = rotate_positions(x, delta, inv, rotary_dim, layout)
    assert out.is_contiguous()
    assert_matches_reference(out, per_position, x, delta, inv)


def test_approximate_trig_only_for_16_bit_data_on_the_gpu():
    import triton

    from ihip_compile.kernels._primitives import approximate_trig

    assert not approximate_trig(torch.empty(2, dtype=torch.bfloat16))  # host memory
    assert not approximate_trig(torch.empty(2, dtype=torch.float32, device=DEVICE))
    on_gpu = DEVICE == "cuda" and not triton.knobs.runtime.interpret
    assert approximate_trig(torch.empty(2, dtype=torch.float16, device=DEVICE)) == on_gpu
