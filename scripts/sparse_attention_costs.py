"""Where the sparse attention kernels' time goes at 1M keys: RoPE renumbering, tile shape, warps.

    python scripts/sparse_attention_costs.py [--precise-trig] [--prefill-launches L]
        [--skip-decode] [--out FILE]  (a CUDA GPU; one JSON line)

Llama-3.1-8B layer shape (32 query heads, 8 KV heads, d 128, bf16), paper budgets (256 sinks,
2048 selected tokens in 8-key blocks, 1024-token window), random K/V and random sorted blocks:
``prefill`` is ``block_sparse_attention`` over a 32k-token chunk at the end of 1M keys (mean ms
of 3 calls), ``decode`` is ``sparse_decode`` for the last key (replayed from a CUDA graph,
``bench.attention.time_graphed``). ``remap`` on or off: the StreamingLLM renumbering's rotation
of every gathered key; ``heads``: query heads of one KV head per prefill program, sharing each
gathered (and rotated) key tile; ``splits``: decode split-K programs per KV head. ``--precise-trig`` makes the kernels rotate with the precise cos/sin even
for bf16 (``_primitives.approximate_trig``), to weigh the approximate ones.
"""

from __future__ import annotations

import argparse

import torch

from ihip_compile.bench import print_and_save, start_gpu_script
from ihip_compile.bench.attention import time_eager, time_graphed
from ihip_compile.kernels import block_sparse_attention as prefill_module
from ihip_compile.kernels import sparse_decode as decode_module

S_K, CHUNK, HEADS, KV_HEADS, HEAD_DIM = 1 << 20, 32768, 32, 8, 128
SINKS, WINDOW, TOPK, BLOCK_K, BLOCK_Q = 256, 1024, 256, 8, 64
# remap:keys per tile:warps:query heads per program sharing each key tile[:halves], the last
# (rotate_half keys turned as two halves, ``block_sparse_attention.rotates_by_halves``) 1 by
# default
PREFILL_LAUNCHES = "1:32:4:1,1:32:4:2,1:32:8:2,1:16:8:4,1:32:8:4"
# Split-K programs of a decode step other than the default (one wave: 33 here).
DECODE_SPLITS = (8, 16, 24, 48, 64)


def random_blocks(n_rows: int, below: int) -> torch.Tensor:
    """[1, n_rows, TOPK] sorted distinct 8-key blocks between the sinks and ``below``."""
    first = SINKS // BLOCK_K
    picks = torch.rand(n_rows, below // BLOCK_K - first, device="cuda").topk(TOPK).indices
    return (picks.sort().values + first).to(torch.int32)[None]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--precise-trig", action="store_true")
    parser.add_argument("--prefill-launches", default=PREFILL_LAUNCHES)
    parser.add_argument("--skip-decode", action="store_true")
    args, flush = start_gpu_script(parser)
    if args.precise_trig:
        for module in (prefill_module, decode_module):
            module.approximate_trig = lambda x: False
    k = torch.randn(1, KV_HEADS, S_K, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM)
    common = dict(scale=HEAD_DIM ** -0.5, sink_tokens=SINKS, window_tokens=WINDOW,
                  block_size_k=BLOCK_K, inv_freq=inv_freq, rotary_dim=HEAD_DIM, rope_layout=1)
    q = torch.randn(1, HEADS, CHUNK, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    positions = torch.arange(S_K - CHUNK, S_K, device="cuda")[None]
    blocks = random_blocks(CHUNK // BLOCK_Q, S_K - CHUNK - WINDOW)
    result = {"precise_trig": args.precise_trig}
    for launch in args.prefill_launches.split(","):
        remap, tile, warps, heads, halves = ([int(x) for x in launch.split(":")] + [1])[:5]
        run = lambda: prefill_module.block_sparse_attention(  # noqa: E731
            q, k, v, positions, blocks, block_size_q=BLOCK_Q, remap=bool(remap), tile_slots=tile,
            num_warps=warps, heads_per_program=heads, split_halves=bool(halves), **common)
        name = f"prefill_remap{remap}_tile{tile}_warps{warps}_heads{heads}_halves{halves}"
        result[name] = round(time_eager(run, 3), 2)
    if args.skip_decode:
        print_and_save(result, args.out)
        return
    q1 = torch.randn(1, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    blocks1 = random_blocks(1, S_K - WINDOW)
    for remap in (True, False):
        run = lambda: decode_module.sparse_decode(q1, k, v, blocks1, remap=remap, **common)  # noqa: E731
        result[f"decode_remap{int(remap)}"] = round(time_graphed(run, 20, flush), 4)
    for splits in DECODE_SPLITS:
        run = lambda: decode_module.sparse_decode(  # noqa: E731
            q1, k, v, blocks1, remap=True, num_splits=splits, **common)
        result[f"decode_remap1_splits{splits}"] = round(time_graphed(run, 20, flush), 4)
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
