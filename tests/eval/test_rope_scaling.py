"""RoPE scaling types reach the kernels through the model's own ``inv_freq``.

Keys in a transformers cache are rotated by the model (scaling folded into ``inv_freq``; yarn's
attention factor multiplies cos and sin). The kernels move such a key to a new position with one
more rotation by the difference (``rope_delta_ref.rotate_by_delta``) using that same ``inv_freq``.
For every scaling type this must give the key the model itself would have rotated to the new
position. Tolerance: the fp32 error transformers makes at both positions (fp64 stick), doubled.
"""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb

from ihip_compile.kernels.rope_delta_ref import ROPE_ROTATE_HALF, rotate_by_delta

HEAD_DIM, THETA, TRAINED = 64, 1e5, 8192
SCALINGS = {
    "default": {},
    "linear": {"factor": 4.0},
    "dynamic": {"factor": 4.0},
    "llama3": {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": TRAINED},
    "yarn": {"factor": 4.0, "original_max_position_embeddings": TRAINED},
}


def rotary(rope_type: str) -> LlamaRotaryEmbedding:
    config = LlamaConfig(hidden_size=HEAD_DIM * 2, num_attention_heads=2, num_key_value_heads=1,
                         max_position_embeddings=TRAINED,
                         rope_parameters={"rope_type": rope_type, "rope_theta": THETA,
                                          **SCALINGS[rope_type]})
    return LlamaRotaryEmbedding(config)


def model_rotation(module, x, positions):
    """Keys as the model rotates them (fp32 cos/sin from the module), [1, 1, S, D]."""
    cos, sin = module(x, positions[None])
    return apply_rotary_pos_emb(x, x, cos, sin)[1]


def exact_rotation(module, x, positions):
    """The same rotation in fp64 from the module's inv_freq and attention scaling."""
    angle = positions.double()[:, None] * module.inv_freq.double()[None, :]
    angle = torch.cat([angle, angle], -1)
    x = x.double()
    rotated_half = torch.cat([-x[..., HEAD_DIM // 2:], x[..., : HEAD_DIM // 2]], -1)
    return (x * angle.cos() + rotated_half * angle.sin()) * module.attention_scaling


@pytest.mark.parametrize("rope_type", sorted(SCALINGS))
def test_rerotation_matches_model_rotation(rope_type):
    torch.manual_seed(0)
    module = rotary(rope_type)
    keys = torch.randn(1, 1, 48, HEAD_DIM)
    old = torch.randint(0, 200_000, (48,))  # cached positions, far beyond the trained window
    new = torch.randint(0, 3_500, (48,))  # renumbered positions inside it
    if rope_type == "dynamic":
        # dynamic NTK recomputes inv_freq from the longest position of a forward; both rotations
        # below must see the same one, as one forward's cached and renumbered keys do.
        module(keys, torch.tensor([[int(old.max())]]))
    cached = model_rotation(module, keys, old)
    ours = rotate_by_delta(cached, (new - old)[None, None], module.inv_freq, HEAD_DIM,
                           ROPE_ROTATE_HALF)
    truth = exact_rotation(module, keys, new)
    err_ours = (ours.double() - truth).abs().max()
    err_model = (model_rotation(module, keys, new).double() - truth).abs().max() + (
        cached.double() - exact_rotation(module, keys, old)).abs().max()
    assert err_ours <= 2 * err_model + 1e-6, (rope_type, float(err_ours), float(err_model))


def test_yarn_attention_factor_stays_in_rotated_keys():
    module = rotary("yarn")
    assert module.attention_scaling > 1.0  # otherwise this test proves nothing
    keys = torch.randn(1, 1, 8, HEAD_DIM)
    cached = model_rotation(module, keys, torch.arange(8) * 1000)
    moved = rotate_by_delta(cached, torch.full((1, 1, 8), -5), module.inv_freq, HEAD_DIM,
                            ROPE_ROTATE_HALF)
    torch.testing.assert_close(moved.norm(dim=-1), keys.norm(dim=-1) * module.attention_scaling)
