"""match_rope: layout, rotary dim and the frequency source of each site's query."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pass_graphs import compile_and_run, qkv


def _rotate_half(x):
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def _angles_broadcast(inv_freq, positions):
    """cos/sin built as the newest transformers does: a broadcast multiply, not a matmul."""
    freqs = (inv_freq[None, :, None].float() * positions[:, None, :].float()).transpose(1, 2)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos()[:, None], emb.sin()[:, None]


def test_rotate_half_with_broadcast_angles_records_inv_freq():
    def attend(q, k, v, inv_freq, positions):
        cos, sin = _angles_broadcast(inv_freq, positions)
        q = q * cos + _rotate_half(q) * sin
        k = k * cos + _rotate_half(k) * sin
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    q, k, v = qkv()
    inv_freq = 1.0 / 10000 ** (torch.arange(0, 8, 2).float() / 8)
    out, ref, result = compile_and_run(attend, q, k, v, inv_freq, torch.arange(6)[None])
    (rewrite,) = result.context.rewrites
    assert (rewrite.rope_layout, rewrite.rotary_dim) == ("rotate_half", 8)
    assert rewrite.inv_freq_source.startswith("inv_freq")
    (op,) = [n for n in result.gm.graph.nodes if "ihip" in str(n.target)]
    assert op.args[5].op == "placeholder"  # the frequency input itself
    torch.testing.assert_close(out, ref)


def test_partial_rotary_records_rotated_channels_only():
    def attend(q, k, v, inv_freq, positions):
        cos, sin = _angles_broadcast(inv_freq, positions)
        q_rot, q_pass = q[..., :4], q[..., 4:]
        q = torch.cat([q_rot * cos + _rotate_half(q_rot) * sin, q_pass], dim=-1)
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    inv_freq = 1.0 / 10000 ** (torch.arange(0, 4, 2).float() / 4)
    out, ref, result = compile_and_run(attend, *qkv(), inv_freq, torch.arange(6)[None])
    (rewrite,) = result.context.rewrites
    assert (rewrite.rope_layout, rewrite.rotary_dim) == ("rotate_half", 4)
    torch.testing.assert_close(out, ref)


def test_unrecognised_rotation_is_recorded_as_none():
    def attend(q, k, v):
        q = torch.cat((q[..., 1:], q[..., :1]), dim=-1)  # a roll: not RoPE
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)

    out, ref, result = compile_and_run(attend, *qkv())
    (rewrite,) = result.context.rewrites
    assert (rewrite.rope_layout, rewrite.rotary_dim) == ("none", 0)
    (op,) = [n for n in result.gm.graph.nodes if "ihip" in str(n.target)]
    assert op.args[5] is None
    torch.testing.assert_close(out, ref)
