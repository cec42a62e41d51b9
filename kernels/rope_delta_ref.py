"""Re-positioning keys (or queries) that are already rotated by RoPE: the executable spec.

Caches hold keys rotated at their true positions. RoPE rotations compose, so moving a key from
position ``p`` to position ``p + delta`` is one more rotation by ``delta``:
    x_new[c] = x[c] * cos(delta * f[c]) + sign[c] * x[partner[c]] * sin(delta * f[c])   c < rotary_dim
    x_new[c] = x[c]                                                                       otherwise
Layouts (``rope_layout``):
    1 rotate_half  (Llama, Qwen, Mistral, Gemma, NeoX): pairs (c, c + R/2); f[c] = inv_freq[c mod R/2]
    2 interleaved  (GPT-J):                              pairs (2i, 2i + 1); f[c] = inv_freq[c // 2]
with R = ``rotary_dim`` and ``inv_freq`` of R/2 entries. The first member of a pair gets sign -1,
the second +1. The angle is computed in fp32, as the kernels do (``_primitives.rotate_by_delta``).
"""

from __future__ import annotations

import torch

ROPE_NONE, ROPE_ROTATE_HALF, ROPE_INTERLEAVED = 0, 1, 2


def rope_pairing(head_dim: int, rotary_dim: int, layout: int, device=None):
    """Per column: partner column, sign, frequency index and whether it rotates (all [D])."""
    cols = torch.arange(head_dim, device=device)
    half = max(rotary_dim // 2, 1)
    if layout == ROPE_ROTATE_HALF:
        first = cols < half
        partner = torch.where(first, cols + half, cols - half)
        freq_index = cols % half
    elif layout == ROPE_INTERLEAVED:
        first = cols % 2 == 0
        partner = torch.where(first, cols + 1, cols - 1)
        freq_index = cols // 2
    else:
        raise ValueError(f"rope_layout must be 1 (rotate_half) or 2 (interleaved), got {layout}")
    rotated = cols < rotary_dim
    partner = torch.where(rotated, partner, cols)
    sign = torch.where(first, -1.0, 1.0)
    return partner, sign, freq_index.clamp(max=half - 1), rotated


def rotate_by_delta(
    x: torch.Tensor,  # [..., D]
    delta: torch.Tensor,  # broadcastable to x.shape[:-1], int or float positions
    inv_freq: torch.Tensor,  # [rotary_dim // 2]
    rotary_dim: int,
    layout: int,
) -> torch.Tensor:  # [..., D], x.dtype
    """Rotate vectors already at some position by ``delta`` more positions (fp32 math)."""
    if rotary_dim <= 0 or rotary_dim > x.shape[-1] or rotary_dim % 2:
        raise ValueError(f"rotary_dim must be even and in (0, {x.shape[-1]}], got {rotary_dim}")
    if inv_freq.numel() != rotary_dim // 2:
        raise ValueError(f"inv_freq needs rotary_dim/2 = {rotary_dim // 2} entries, got {inv_freq.numel()}")
    partner, sign, freq_index, rotated = rope_pairing(x.shape[-1], rotary_dim, layout, x.device)
    acc = torch.promote_types(x.dtype, torch.float32)  # fp32, or fp64 for the fp64 stick
    xf = x.to(acc)
    angle = delta.to(acc).unsqueeze(-1) * inv_freq.to(acc)[freq_index]  # [..., D]
    turned = xf * torch.cos(angle) + sign * xf[..., partner] * torch.sin(angle)
    return torch.where(rotated, turned, xf).to(x.dtype)
