"""Pruning RoPE by re-positioning each key once per stage instead of rotating every probe.

The pruning RoPE modes (``prune_stage_ref.probe_key_delta``) score a probed key j, held in the
cache rotated at its index (``R(j) k_raw``), as if it sat at another position. That position
splits into a part fixed per key and a part fixed per query block:
    relative       key at block_pos - RELATIVE_QUERY_DISTANCE:   <q, R(block_pos - 1) k_raw>
    chunk-indexed  key at j // C - (query_at - block_pos):       <q, R(j // C) R(block_pos - query_at) k_raw>
(query_at = min(block_pos, ceil(S_K / C) + window_tokens)). Rotations are orthogonal, so each
score equals ``<R(-b) q, R(t(j) - j) k>`` with the per-block turn b (``block_pos - 1``, or
``block_pos - query_at``) and the per-key target t(j) (0, or j // C): the keys are moved to
t(j) in one pass, the pooled queries are turned by -b, and the stage kernel probes with no
rotation at all. Same scores up to rounding.

Why: the rotation per probe (cos and sin per element) is most of a stage's time. Measured on an
H200 (``reports/bench/shared_rotation/stage0_rope_cost.json``): stage 0 of a 32k-token prefill
chunk at 1M keys takes 132 ms rotating probes and 35 ms without rotation. A prefill chunk's 512
query blocks probe each cached key ~37 times at stage 0; moving every key once costs one pass
over the keys. A decode step (one query block) probes at most as many keys as the cache holds,
so there the rotation stays in the kernel (``worth_positioning``).
Cost: a transient copy of the layer's keys on the device per stage that uses it (relative mode:
one copy shared by all stages).
"""

from __future__ import annotations

import torch

from ihip_compile.kernels.bank_kv import BankKV
from ihip_compile.kernels.host_keys import BlockMajorKeys
from ihip_compile.kernels.prune_stage_ref import (
    PRUNE_ROPE_CHUNK_INDEXED, PRUNE_ROPE_RELATIVE, PRUNE_ROPE_TRUE, RELATIVE_QUERY_DISTANCE,
    first_probe_count,
)
from ihip_compile.kernels.rope_delta_ref import rotate_by_delta

