"""Block-sparse attention over sinks + selected blocks + sliding window: the executable spec.

Each query block (BLOCK_Q queries; S_Q == 1 is decode) attends a list of key slots:
    sinks     keys 0 .. sink_tokens - 1                     visible iff j <= p
    selected  block_indices[blk, t] * BLOCK_K + 0..BLOCK_K-1  visible iff sink <= j <= p - window
    window    keys win_lo .. win_lo + win_len - 1            visible iff max(sink, p - window + 1) <= j <= p
where p is the query's key index (q_positions) and, per query block,
    win_lo  = max(sink, first position - window + 1),  win_len = last position - win_lo + 1.
The three sets are disjoint per query, so when the selection covers every key in
[sink, p - window], the result is exactly dense causal attention.

Shapes: q [B, H, S_Q, D]; k, v [B, H_KV, S_K, D]; q_positions [B, S_Q] int;
block_indices [B, NQB, TOPK] int32 sorted, -1 last; returns [B, H, S_Q, D].
Dtypes: scores and softmax in fp32 (scale, optional soft-cap ``c * tanh(s / c)``), probabilities
cast to the value dtype before the product with V (as the kernels do), output in q's dtype.

RoPE renumbering (``remap=True``; StreamingLLM style): sinks keep positions 0..sink-1, the n_valid
selected blocks are renumbered consecutively in their original order right after the sinks, and the
window follows, so the newest selected key sits next to the window and the query. Keys in the cache
are already rotated at their true positions; as only q - k distances matter, each key is rotated by
    sink:      win_lo - sink - n_valid * BLOCK_K
    selected:  win_lo - start - (n_valid - rank) * BLOCK_K      (rank of its block in the list)
    window:    0
and queries stay as they are. ``remap=False`` keeps the true positions (no rotation).
"""

from __future__ import annotations

import torch

from ihip_compile.kernels.bank_kv import rows_at
from ihip_compile.kernels.rope_delta_ref import rotate_by_delta

# Bounds the fp32 score tensor of one group of query blocks (elements).
_SCORE_ELEMENTS_PER_GROUP = 1 << 24


def attention_block_plan(pos_min, pos_max, block_indices, sink_tokens: int, window_tokens: int):
    """Per query block: window start, window length and number of valid selected blocks ([B, NQB])."""
    if window_tokens > 0:
        win_lo = (pos_min + 1 - window_tokens).clamp(min=sink_tokens)
        win_len = (pos_max - win_lo + 1).clamp(min=0)
    else:
        win_lo = pos_max + 1
        win_len = torch.zeros_like(pos_max)
    n_valid = (block_indices >= 0).sum(-1)
    return win_lo.to(torch.int32), win_len.to(torch.int32), n_valid.to(torch.int32)


def slot_keys(block_indices, win_lo, win_len, n_valid, sink, block_k, window_slots, s_k):
    """Key index, usable flag, kind (0 sink, 1 selected, 2 window) and RoPE delta of every slot."""
    b, nqb, topk = block_indices.shape
    dev = block_indices.device
    sink_keys = torch.arange(sink, device=dev).expand(b, nqb, sink)
    blocks = block_indices.long()
    sel_keys = (blocks[..., None] * block_k + torch.arange(block_k, device=dev)).flatten(-2)
    sel_ok = (blocks[..., None] >= 0).expand(b, nqb, topk, block_k).flatten(-2)
    win_off = torch.arange(window_slots, device=dev)
    win_keys = win_lo.long()[..., None] + win_off
    win_ok = win_off < win_len.long()[..., None]
    keys = torch.cat([sink_keys, sel_keys, win_keys], -1)
    ok = torch.cat([torch.ones_like(sink_keys, dtype=torch.bool), sel_ok, win_ok], -1) & (keys < s_k)
    kind = torch.cat([
        torch.zeros(sink, dtype=torch.long, device=dev),
        torch.ones(topk * block_k, dtype=torch.long, device=dev),
        torch.full((window_slots,), 2, dtype=torch.long, device=dev),
    ])
    nv, lo = n_valid.long()[..., None], win_lo.long()[..., None]
    rank = torch.arange(topk, device=dev).repeat_interleave(block_k)
    sel_start = (blocks * block_k).repeat_interleave(block_k, -1)
    delta = torch.cat([
        (lo - sink - nv * block_k).expand(b, nqb, sink),
        lo - sel_start - (nv - rank) * block_k,
        torch.zeros_like(win_keys),
    ], -1)
    return keys.clamp(0, max(s_k - 1, 0)), ok, kind, delta


