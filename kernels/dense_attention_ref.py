"""Exact masked attention from a compact mask description: the op's dense path.

The compact description replaces the [B, 1, S_Q, S_K] mask that transformers materialises:
    q_positions  [S_Q] or [B, S_Q] int   key index of each query (causal: key j visible iff j <= it)
    kv_valid     [B, S_K] bool or None   padding: False keys are never visible
    model_window int                     > 0: only keys j > q_position - model_window are visible
    softcap      float                   > 0: scores = softcap * tanh(scores / softcap) (Gemma 2)

Queries are processed in chunks so that the mask built for SDPA stays small (a chunk of queries by
S_K keys), never the whole [S_Q, S_K] mask at long contexts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Bounds the boolean mask built per chunk to about this many elements per batch row.
_MASK_ELEMENTS_PER_CHUNK = 1 << 24


def visible_keys(
    q_positions: torch.Tensor,  # [S_Q] or [B, S_Q]
    s_k: int,
    kv_valid: torch.Tensor | None,  # [B, S_K]
    model_window: int,
) -> torch.Tensor:
    """Boolean visibility [B or 1, 1, S_Q, S_K] for the given queries."""
    pos = q_positions if q_positions.dim() == 2 else q_positions.unsqueeze(0)
    keys = torch.arange(s_k, device=pos.device)
    visible = keys[None, None, :] <= pos[:, :, None]  # [B|1, S_Q, S_K]
    if model_window > 0:
        visible = visible & (keys[None, None, :] > pos[:, :, None] - model_window)
    if kv_valid is not None:
        visible = visible & kv_valid[:, None, :].to(torch.bool)
    return visible.unsqueeze(1)


def _is_plain_causal(q_positions: torch.Tensor, s_q: int, s_k: int) -> bool:
    """True when the queries are the last S_Q keys in order (SDPA's bottom-right causal)."""
    if q_positions.dim() != 1 or s_q != s_k:
        return False
    return bool((q_positions == torch.arange(s_k, device=q_positions.device)).all())


def dense_attention(
    q: torch.Tensor,  # [B, H, S_Q, D]
    k: torch.Tensor,  # [B, H_KV, S_K, D]
    v: torch.Tensor,  # [B, H_KV, S_K, D_V]
    q_positions: torch.Tensor,
    kv_valid: torch.Tensor | None = None,
    *,
    scale: float,
    softcap: float = 0.0,
    model_window: int = 0,
) -> torch.Tensor:  # [B, H, S_Q, D_V]
    s_q, s_k = q.shape[-2], k.shape[-2]
    gqa = q.shape[1] != k.shape[1]
    if softcap > 0:
        return _softcapped_attention(q, k, v, q_positions, kv_valid, scale, softcap, model_window)
    if kv_valid is None and model_window <= 0 and _is_plain_causal(q_positions, s_q, s_k):
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=gqa)
    chunk = max(1, _MASK_ELEMENTS_PER_CHUNK // max(s_k, 1))
    outs = []
    for start in range(0, s_q, chunk):
        pos = q_positions[..., start : start + chunk]
        mask = visible_keys(pos, s_k, kv_valid, model_window)
        outs.append(
            F.scaled_dot_product_attention(
                q[:, :, start : start + chunk], k, v, attn_mask=mask, scale=scale, enable_gqa=gqa
            )
        )
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]


def _softcapped_attention(q, k, v, q_positions, kv_valid, scale, softcap, model_window):
    """Eager attention with tanh soft-capping, in query chunks, fp32 softmax as transformers does."""
    group = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(group, dim=1) if group > 1 else k
    v = v.repeat_interleave(group, dim=1) if group > 1 else v
    s_k = k.shape[-2]
    chunk = max(1, _MASK_ELEMENTS_PER_CHUNK // max(s_k, 1))
    outs = []
    for start in range(0, q.shape[-2], chunk):
        scores = torch.matmul(q[:, :, start : start + chunk], k.transpose(-1, -2)) * scale
        scores = softcap * torch.tanh(scores / softcap)
        mask = visible_keys(q_positions[..., start : start + chunk], s_k, kv_valid, model_window)
        # The dtype minimum, as transformers' additive mask: a query that sees no key (a padded
        # row) averages all values instead of producing NaN that would spread through the batch.
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        probs = torch.softmax(scores.float(), dim=-1).to(q.dtype)
        outs.append(torch.matmul(probs, v))
    return torch.cat(outs, dim=2) if len(outs) > 1 else outs[0]
