"""Time the pruning-stage kernel alone for stage 0 at 1M keys, with and without pruning RoPE.

    python scripts/stage_rope_cost.py            (a CUDA GPU; prints one JSON line, ms per call)

Llama-3.1-8B layer shape (32 query heads, 8 KV heads, d 128, bf16), 256-key chunks over every key:
``prefill`` is a 32k-token chunk's 512 query blocks (16 pooled queries each), ``decode`` one query
block; ``rope1`` the relative pruning RoPE (every probed key rotated in the kernel), ``rope0`` none;
``first256`` scores every key (exact chunk maxima). ``move`` is the one pass that re-positions
every key instead (``rope_delta.rotate_positions``), which ``positioned_scoring`` weighs against
the rotations per probe. ``tile``/``warps`` entries: the unrotated prefill stage and the rotating
decode stage at other launch shapes (chunks per program, warps per program); ``keys``/``warps``
entries: the exact-maxima kernel (``first256``) at other keys per step and warps; ``group``/``warps``
entries: the rotating decode stage with the decode floor's 32 first-step parts (one per 8 keys),
gathering that many parts of each chunk per load (``first_group``) at other warps.
"""

from __future__ import annotations

import functools
import json
import time

import torch

from ihip_compile.kernels import chunk_maxima, prune_stage, rope_delta

S_K, HEADS, KV_HEADS, HEAD_DIM, CHUNK = 1 << 20, 32, 8, 128, 256


def time_stage(keys, inv_freq, n_blocks: int, pooled: int, rope_mode: int, first: int,
               reps: int, maxima_keys: int | None = None, maxima_warps: int = 4,
               **launch) -> float:
    q = torch.randn(1, HEADS, n_blocks, pooled, HEAD_DIM, device="cuda", dtype=keys.dtype)
    starts = torch.arange(256, S_K - 1024, CHUNK, device="cuda", dtype=torch.int32)
    starts = starts.expand(1, n_blocks, -1).contiguous()
    block_pos = torch.full((1, n_blocks), S_K - 1, device="cuda", dtype=torch.int32)
    key_hi = torch.full((1, n_blocks), S_K - 1024, device="cuda", dtype=torch.int32)
    kw = dict(key_lo=256, chunk_size=CHUNK, rope_mode=rope_mode, inv_freq=inv_freq,
              rotary_dim=HEAD_DIM, rope_layout=1 if rope_mode else 0, first_probes=first,
              **launch)
    # The exact-maxima kernel is reached through score_chunks; its launch shape is set here.
    prune_stage.score_chunk_maxima = functools.partial(
        chunk_maxima.score_chunk_maxima, block_keys=maxima_keys, num_warps=maxima_warps)
    prune_stage.score_chunks(q, keys, starts, key_hi, block_pos, **kw)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        prune_stage.score_chunks(q, keys, starts, key_hi, block_pos, **kw)
    torch.cuda.synchronize()
    prune_stage.score_chunk_maxima = chunk_maxima.score_chunk_maxima
    return (time.perf_counter() - t0) * 1e3 / reps


def time_move(keys, inv_freq, reps: int) -> float:
    delta = -torch.arange(S_K, device="cuda", dtype=torch.int32)
    rope_delta.rotate_positions(keys, delta, inv_freq, HEAD_DIM, 1)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        rope_delta.rotate_positions(keys, delta, inv_freq, HEAD_DIM, 1)
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / reps


def main() -> None:
    if not torch.cuda.is_available():
        raise SystemExit("stage_rope_cost.py times the Triton kernel: it needs a CUDA GPU")
    torch.manual_seed(0)
    keys = torch.randn(1, KV_HEADS, S_K, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM)
    result = {}
    variants = ((1, 8), (1, 2), (0, 8))
    for name, n_blocks, pooled, reps, exact in (("prefill", 512, 16, 3, ()),
                                                ("decode", 1, 1, 20, ((1, 256), (0, 256)))):
        for rope_mode, first in variants + exact:
            ms = time_stage(keys, inv_freq, n_blocks, pooled, rope_mode, first, reps)
            result[f"{name}_rope{rope_mode}_first{first}"] = round(ms, 3)
    result["move_all_keys"] = round(time_move(keys, inv_freq, reps=10), 3)
    for tile, warps in ((16, 4), (32, 2), (32, 8), (64, 4), (64, 8)):  # now: 64 chunks, 4 warps
        ms = time_stage(keys, inv_freq, 512, 16, 0, 8, 3, chunk_tile=tile, num_warps=warps)
        result[f"prefill_rope0_first8_tile{tile}_warps{warps}"] = round(ms, 3)
    for tile, warps in ((16, 2), (16, 8), (32, 4)):  # now: 16 chunks, 4 warps
        ms = time_stage(keys, inv_freq, 1, 1, 1, 8, 20, chunk_tile=tile, num_warps=warps)
        result[f"decode_rope1_first8_tile{tile}_warps{warps}"] = round(ms, 3)
    for keys_per_step, warps in ((16, 4), (64, 4), (32, 2), (32, 8), (64, 8)):  # now: 32, 4
        ms = time_stage(keys, inv_freq, 1, 1, 1, 256, 20, maxima_keys=keys_per_step,
                        maxima_warps=warps)
        result[f"decode_rope1_first256_keys{keys_per_step}_warps{warps}"] = round(ms, 3)
    for group, warps in ((1, 2), (2, 2), (2, 4), (4, 4), (4, 8), (8, 8)):  # now: 4 parts, 4 warps
        ms = time_stage(keys, inv_freq, 1, 1, 1, 32, 20, first_group=group, num_warps=warps)
        result[f"decode_rope1_first32_group{group}_warps{warps}"] = round(ms, 3)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