# Moving pays once a stage probes more than this many keys per cached key. From H200 timings at
# 1M keys, 8 KV heads (reports/bench/shared_rotation/stage0_rope_cost.json): rotating a probe in
# the kernel costs ~0.16 ns per KV head when probes are dense (every key of a decode step:
# 2.48 vs 1.17 ms) to ~0.39 ns when sparse (decode, 8 first probes: 0.355 vs 0.124 ms for ~74k
# probes); moving every key costs ~0.18 ns per key and head (1.53 ms). Probing every key once
# (exact chunk maxima at decode) is then cheaper in the kernel; a prefill chunk (~37 probes per
# key at stage 0) moves. Those were the precise cos/sin (now fp32 data only); with the approximate
# ones (16-bit data on the GPU) rotating costs ~0.06 ns a probe and head and moving ~0.13 ns a key
# and head (reports/bench/fast_rotation/stage0_rope_cost.json), a break-even near 2: selections
# between 1 and 2 probes per key (rare: a few query blocks) move where rotating is a little cheaper.
_PROBES_PER_KEY_TO_MOVE = 1.0
_MOVABLE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def probes_per_chunk(chunk_size: int, first_probes: int) -> int:
    """Keys one chunk's search scores: the first step's parts, then two per halving step."""
    if chunk_size == 1:
        return 1
    parts = first_probe_count(first_probes, chunk_size)
    return parts + 2 * ((chunk_size // parts).bit_length() - 1)


def worth_positioning(rope_mode: int, rope_layout: int, keys, n_probed: int) -> bool:
    """Whether moving every key once beats rotating ``n_probed`` probes (counted for one KV head,
    over all batch rows and query blocks). Never for keys in bank slots (``bank_kv``): the bank
    holds only the keys a stage probes, and a moved copy would take all of them."""
    if (rope_mode == PRUNE_ROPE_TRUE or not rope_layout or keys.dtype not in _MOVABLE_DTYPES
            or isinstance(keys, BankKV)):
        return False
    b, _, s_k, _ = keys.shape
    return n_probed > _PROBES_PER_KEY_TO_MOVE * b * s_k


def key_targets(rope_mode: int, s_k: int, chunk_size: int, device) -> torch.Tensor:
    """Rotation [S_K] (in positions) that moves key j from j to where the mode scores it."""
    j = torch.arange(s_k, device=device, dtype=torch.int32)
    target = j // chunk_size if rope_mode == PRUNE_ROPE_CHUNK_INDEXED else torch.zeros_like(j)
    return target - j


def query_turns(rope_mode: int, block_pos, s_k: int, chunk_size: int, window_tokens: int):
    """Rotation [B, NQB] (in positions) of each query block's pooled queries: -b above."""
    block_pos = block_pos.long()
    if rope_mode == PRUNE_ROPE_CHUNK_INDEXED:
        n_chunks = -(-s_k // chunk_size)
        return torch.clamp(block_pos, max=n_chunks + window_tokens) - block_pos
    return RELATIVE_QUERY_DISTANCE - block_pos


def moved_keys(keys, delta, rope: dict, use_triton: bool) -> torch.Tensor:
    """Keys [B, H_KV, S_K, D] each rotated by ``delta[j]`` (``BlockMajorKeys`` accepted)."""
    if isinstance(keys, BlockMajorKeys):
        keys = keys.as_tensor()
    args = (rope["inv_freq"], rope["rotary_dim"], rope["rope_layout"])
    if not use_triton:
        return rotate_by_delta(keys, delta.view(1, 1, -1), *args)
    from ihip_compile.kernels.rope_delta import rotate_positions

    return rotate_positions(keys, delta, *args)


def positioned_scoring_inputs(q_pooled, keys, block_pos, rope_mode: int, rope: dict, *,
                              chunk_size: int, window_tokens: int, n_probed: int,
                              use_triton: bool, memo: dict):
    """``(q_pooled, keys, rope_mode)`` for one stage's kernel: moved keys, turned queries and no
    rotation while probing where that is cheaper (``worth_positioning``), else the inputs as
    given. ``memo`` (one dict per selection) keeps moved keys and turned queries that later
    stages can share."""
    s_k = keys.shape[2]
    shared = rope_mode == PRUNE_ROPE_RELATIVE  # the same targets at every stage
    memo_key = (rope_mode, None if shared else chunk_size)
    if memo_key not in memo:
        if not worth_positioning(rope_mode, rope["rope_layout"], keys, n_probed):
            return q_pooled, keys, rope_mode
        memo.clear()  # one moved copy at a time
        memo[memo_key] = moved_keys(
            keys, key_targets(rope_mode, s_k, chunk_size, q_pooled.device), rope, use_triton)
    # Relative mode turns a block's queries by the same amount at every stage: turned once.
    query_key = ("queries", *memo_key)
    if memo.get(query_key, (None,))[0] is not q_pooled:
        turns = query_turns(rope_mode, block_pos, s_k, chunk_size, window_tokens)
        memo[query_key] = (q_pooled, turned_queries(q_pooled, turns, rope, use_triton))
    return memo[query_key][1], memo[memo_key], PRUNE_ROPE_TRUE


def turned_queries(q_pooled, turns, rope: dict, use_triton: bool) -> torch.Tensor:
    """Pooled queries [B, H, NQB, NPQ, D], each block's rotated by its turn [B, NQB] positions.
    On the GPU one Triton pass (``rope_delta.rotate_by_delta``): in torch the rotation of a 32k
    chunk's pooled queries took about 1 ms per stage (H200, 1M keys:
    ``reports/bench/prefill_profile/``)."""
    args = (rope["inv_freq"], rope["rotary_dim"], rope["rope_layout"])
    if not use_triton:
        return rotate_by_delta(q_pooled, turns[:, None, :, None], *args)
    from ihip_compile.kernels.rope_delta import rotate_by_delta as rotate_rows

    b, h, nqb, npq, d = q_pooled.shape
    per_row = turns.to(torch.int32)[:, None, :, None].expand(b, h, nqb, npq).reshape(-1)
    return rotate_rows(q_pooled.reshape(-1, d), per_row, *args).view(b, h, nqb, npq, d)
