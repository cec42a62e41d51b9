"""Triton kernel of a pruning stage that scores every key: exact chunk maxima, streamed.

Spec: ``prune_stage_ref.score_chunks_ref`` with ``first_probes == chunk_size`` (every key of a
chunk probed, so a chunk's score is the maximum over its keys in [key_lo, key_hi), the heads and
the pooled queries). ``prune_stage.score_chunks`` hands such stages here when the keys are a
device tensor and either the chunks are long or there are few of them (its comment has the
measurements).

Why a kernel of its own: the halving kernel walks its probes one dependent step at a time, a
[CHUNK_TILE, D] gather per step and KV head; probing all 256 keys of a chunk that way took 1.15 ms
for a decode query block at 1M keys on an H200 (scripts/stage_rope_cost.py, ``first256``), ~2 GB
read at under half the memory's speed. Here one program streams one chunk, ``block_keys``
contiguous keys per step (chunks shorter than that: several chunks per program, one step), their
RoPE cos/sin computed once for all KV heads, one tensor-core product per head with the head's
GROUP x NPQ query rows.
"""

import torch
import triton
import triton.language as tl

from ihip_compile.kernels._primitives import approximate_trig, jit_growing
from ihip_compile.kernels.probe_scores import (
    key_addressing, key_bases, key_offsets, max_over_heads, probe_delta, probes_per_load,
)


