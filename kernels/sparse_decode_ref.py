"""Decode (one query token) block-sparse attention: the spec of ``sparse_decode``.

It is block-sparse attention (``block_sparse_attention_ref``, whose docstring has the rules) with
S_Q == 1: one query block holding the single query.
"""

from __future__ import annotations

import torch

from ihip_compile.kernels.block_sparse_attention_ref import block_sparse_attention_ref


def sparse_decode_ref(
    q, k, v, block_indices, q_positions=None, *, scale: float, sink_tokens: int,
    window_tokens: int, block_size_k: int = 8, softcap: float = 0.0, remap: bool = False,
    inv_freq=None, rotary_dim: int = 0, rope_layout: int = 0, num_splits=None,
):
    """q [B, H, 1, D]; block_indices [B, 1, TOPK]; q_positions [B, 1] (default S_K - 1); k, v
    tensors or ``bank_kv.BankKV`` (the tensors of their ``as_tensor``)."""
    b, s_k = q.shape[0], k.shape[2]
    if q.shape[2] != 1:
        raise ValueError(f"sparse_decode takes one query token (S_Q == 1), got S_Q={q.shape[2]}")
    if q_positions is None:
        q_positions = torch.full((b, 1), s_k - 1, device=q.device, dtype=torch.long)
    return block_sparse_attention_ref(
        q, k, v, q_positions.expand(b, 1), block_indices, scale=scale, block_size_q=1,
        sink_tokens=sink_tokens, window_tokens=window_tokens, block_size_k=block_size_k,
        softcap=softcap, remap=remap, inv_freq=inv_freq, rotary_dim=rotary_dim,
        rope_layout=rope_layout,
    )
