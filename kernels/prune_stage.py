"""Triton kernel of one pruning stage: score every candidate chunk by a halving probe search.

Algorithm and shapes: ``prune_stage_ref.score_chunks_ref`` (the spec); InfiniteHiP section 3.
One program scores CHUNK_TILE chunks of one query block: a first step probing the middle key of
each of FIRST_PROBES parts, then halving steps probing the middle key of both halves, for every
KV head (keys gathered, never expanded for GQA; the query rows of a KV head are its GROUP query
heads times NPQ pooled queries, one tensor-core product). Programs of few chunks (decode) gather
FIRST_GROUP parts of each chunk, and both halves, as one tile: fewer dependent loads in a row.
Keys in host memory (``host_keys``) may come with a device copy of the first step's probes
(``probe_key_copy``): COPY reads those there, the rest where the keys lie.

Changes vs hip-attention: one stage kernel reused for every stage (stages are data), scores are
the max over the heads of the sequence it is given (the op gives one KV head and its query heads
per sequence: one selection per KV head, ``kv_head_groups.py``), RoPE is re-applied to the cached
(already rotated) keys by a delta rotation instead of rotating raw keys.
Caution: the halving search can miss an isolated high key whose chunk's probes are all low; a
needle a few dozen keys wide is found (tests/kernels/test_block_selection.py).
Differences vs the reference: probes that tie exactly (s_right == s_left) keep the left half in
both; fp32 inputs use IEEE products so that ties are as rare as in the reference.
"""


import torch
import triton
import triton.language as tl

from ihip_compile.kernels._primitives import approximate_trig, jit_growing
from ihip_compile.kernels.chunk_maxima import score_chunk_maxima
from ihip_compile.kernels.host_keys import BlockMajorKeys
from ihip_compile.kernels.probe_scores import (
    key_addressing, key_bases, key_offsets, max_over_heads, probe_delta, probes_per_load,
)
from ihip_compile.kernels.prune_stage_ref import (
    DEFAULT_FIRST_PROBES, PRUNE_ROPE_CHUNK_INDEXED, PRUNE_ROPE_RELATIVE, first_probe_count,
)


