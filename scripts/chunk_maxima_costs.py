"""Exact chunk maxima of a decode refresh's later stages by program width, at 1M keys.

    python scripts/chunk_maxima_costs.py [--out FILE]  (a CUDA GPU; prints one JSON line)

Llama-3.1-8B layer shape (32 query heads, 8 KV heads, d 128, bf16), one decode query at the last
of 1M random keys, relative pruning RoPE: stage 1 scores 1024 chunks of 32 keys, stage 2 1024
chunks of 8 (the candidates stages 0 and 1 hand on at the default budgets; random here). Each
``block_keys`` is the keys one program scores per step: 16 and 32 are one chunk per program (the
previous launch), 64 and 128 put 2-16 chunks in a program; each with 2 and 4 warps. ms per call
replayed from a CUDA graph with an L2 flush between calls (``bench.attention.time_graphed``).
"""

from __future__ import annotations

import argparse

import torch

from ihip_compile.bench import print_and_save, start_gpu_script
from ihip_compile.bench.attention import HEAD_DIM, HEADS, KV_HEADS, _rope_args, time_graphed
from ihip_compile.kernels.chunk_maxima import score_chunk_maxima
from ihip_compile.kernels.prune_stage_ref import PRUNE_ROPE_RELATIVE

S_K, SINKS, WINDOW, N_CHUNKS = 1 << 20, 256, 1024, 1024


def main() -> None:
    args, flush = start_gpu_script(argparse.ArgumentParser())
    k = torch.randn(1, KV_HEADS, S_K, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, HEADS, 1, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    pos = torch.full((1, 1), S_K - 1, device="cuda", dtype=torch.int32)
    key_hi = pos + 1 - WINDOW
    result = {"device": torch.cuda.get_device_name()}
    for chunk in (32, 8):
        picks = torch.randperm((S_K - WINDOW) // chunk - SINKS // chunk, device="cuda")[:N_CHUNKS]
        starts = ((picks.sort().values + SINKS // chunk) * chunk).to(torch.int32).view(1, 1, -1)
        kw = dict(key_lo=SINKS, chunk_size=chunk, rope_mode=PRUNE_ROPE_RELATIVE,
                  window_tokens=WINDOW, rope=True, **_rope_args("cuda"))
        reference = score_chunk_maxima(q, k, starts, key_hi, pos, block_keys=16, **kw)
        for block_keys in (16, 32, 64, 128):
            for warps in (2, 4):
                run = lambda: score_chunk_maxima(q, k, starts, key_hi, pos,  # noqa: E731
                                                 block_keys=block_keys, num_warps=warps, **kw)
                same = torch.equal(run(), reference)
                result[f"chunk{chunk}_keys{block_keys}_warps{warps}"] = {
                    "ms": round(time_graphed(run, 20, flush), 4), "same_scores": same}
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
