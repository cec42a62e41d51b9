"""Where a renumbered decode step's attention time goes at 1M and 4M keys, and its launch shape.

    python scripts/positioned_decode_costs.py [--out FILE]  (a CUDA GPU; prints one JSON line)

Llama-3.1-8B layer shape (32 query heads, 8 KV heads, d 128, bf16), paper budgets (256 sinks,
2048 selected tokens in 8-key blocks, 1024-token window), random K/V and random sorted blocks,
the query at the last key; every figure is ms per call replayed from a CUDA graph with an L2
flush between calls (``bench.attention.time_graphed``):
  gathered              ``sparse_decode``: gathers and rotates the selected keys (one step)
  position              ``position_selected_kv``: the refresh step's extra launch
  positioned            ``positioned_decode`` at its default launch (a cached step)
  positioned_moved      the same, the window moved by 8 keys since the positioning (query turned)
  positioned_tT_sS      tiles of T keys, S split programs per KV head
"""

from __future__ import annotations

import argparse

import torch

from ihip_compile.bench import print_and_save, start_gpu_script
from ihip_compile.bench.attention import time_graphed
from ihip_compile.kernels.positioned_decode import positioned_decode
from ihip_compile.kernels.positioned_kv import position_selected_kv
from ihip_compile.kernels.sparse_decode import sparse_decode

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
SINKS, WINDOW, TOPK, BLOCK_K = 256, 1024, 256, 8
LAUNCHES = ((16, 33), (32, 16), (32, 48), (32, 66), (64, 16), (64, 33))


def random_blocks(below: int) -> torch.Tensor:
    """[1, 1, TOPK] sorted distinct 8-key blocks between the sinks and ``below``."""
    first = SINKS // BLOCK_K
    picks = torch.rand(below // BLOCK_K - first, device="cuda").topk(TOPK).indices
    return (picks.sort().values + first).to(torch.int32).view(1, 1, TOPK)


def costs_at(s_k: int, flush) -> dict:
    k = torch.randn(1, KV_HEADS, s_k, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(1, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM)
    rope = dict(sink_tokens=SINKS, window_tokens=WINDOW, inv_freq=inv_freq, rotary_dim=HEAD_DIM,
                rope_layout=1)
    blocks = random_blocks(s_k - WINDOW)
    pos = torch.full((1, 1), s_k - 1, device="cuda", dtype=torch.int32)
    earlier = pos - 8
    scale = HEAD_DIM ** -0.5
    placed = position_selected_kv(k, v, blocks, pos, **rope)
    placed_earlier = position_selected_kv(k, v, blocks, earlier, **rope)

    def timed(fn):
        return round(time_graphed(fn, 20, flush), 4)

    out = {
        "gathered": timed(lambda: sparse_decode(q, k, v, blocks, pos, scale=scale, remap=True,
                                                **rope)),
        "position": timed(lambda: position_selected_kv(k, v, blocks, pos, **rope)),
        "positioned": timed(lambda: positioned_decode(q, k, v, placed, pos, scale=scale, **rope)),
        "positioned_moved": timed(lambda: positioned_decode(q, k, v, placed_earlier, pos,
                                                            scale=scale, **rope)),
    }
    for tile, splits in LAUNCHES:
        out[f"positioned_t{tile}_s{splits}"] = timed(lambda: positioned_decode(
            q, k, v, placed, pos, scale=scale, num_splits=splits, tile_slots=tile, **rope))
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--contexts", default="1048576,4194304")
    args, flush = start_gpu_script(parser)
    result = {"device": torch.cuda.get_device_name()}
    for s_k in (int(c) for c in args.contexts.split(",")):
        result[str(s_k)] = costs_at(s_k, flush)
        torch.cuda.empty_cache()
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