@jit_growing("s_k", "n_chunks", "window_tokens")
def _chunk_maxima_kernel(
    q_ptr, k_ptr, table_ptr, starts_ptr, key_hi_ptr, block_pos_ptr, inv_freq_ptr, out_ptr,
    n_cand, n_blocks, s_k, key_lo, n_chunks, window_tokens, head_dim, blocks_per_row, fold,
    stride_q_b, stride_q_h, stride_q_blk, stride_k_b, stride_k_h, stride_k_blk, stride_k_s,
    stride_c_b, stride_c_blk, KB: tl.constexpr, PAGED: tl.constexpr,
    H_KV: tl.constexpr, GROUP: tl.constexpr, NPQ: tl.constexpr, QROWS: tl.constexpr,
    CHUNK: tl.constexpr, CHUNKS: tl.constexpr, STEP_KEYS: tl.constexpr, BLOCK_D: tl.constexpr,
    ROPE_MODE: tl.constexpr, ROTARY_DIM: tl.constexpr, LAYOUT: tl.constexpr,
    FAST_TRIG: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # CHUNKS chunks per program, STEP_KEYS keys of each per step: one [CHUNKS * STEP_KEYS] tile.
    tile, blk, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    n = tile * CHUNKS + tl.arange(0, CHUNKS)
    n_ok = n < n_cand
    start = tl.load(starts_ptr + b * stride_c_b + blk * stride_c_blk + n, mask=n_ok, other=-1)
    key_hi = tl.load(key_hi_ptr + b * n_blocks + blk)
    block_pos = tl.load(block_pos_ptr + b * n_blocks + blk)
    vlo = tl.maximum(start, key_lo)
    vhi = tl.minimum(tl.minimum(start + CHUNK, key_hi), s_k)
    usable = n_ok & (start >= 0) & (vlo < vhi)
    q_base = q_ptr + b * stride_q_b + blk * stride_q_blk
    k_base, table_base = key_bases(k_ptr, table_ptr, b, stride_k_b, blocks_per_row, fold, PAGED)
    best = tl.full((CHUNKS,), float("-inf"), tl.float32)
    if tl.max(usable.to(tl.int32), 0) != 0:
        for sub in range(0, CHUNK, STEP_KEYS):
            at = start[:, None] + sub + tl.arange(0, STEP_KEYS)[None, :]
            ok = usable[:, None] & (at >= vlo[:, None]) & (at < vhi[:, None])
            keys_at = tl.reshape(at, (CHUNKS * STEP_KEYS,))
            ok_flat = tl.reshape(ok, (CHUNKS * STEP_KEYS,))
            delta = probe_delta(keys_at, block_pos, n_chunks, window_tokens, CHUNK, ROPE_MODE)
            offsets, readable = key_offsets(keys_at, ok_flat, table_base, stride_k_blk,
                                            stride_k_s, KB, PAGED)
            scores = max_over_heads(k_base, q_base, offsets, readable, stride_k_h, stride_q_h,
                                    head_dim, delta, inv_freq_ptr, H_KV, GROUP, NPQ, QROWS,
                                    BLOCK_D, ROPE_MODE != 0, ROTARY_DIM, LAYOUT, FAST_TRIG,
                                    DOT_PRECISION)
            per_chunk = tl.reshape(tl.where(ok_flat, scores, float("-inf")), (CHUNKS, STEP_KEYS))
            best = tl.maximum(best, tl.max(per_chunk, 1))
    tl.store(out_ptr + (b * n_blocks + blk) * n_cand + n, best, mask=n_ok)


def score_chunk_maxima(q_pooled, k, starts, key_hi, block_pos, *, key_lo: int, chunk_size: int,
                       rope_mode: int, inv_freq, rotary_dim: int, rope_layout: int,
                       window_tokens: int, rope: bool, block_keys: int | None = None,
                       num_warps: int | None = None) -> torch.Tensor:
    """Exact chunk scores [B, NQB, N] (fp32). Inputs as ``prune_stage.score_chunks`` prepares
    them: q_pooled contiguous in k's dtype, k a [B, H_KV, S_K, D] tensor or bank slots
    (``bank_kv.BankKV``: keys of blocks not in the bank read as zeros), starts int32 with unit
    last stride; ``rope`` whether the pruning RoPE applies.
    ``block_keys`` (keys a program scores per step: a power of two >= 16; chunks shorter than
    that share a program; default 64, or 2 chunks' worth below 64-key chunks) and
    ``num_warps`` tune the launch, not the result."""
    b, h, nqb, npq, d = q_pooled.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    n_cand = starts.shape[-1]
    out = torch.empty((b, nqb, n_cand), device=q_pooled.device, dtype=torch.float32)
    if n_cand == 0:
        return out
    group = h // h_kv
    # Long chunks, 64-key steps: rotating every key of 1M for one decode query block on an H200
    # took 0.96 ms with them, 1.27 ms with 32-key steps, 1.41 ms with 16
    # (scripts/stage_rope_cost.py). Short chunks: two per program, at most 32 keys, 2 warps: a
    # decode refresh's stage 1 (1024 chunks of 32 keys at 1M) 0.0318 ms, against 0.0353 with
    # two chunks on 4 warps and 0.1018 on 2; stage 2 (1024 of 8 keys) 0.0125 ms, against 0.0131
    # with four chunks on 4 warps (scripts/chunk_maxima_costs.py,
    # reports/bench/stage0_launch/chunk_maxima_costs.json).
    short = chunk_size < 64
    query_rows = max(16, triton.next_power_of_2(group * npq))
    # Many query rows (GQA 8 and up at prefill) take fewer keys a step: what a program holds.
    fitting = max(16, 1 << (probes_per_load(query_rows, rope).bit_length() - 1))
    block_keys = block_keys or min(fitting, min(32, max(16, 2 * chunk_size)) if short else 64)
    num_warps = num_warps or (2 if short else 4)
    if block_keys < 16 or block_keys & (block_keys - 1):
        raise ValueError(f"block_keys must be a power of two >= 16, got {block_keys}")
    step_keys = min(block_keys, triton.next_power_of_2(chunk_size))
    chunks = block_keys // step_keys
    memory, where = key_addressing(k)
    _chunk_maxima_kernel[(triton.cdiv(n_cand, chunks), nqb, b)](
        q_pooled, memory, where["table"], starts, key_hi.to(torch.int32).contiguous(),
        block_pos.to(torch.int32).contiguous(), inv_freq.float().contiguous() if rope else out,
        out, n_cand, nqb, s_k, key_lo, -(-s_k // chunk_size), window_tokens, d,
        where["blocks_per_row"], where["fold"],
        q_pooled.stride(0), q_pooled.stride(1), q_pooled.stride(2), where["stride_b"],
        where["stride_h"], where["stride_blk"], where["stride_s"], starts.stride(0),
        starts.stride(1), KB=where["keys_per_block"], PAGED=where["paged"], H_KV=h_kv,
        GROUP=group, NPQ=npq, QROWS=query_rows, CHUNK=chunk_size, CHUNKS=chunks,
        STEP_KEYS=step_keys,
        BLOCK_D=max(16, triton.next_power_of_2(d)),
        ROPE_MODE=rope_mode if rope else 0, ROTARY_DIM=max(rotary_dim, 2),
        LAYOUT=rope_layout if rope else 1, FAST_TRIG=rope and approximate_trig(q_pooled),
        DOT_PRECISION="ieee" if q_pooled.dtype == torch.float32 else "tf32",
        num_warps=num_warps,
    )
    return out