def block_sparse_attention_ref(
    q, k, v, q_positions, block_indices, *, scale: float, block_size_q: int, sink_tokens: int,
    window_tokens: int, block_size_k: int = 8, softcap: float = 0.0, remap: bool = False,
    inv_freq=None, rotary_dim: int = 0, rope_layout: int = 0,
):
    b, h, s_q, d = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    group = h // h_kv
    pos = q_positions.expand(b, s_q).long()
    block_q = min(block_size_q, 1 << (s_q - 1).bit_length())  # as block_selection.query_blocks
    nqb = -(-s_q // block_q)
    if tuple(block_indices.shape[:2]) != (b, nqb):
        raise ValueError(f"block_indices must be [B={b}, NQB={nqb}, TOPK] for S_Q={s_q} and "
                         f"block_size_q={block_size_q}, got {tuple(block_indices.shape)}")
    pad = nqb * block_q - s_q
    pos_pad = torch.cat([pos, pos[:, -1:].expand(b, pad)], 1) if pad else pos
    q_pad = torch.cat([q, q[:, :, -1:].expand(b, h, pad, d)], 2) if pad else q
    pos_blocks = pos_pad.view(b, nqb, block_q)
    win_lo, win_len, n_valid = attention_block_plan(
        pos_blocks.amin(-1), pos_blocks.amax(-1), block_indices, sink_tokens, window_tokens
    )
    sink = min(sink_tokens, s_k)
    window_slots = int(win_len.max()) if win_len.numel() else 0
    keys, ok, kind, delta = slot_keys(
        block_indices, win_lo, win_len, n_valid, sink, block_size_k, window_slots, s_k
    )
    q_blocks = q_pad.view(b, h_kv, group, nqb, block_q, d)
    slots = keys.shape[-1]
    per_block = h * block_q * slots
    step = max(1, _SCORE_ELEMENTS_PER_GROUP // max(per_block * b, 1))
    outs = []
    for first in range(0, nqb, step):
        sl = slice(first, first + step)
        outs.append(_attend_group(
            q_blocks[:, :, :, sl], k, v, pos_blocks[:, sl], keys[:, sl], ok[:, sl], kind,
            delta[:, sl], scale, softcap, sink_tokens, window_tokens, remap, inv_freq,
            rotary_dim, rope_layout,
        ))
    out = torch.cat(outs, 3).reshape(b, h, nqb * block_q, -1)
    return out[:, :, :s_q]


def _attend_group(q_blocks, k, v, pos, keys, ok, kind, delta, scale, softcap, sink, window,
                  remap, inv_freq, rotary_dim, rope_layout):
    # [B, NB, L, H_KV, D], widened to q's dtype (FP8 bank slots) before any rotation
    k_sel = rows_at(k, keys).to(q_blocks.dtype)
    v_sel = rows_at(v, keys).to(q_blocks.dtype)
    if remap and rope_layout:
        k_sel = rotate_by_delta(k_sel, delta[..., None], inv_freq, rotary_dim, rope_layout)
    acc = torch.promote_types(q_blocks.dtype, torch.float32)  # fp32, or fp64 for the fp64 stick
    scores = torch.einsum("bkgnqd,bnlkd->bkgnql", q_blocks.to(acc), k_sel.to(acc)) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    p = pos[:, :, :, None]  # [B, NB, BQ, 1]
    j = keys[:, :, None, :]  # [B, NB, 1, L]
    kd = kind.view(1, 1, 1, -1)
    visible = (j <= p) & ok[:, :, None, :]
    visible &= (kd != 1) | ((j <= p - window) & (j >= sink))
    visible &= (kd != 2) | (j >= torch.clamp(p - window + 1, min=sink))
    scores = scores.masked_fill(~visible[:, None, None], float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # rows with no visible key give 0
    out = torch.einsum("bkgnql,bnlkd->bkgnqd", probs.to(v_sel.dtype), v_sel)
    return out.to(q_blocks.dtype)