@triton.jit
def _probe_score(q_ptr, k_ptr, table_base, inv_freq_ptr, probe, usable, vlo, vhi, block_pos,
                 s_k, n_chunks, window_tokens, stride_k_h, stride_k_blk, stride_k_s, stride_q_h,
                 head_dim, c_ptr, n_copy, stride_c_h, stride_c_j, KB: tl.constexpr,
                 PAGED: tl.constexpr, H_KV: tl.constexpr, GROUP: tl.constexpr,
                 NPQ: tl.constexpr, QROWS: tl.constexpr, CHUNK: tl.constexpr,
                 BLOCK_D: tl.constexpr, ROPE_MODE: tl.constexpr, ROTARY_DIM: tl.constexpr,
                 LAYOUT: tl.constexpr, FAST_TRIG: tl.constexpr, DOT_PRECISION: tl.constexpr,
                 COPY: tl.constexpr, PART: tl.constexpr):
    """Max over heads and pooled queries of <q, key at probe> for a tile of probes -> [TILE].
    COPY: probes at the middle of a PART-key part among the first ``n_copy`` are read in the
    device copy at ``c_ptr`` (entry = probe // PART), the others where the keys lie."""
    probe = tl.minimum(tl.maximum(probe, vlo), vhi - 1)
    probe = tl.minimum(tl.maximum(probe, 0), s_k - 1)
    delta = probe_delta(probe, block_pos, n_chunks, window_tokens, CHUNK, ROPE_MODE)
    # Keys come in blocks of KB (1: a plain [S, D] row per key; the host store and the banks:
    # BLOCK keys, the banks' through a page table).
    key_offset, host_ok = key_offsets(probe, usable, table_base, stride_k_blk, stride_k_s, KB,
                                      PAGED)
    if COPY:
        in_copy = (probe % PART == PART // 2) & (probe // PART < n_copy)
        host_ok = host_ok & ~in_copy
    score = max_over_heads(k_ptr, q_ptr, key_offset, host_ok, stride_k_h, stride_q_h, head_dim,
                           delta, inv_freq_ptr, H_KV, GROUP, NPQ, QROWS, BLOCK_D,
                           ROPE_MODE != 0, ROTARY_DIM, LAYOUT, FAST_TRIG, DOT_PRECISION)
    if COPY:  # masked loads of the lanes the other source serves move no bytes
        copied = max_over_heads(c_ptr, q_ptr, (probe // PART).to(tl.int64) * stride_c_j,
                                usable & in_copy, stride_c_h, stride_q_h, head_dim, delta,
                                inv_freq_ptr, H_KV, GROUP, NPQ, QROWS, BLOCK_D, ROPE_MODE != 0,
                                ROTARY_DIM, LAYOUT, FAST_TRIG, DOT_PRECISION)
        score = tl.where(in_copy, copied, score)
    return score


@triton.jit
def _flat(x, TILE: tl.constexpr, WIDTH: tl.constexpr):
    """x broadcast to [TILE, WIDTH], then flattened row by row."""
    return tl.reshape(tl.broadcast_to(x, (TILE, WIDTH)), (TILE * WIDTH,))


@triton.jit
def _probe_grid(q_base, k_base, table_base, inv_freq_ptr, probe, usable, vlo, vhi, block_pos,
                s_k, n_chunks, window_tokens, stride_k_h, stride_k_blk, stride_k_s, stride_q_h,
                head_dim, c_base, n_copy, stride_c_h, stride_c_j, KB: tl.constexpr,
                PAGED: tl.constexpr, H_KV: tl.constexpr, GROUP: tl.constexpr,
                NPQ: tl.constexpr, QROWS: tl.constexpr, CHUNK: tl.constexpr,
                BLOCK_D: tl.constexpr, ROPE_MODE: tl.constexpr, ROTARY_DIM: tl.constexpr,
                LAYOUT: tl.constexpr, FAST_TRIG: tl.constexpr, DOT_PRECISION: tl.constexpr,
                TILE: tl.constexpr, WIDTH: tl.constexpr, COPY: tl.constexpr,
                PART: tl.constexpr):
    """Scores [TILE, WIDTH] of WIDTH probes per chunk (``probe`` [TILE, WIDTH]; the chunk's
    ``usable``, ``vlo``, ``vhi`` [TILE]), all gathered as one tile of keys per head: one
    dependent load per head for the lot instead of one per probe."""
    scores = _probe_score(q_base, k_base, table_base, inv_freq_ptr, _flat(probe, TILE, WIDTH),
                          _flat(usable[:, None], TILE, WIDTH), _flat(vlo[:, None], TILE, WIDTH),
                          _flat(vhi[:, None], TILE, WIDTH), block_pos, s_k, n_chunks,
                          window_tokens, stride_k_h, stride_k_blk, stride_k_s, stride_q_h,
                          head_dim, c_base, n_copy, stride_c_h, stride_c_j, KB, PAGED, H_KV, GROUP,
                          NPQ, QROWS, CHUNK, BLOCK_D, ROPE_MODE, ROTARY_DIM, LAYOUT, FAST_TRIG,
                          DOT_PRECISION, COPY, PART)
    return tl.reshape(scores, (TILE, WIDTH))


@jit_growing("s_k", "n_chunks", "window_tokens", "n_copy")
def _score_chunks_kernel(
    q_ptr, k_ptr, table_ptr, starts_ptr, key_hi_ptr, block_pos_ptr, inv_freq_ptr, out_ptr,
    copy_ptr, n_cand, n_blocks, s_k, key_lo, n_chunks, window_tokens, head_dim, n_copy,
    blocks_per_row, fold,
    stride_q_b, stride_q_h, stride_q_blk, stride_k_b, stride_k_h, stride_k_blk, stride_k_s,
    stride_c_b, stride_c_blk, stride_copy_b, stride_copy_h, stride_copy_j,
    COPY: tl.constexpr, KB: tl.constexpr, PAGED: tl.constexpr, H_KV: tl.constexpr,
    GROUP: tl.constexpr, NPQ: tl.constexpr, QROWS: tl.constexpr,
    CHUNK: tl.constexpr, LOG2_CHUNK: tl.constexpr, FIRST_PROBES: tl.constexpr,
    LOG2_FIRST: tl.constexpr, FIRST_GROUP: tl.constexpr, PAIR_HALVES: tl.constexpr,
    CHUNK_TILE: tl.constexpr,
    BLOCK_D: tl.constexpr, ROPE_MODE: tl.constexpr, ROTARY_DIM: tl.constexpr,
    LAYOUT: tl.constexpr, FAST_TRIG: tl.constexpr, DOT_PRECISION: tl.constexpr,
):
    # Query blocks vary fastest: programs running together probe the same chunks (L2 reuse).
    blk, tile, b = tl.program_id(0), tl.program_id(1), tl.program_id(2).to(tl.int64)
    n = tile * CHUNK_TILE + tl.arange(0, CHUNK_TILE)
    n_ok = n < n_cand
    starts = tl.load(starts_ptr + b * stride_c_b + blk * stride_c_blk + n, mask=n_ok, other=-1)
    key_hi = tl.load(key_hi_ptr + b * n_blocks + blk)
    block_pos = tl.load(block_pos_ptr + b * n_blocks + blk)
    vlo = tl.maximum(starts, key_lo)
    vhi = tl.minimum(starts + CHUNK, key_hi)
    usable = n_ok & (starts >= 0) & (vlo < vhi)
    q_base = q_ptr + b * stride_q_b + blk * stride_q_blk
    k_base, table_base = key_bases(k_ptr, table_ptr, b, stride_k_b, blocks_per_row, fold, PAGED)
    copy_base = copy_ptr + b * stride_copy_b
    lo = starts
    best = tl.full((CHUNK_TILE,), float("-inf"), tl.float32)
    if LOG2_CHUNK == 0:
        best = _probe_score(q_base, k_base, table_base, inv_freq_ptr, lo, usable, vlo, vhi,
                            block_pos, s_k, n_chunks, window_tokens, stride_k_h, stride_k_blk,
                            stride_k_s, stride_q_h, head_dim, copy_base, 0, 0, 0, KB, PAGED,
                            H_KV, GROUP, NPQ,
                            QROWS, CHUNK, BLOCK_D, ROPE_MODE, ROTARY_DIM, LAYOUT, FAST_TRIG,
                            DOT_PRECISION, False, 1)
    else:
        PART: tl.constexpr = CHUNK // FIRST_PROBES
        pick = tl.zeros((CHUNK_TILE,), tl.int32)
        # Runtime loops, not static_range: unrolled, the 18 probe bodies of a 256-key chunk took
        # ~80 s to compile per variant for sm_90 (vs ~10 s), and the steps are a dependent chain.
        # First step: the middle key of each part, FIRST_GROUP parts of every chunk per load.
        for first in range(0, FIRST_PROBES, FIRST_GROUP):
            parts = first + tl.arange(0, FIRST_GROUP)
            s_parts = _probe_grid(q_base, k_base, table_base, inv_freq_ptr,
                                  lo[:, None] + (parts * PART + PART // 2)[None, :], usable, vlo,
                                  vhi, block_pos, s_k, n_chunks, window_tokens, stride_k_h,
                                  stride_k_blk, stride_k_s, stride_q_h, head_dim, copy_base,
                                  n_copy, stride_copy_h, stride_copy_j, KB, PAGED, H_KV, GROUP,
                                  NPQ, QROWS, CHUNK, BLOCK_D, ROPE_MODE, ROTARY_DIM, LAYOUT,
                                  FAST_TRIG, DOT_PRECISION, CHUNK_TILE, FIRST_GROUP, COPY, PART)
            s_group = tl.max(s_parts, 1)
            # Strict, and the group's first maximum: ties keep the earliest part.
            pick = tl.where(s_group > best, first + tl.argmax(s_parts, 1, tie_break_left=True),
                            pick)
            best = tl.maximum(best, s_group)
        lo = lo + pick * PART
        for step in range(LOG2_CHUNK - LOG2_FIRST):
            half = PART >> (step + 1)
            if PAIR_HALVES:  # both halves' middle keys in one load: [CHUNK_TILE, 2]
                sides = lo[:, None] + (tl.arange(0, 2) * half + half // 2)[None, :]
                s_sides = _probe_grid(q_base, k_base, table_base, inv_freq_ptr, sides, usable,
                                      vlo, vhi, block_pos, s_k, n_chunks, window_tokens,
                                      stride_k_h, stride_k_blk, stride_k_s, stride_q_h, head_dim,
                                      copy_base, 0, 0, 0, KB, PAGED, H_KV, GROUP, NPQ, QROWS,
                                      CHUNK, BLOCK_D,
                                      ROPE_MODE, ROTARY_DIM, LAYOUT, FAST_TRIG, DOT_PRECISION,
                                      CHUNK_TILE, 2, False, 1)
                s_left, s_right = tl.split(s_sides)
            else:
                s_left = _probe_score(q_base, k_base, table_base, inv_freq_ptr, lo + half // 2,
                                      usable, vlo, vhi, block_pos, s_k, n_chunks, window_tokens,
                                      stride_k_h, stride_k_blk, stride_k_s, stride_q_h, head_dim,
                                      copy_base, 0, 0, 0, KB, PAGED, H_KV, GROUP, NPQ, QROWS,
                                      CHUNK, BLOCK_D,
                                      ROPE_MODE, ROTARY_DIM, LAYOUT, FAST_TRIG, DOT_PRECISION,
                                      False, 1)
                s_right = _probe_score(q_base, k_base, table_base, inv_freq_ptr,
                                       lo + half + half // 2, usable, vlo, vhi, block_pos, s_k,
                                       n_chunks, window_tokens, stride_k_h, stride_k_blk,
                                       stride_k_s, stride_q_h, head_dim, copy_base, 0, 0, 0, KB,
                                       PAGED, H_KV, GROUP, NPQ, QROWS, CHUNK,
                                       BLOCK_D, ROPE_MODE, ROTARY_DIM, LAYOUT, FAST_TRIG,
                                       DOT_PRECISION, False, 1)
            best = tl.maximum(best, tl.maximum(s_left, s_right))
            lo = tl.where(s_right > s_left, lo + half, lo)
    best = tl.where(usable, best, float("-inf"))
    tl.store(out_ptr + (b * n_blocks + blk) * n_cand + n, best, mask=n_ok)


def score_chunks(q_pooled, k, chunk_starts, key_hi, block_pos, *, key_lo: int, chunk_size: int,
                 rope_mode: int = 0, inv_freq=None, rotary_dim: int = 0, rope_layout: int = 0,
                 window_tokens: int = 0, first_probes: int = DEFAULT_FIRST_PROBES,
                 chunk_tile: int | None = None, num_warps: int | None = None,
                 first_group: int | None = None, num_stages: int | None = None,
                 max_registers: int | None = None):
    """Triton twin of ``score_chunks_ref`` (same arguments, shapes and result). ``k`` may also be
    ``host_keys.BlockMajorKeys``: keys read in place from the offloaded store's host copy; or
    ``bank_kv.BankKV``: keys read in the slots of the offloaded store's pruning bank.
    ``chunk_tile`` (chunks per program), ``num_warps``, ``first_group`` (first-step parts of
    each chunk gathered per load), ``num_stages`` (Triton's software pipelining of the loads)
    and ``max_registers`` (per thread) tune the launch, not the result."""
    b, h, nqb, npq, d = q_pooled.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    if k.dim() != 4 or k.shape[0] != b or k.shape[3] != d or h % h_kv:
        raise ValueError(f"k must be [B, H_KV, S_K, D] with H % H_KV == 0 for q_pooled "
                         f"{tuple(q_pooled.shape)}, got {tuple(k.shape)}")
    if chunk_starts.shape[:2] != (b, nqb) or key_hi.shape != (b, nqb):
        raise ValueError(f"chunk_starts [B, NQB, N] and key_hi [B, NQB] must match B={b}, "
                         f"NQB={nqb}; got {tuple(chunk_starts.shape)}, {tuple(key_hi.shape)}")
    rope = rope_mode in (PRUNE_ROPE_RELATIVE, PRUNE_ROPE_CHUNK_INDEXED) and rope_layout != 0
    q_pooled = q_pooled.to(k.dtype).contiguous()
    in_host_blocks = isinstance(k, BlockMajorKeys)
    parts = first_probe_count(first_probes, chunk_size) if chunk_size > 1 else 1
    copy, copied = _first_probe_copy(k, chunk_size // parts)
    memory, addressing = key_addressing(k)
    starts = chunk_starts.to(torch.int32)
    if starts.stride(-1) != 1:
        starts = starts.contiguous()
    n_cand = starts.shape[-1]
    out = torch.empty((b, nqb, n_cand), device=q_pooled.device, dtype=torch.float32)
    if n_cand == 0:
        return out
    group = h // h_kv
    few_chunks = b * nqb * n_cand < 16 * 4096  # a decode step, a short prompt
    # Every key probed: stream the chunks where that was measured faster (H200, 1M keys): long
    # chunks (256 keys, one decode query block: 0.50 vs 1.15 ms unrotated) and few chunks (stage
    # 2's 8-key chunks at decode: 0.10 vs 0.12 ms a step); the 8-key chunks of a 32k prefill
    # chunk's stage 2 took 12.2 ms streamed, 6.5 ms in 64-chunk halving programs.
    if (parts == chunk_size > 1 and not in_host_blocks
            and (chunk_size >= 64 or few_chunks)):
        return score_chunk_maxima(
            q_pooled, k, starts, key_hi, block_pos, key_lo=key_lo, chunk_size=chunk_size,
            rope_mode=rope_mode, inv_freq=inv_freq, rotary_dim=rotary_dim,
            rope_layout=rope_layout, window_tokens=window_tokens, rope=rope)
    wide = (chunk_tile or 0) > 16 or not few_chunks
    launch = wide_launch(rope, memory.element_size()) if wide else FEW_CHUNK_LAUNCH
    query_rows = max(16, triton.next_power_of_2(group * npq))
    launch = fit_query_rows(launch, query_rows, rope)
    tile = chunk_tile or launch[0]
    num_warps = num_warps or launch[2]
    first_group = min(parts, first_group or launch[1])
    inv = inv_freq.float().contiguous() if rope else out
    grid = (nqb, triton.cdiv(n_cand, tile), b)
    _score_chunks_kernel[grid](
        q_pooled, memory, addressing["table"], starts, key_hi.to(torch.int32).contiguous(),
        block_pos.to(torch.int32).contiguous(), inv, out, memory if copy is None else copy,
        n_cand, nqb, s_k, key_lo, -(-s_k // chunk_size), window_tokens, d, copied["entries"],
        addressing["blocks_per_row"], addressing["fold"], q_pooled.stride(0), q_pooled.stride(1),
        q_pooled.stride(2),
        addressing["stride_b"], addressing["stride_h"], addressing["stride_blk"],
        addressing["stride_s"], starts.stride(0), starts.stride(1), copied["stride_b"],
        copied["stride_h"], copied["stride_j"], COPY=copy is not None,
        KB=addressing["keys_per_block"], PAGED=addressing["paged"], H_KV=h_kv, GROUP=group,
        NPQ=npq,
        QROWS=query_rows,
        CHUNK=chunk_size, LOG2_CHUNK=chunk_size.bit_length() - 1, FIRST_PROBES=parts,
        LOG2_FIRST=parts.bit_length() - 1, FIRST_GROUP=first_group,
        PAIR_HALVES=tile <= 16, CHUNK_TILE=tile,
        BLOCK_D=max(16, triton.next_power_of_2(d)), ROPE_MODE=rope_mode if rope else 0,
        ROTARY_DIM=max(rotary_dim, 2), LAYOUT=rope_layout if rope else 1,
        FAST_TRIG=rope and approximate_trig(q_pooled),
        DOT_PRECISION="ieee" if q_pooled.dtype == torch.float32 else "tf32",  # k may be FP8
        num_warps=num_warps,
        **_pipelining(num_stages, max_registers),
    )
    return out


def _pipelining(num_stages: int | None, max_registers: int | None) -> dict:
    """Launch options given only where set, so that Triton's defaults stay its own."""
    options = {"num_stages": num_stages, "maxnreg": max_registers}
    return {name: value for name, value in options.items() if value is not None}


def wide_launch(rotating: bool, key_bytes: int) -> tuple[int, int, int]:
    """(chunks per program, first-step parts per load, warps) for a stage of many chunks (a
    prefill): one probe per load (paired halves on 64-chunk tiles ran out of shared memory at
    head dim 128). 16-bit keys, unrotated: 128 chunks on 8 warps; a 32k chunk at 1M keys on an
    H200 (scripts/prefill_stage_launch.py): stage 0 15.9 ms against 19.1 with 64 chunks on 4
    warps (itself 1.8x faster than 32), stage 1 2.96 against 4.81, stage 2 2.23 against 3.36;
    no other warps, chunks, pipeline depth or register cap tried was faster
    (reports/bench/prefill_profile/). Wider keys (fp32), 64 on 4 warps, as before. Rotating in
    the kernel, 32 (not measured at 64, where the fp32 cos/sin tiles would double)."""
    if rotating:
        return 32, 1, 4
    return (128, 1, 8) if key_bytes <= 2 else (64, 1, 4)


# (chunks per program, first-step parts gathered per load, warps) for a stage of few chunks (a
# decode step, a short prompt's last query block): both halves' probes in one load too
# (``PAIR_HALVES``). One shape for every length: Triton compiles the kernel per shape, and a
# shape picked by the number of chunks compiled a new variant (3-4 s on an H200) whenever a
# sequence grew into the next range, in the middle of a prompt or of a generation. Stage 0 of a
# decode step (256-key chunks, 32 parts, RoPE in the kernel) on an H200, this shape against the
# fastest of seven per length (reports/bench/prefill_timeline/stage0_launch.json): 128k keys
# 0.058 against 0.032 ms, 1M 0.099 (the fastest), 2M 0.188 against 0.176, 4M 0.363 against
# 0.340; once per layer per stage 0 refresh.
FEW_CHUNK_LAUNCH = (8, 4, 2)


def fit_query_rows(launch: tuple[int, int, int], query_rows: int,
                   rotating: bool) -> tuple[int, int, int]:
    """A launch (chunks per program, first-step parts per load, warps) shrunk until a load's
    probes fit what a program holds for ``query_rows`` query rows (the query heads of a KV head
    times the pooled queries; ``probe_scores.probes_per_load``): more query heads per KV head
    (GQA 7-8 and up), or pooled queries, than the launch was tuned for. Fewer parts per load
    first, then fewer chunks per program; a program of at most 16 chunks also loads both halves
    of each at once (``PAIR_HALVES``)."""
    tile, group, warps = launch
    most = probes_per_load(query_rows, rotating)
    while group > 1 and tile * group > most:
        group //= 2
    while tile > 1 and tile * max(group, 2 if tile <= 16 else 1) > most:
        tile //= 2
    return tile, group, warps


def _first_probe_copy(k, part: int) -> tuple[torch.Tensor | None, dict[str, int]]:
    """The device copy of the keys this stage's first step probes (``probe_key_copy``, for
    keys in host memory whose copy has parts of ``part`` keys) and its addressing; else
    None and an addressing with no entries."""
    if (isinstance(k, BlockMajorKeys) and k.probe_copy is not None and k.probe_stride == part
            and k.probe_copy.shape[2] > 0):
        return k.probe_copy, k.copy_addressing()
    return None, {"stride_b": 0, "stride_h": 0, "stride_j": 0, "entries": 0}
