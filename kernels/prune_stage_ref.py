"""One pruning stage of InfiniteHiP (arXiv 2502.08910, section 3): the executable spec.

Every candidate chunk of ``chunk_size`` keys gets one score, found by a first split into
P = min(first_probes, chunk_size) parts, then halving:

    lo, size = chunk_start, chunk_size
    part = size // P
    s_i = score(lo + i * part + part // 2) for i < P             # middle key of each part
    best = max_i s_i;  lo += part * (first i with s_i == best);  size = part
    repeat log2(size) times:
        half = size // 2
        left, right = lo + half // 2, lo + half + half // 2       # middle key of each half
        s_left, s_right = score(left), score(right)               # probes clamped into [key_lo, key_hi)
        best = max(best, s_left, s_right)
        if s_right > s_left: lo += half                           # keep the better half
        size = half
    (a chunk of one key scores that key)

P = 2 is the paper's plain halving (2 log2(C) probes in log2(C) dependent steps). A larger first
split (the default, 8) bounds the distance from any key to its nearest first-step probe by
C / (2P) instead of C / 4, for about the same probe count (P + 2 log2(C / P)) in fewer dependent
steps; with P == C every key is scored (the last, 8-key stage becomes exact).

    score(j) = max over heads h and pooled queries p of the block of  <q_pooled[h, p], rope(k[h_kv(h), j])>

Shapes and sentinels:
    q_pooled      [B, H, NQB, NPQ, D]   queries of each query block, mean-pooled in groups
    k             [B, H_KV, S_K, D]     GQA: head h reads KV head h // (H / H_KV); K is never expanded
    chunk_starts  [B, NQB, N] int32     first key of each candidate chunk; -1 = empty slot
    key_hi        [B, NQB] int32        keys >= key_hi are not candidates (the window's start)
    key_lo        int                   keys < key_lo are not candidates (the sinks)
    returns       [B, NQB, N] fp32      chunk scores; -inf for empty slots and chunks outside
                                        [key_lo, key_hi)
Dtypes: products and scores in fp32 (keys rotated in fp32, then cast back to the key dtype, as the
kernel does before its dot product).

RoPE while scoring (``rope_mode``; keys in the cache are rotated at their true positions):
    0 true positions (no rotation)
    1 relative: each probed key moved next to the query (distance 1 from the block's last query)
    2 chunk-indexed: key j placed at position j // chunk_size, the query at
      min(p, n_chunks + window_tokens) with n_chunks = ceil(S_K / chunk_size)
Each is a rotation of the key by ``probe_key_delta`` (``rope_delta_ref.rotate_by_delta``).
"""

from __future__ import annotations

import torch

from ihip_compile.kernels.rope_delta_ref import rotate_by_delta

PRUNE_ROPE_TRUE, PRUNE_ROPE_RELATIVE, PRUNE_ROPE_CHUNK_INDEXED = 0, 1, 2
RELATIVE_QUERY_DISTANCE = 1
DEFAULT_FIRST_PROBES = 8


def probe_key_delta(key, block_pos, rope_mode, chunk_size, n_chunks, window_tokens):
    """Rotation (in positions) applied to a probed key at index ``key`` (int tensor)."""
    if rope_mode == PRUNE_ROPE_RELATIVE:
        return block_pos - RELATIVE_QUERY_DISTANCE - key
    if rope_mode == PRUNE_ROPE_CHUNK_INDEXED:
        query_at = torch.clamp(block_pos, max=n_chunks + window_tokens)
        return key // chunk_size - key - (query_at - block_pos)
    return torch.zeros_like(key)


def first_probe_count(first_probes: int, chunk_size: int) -> int:
    """Parts of the first probing step: a power of two in [2, chunk_size]."""
    if first_probes < 2 or first_probes & (first_probes - 1):
        raise ValueError(f"first_probes must be a power of two >= 2, got {first_probes}")
    return min(first_probes, chunk_size)


def score_chunks_ref(
    q_pooled: torch.Tensor,  # [B, H, NQB, NPQ, D]
    k: torch.Tensor,  # [B, H_KV, S_K, D]
    chunk_starts: torch.Tensor,  # [B, NQB, N] int32
    key_hi: torch.Tensor,  # [B, NQB] int32
    block_pos: torch.Tensor,  # [B, NQB] int32, last query position of each block
    *,
    key_lo: int,
    chunk_size: int,
    rope_mode: int = PRUNE_ROPE_TRUE,
    inv_freq: torch.Tensor | None = None,
    rotary_dim: int = 0,
    rope_layout: int = 0,
    window_tokens: int = 0,
    first_probes: int = DEFAULT_FIRST_PROBES,
) -> torch.Tensor:  # [B, NQB, N] fp32
    b, h, nqb, npq, d = q_pooled.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    group = h // h_kv
    n_chunks = -(-s_k // chunk_size)
    starts = chunk_starts.long()
    hi = key_hi.long()[:, :, None]
    valid_lo = torch.clamp(starts, min=key_lo)
    valid_hi = torch.minimum(starts + chunk_size, hi)
    usable = (starts >= 0) & (valid_lo < valid_hi)
    k_by_token = k.transpose(1, 2)  # [B, S_K, H_KV, D]
    acc = torch.promote_types(q_pooled.dtype, torch.float32)
    q_grouped = q_pooled.to(acc).reshape(b, h_kv, group, nqb, npq, d)
    batch = torch.arange(b, device=k.device)[:, None, None]

    def score(probe):  # probe [B, NQB, N] -> [B, NQB, N]
        probe = torch.minimum(torch.maximum(probe, valid_lo), valid_hi - 1).clamp(0, s_k - 1)
        keys = k_by_token[batch, probe]  # [B, NQB, N, H_KV, D]
        if rope_mode != PRUNE_ROPE_TRUE and rope_layout:
            delta = probe_key_delta(
                probe, block_pos.long()[:, :, None], rope_mode, chunk_size, n_chunks,
                window_tokens,
            )
            keys = rotate_by_delta(keys, delta[..., None], inv_freq, rotary_dim, rope_layout)
        dots = torch.einsum("bkgqpd,bqnkd->bqnkgp", q_grouped, keys.to(acc))
        return dots.flatten(3).amax(-1)

    lo = starts.clone()
    if chunk_size == 1:
        best = score(lo)
    else:
        parts = first_probe_count(first_probes, chunk_size)
        part = chunk_size // parts
        firsts = torch.stack([score(lo + i * part + part // 2) for i in range(parts)], -1)
        best, pick = firsts.max(-1)  # ties: the first part, as the kernel does
        lo = lo + pick * part
        size = part
        while size > 1:
            half = size // 2
            s_left = score(lo + half // 2)
            s_right = score(lo + half + half // 2)
            best = torch.maximum(best, torch.maximum(s_left, s_right))
            lo = torch.where(s_right > s_left, lo + half, lo)
            size = half
    return best.masked_fill(~usable, float("-inf"))
