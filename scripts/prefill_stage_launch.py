"""A prefill chunk's pruning stages by launch shape (chunks per program, warps).

    python scripts/prefill_stage_launch.py [--context 1048576] [--out FILE]  (a CUDA GPU)

One layer of Llama-3.1-8B's shape (32 query heads, 8 KV heads, d 128, bf16), a 32k-token chunk's
512 query blocks of 16 pooled queries at the end of S_K random keys, no rotation in the kernel
(as the op runs a prefill: keys re-positioned once per stage). Stage 0 scores every 256-key
chunk; stage 1 the 32-key chunks of 128 kept 256-key chunks, stage 2 the 8-key chunks of 256
kept 32-key chunks (kept chunks drawn at random, sorted, per block).
Each launch's scores must equal the default launch's; ms per call from a CUDA graph with an L2
flush between calls. A launch past the shared memory is recorded with its error.
"""

from __future__ import annotations

import argparse

import torch

from ihip_compile.bench import print_and_save, start_gpu_script
from ihip_compile.bench.attention import HEAD_DIM, HEADS, KV_HEADS, PREFILL_CHUNK, time_graphed
from ihip_compile.kernels.prune_stage import score_chunks

BLOCK_Q, POOLED, SINKS, WINDOW = 64, 16, 256, 1024
STAGES = {"stage_0": (256, None), "stage_1": (32, (256, 128)),  # chunk, (parent size, kept)
          "stage_2": (8, (32, 256))}
# (chunks per program, warps, pipeline stages or 0 for Triton's default, register cap or 0)
LAUNCHES = "64:4:0:0,64:8:0:0,32:4:0:0,32:8:0:0,128:4:0:0,128:8:0:0"


def stage_starts(s_k: int, n_blocks: int, chunk: int, parent) -> torch.Tensor:
    """[1, NQB, N] int32 chunk starts: every chunk, or the sub-chunks of ``kept`` random parents."""
    if parent is None:
        starts = torch.arange(0, s_k, chunk, dtype=torch.int32, device="cuda")
        return starts.expand(1, n_blocks, -1).contiguous()
    size, kept = parent
    rows = [torch.randperm(s_k // size, device="cuda")[:kept].sort().values
            for _ in range(n_blocks)]
    parents = torch.stack(rows).to(torch.int32) * size
    subs = torch.arange(0, size, chunk, dtype=torch.int32, device="cuda")
    return (parents[:, :, None] + subs).reshape(1, n_blocks, -1)


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/prefill_stage_launch.py")
    parser.add_argument("--context", type=int, default=1 << 20)
    parser.add_argument("--launches", default=LAUNCHES,
                        help="comma-separated tile:warps:stages:registers (0: the default)")
    parser.add_argument("--stages", default=",".join(STAGES))
    args, flush = start_gpu_script(parser)
    launches = [tuple(int(x) for x in launch.split(":")) for launch in args.launches.split(",")]
    s_k, n_blocks = args.context, PREFILL_CHUNK // BLOCK_Q
    k = torch.randn(1, KV_HEADS, s_k, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, HEADS, n_blocks, POOLED, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    pos = s_k - PREFILL_CHUNK + BLOCK_Q * torch.arange(1, n_blocks + 1, device="cuda") - 1
    pos = pos.to(torch.int32)[None]
    key_hi = (pos + 1 - WINDOW).clamp(min=SINKS)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "context": s_k, "stages": {}}
    for name in args.stages.split(","):
        chunk, parent = STAGES[name]
        starts = stage_starts(s_k, n_blocks, chunk, parent)
        kw = dict(key_lo=SINKS, chunk_size=chunk, window_tokens=WINDOW, first_probes=8)
        reference = score_chunks(q, k, starts, key_hi, pos, **kw)
        row = {"default_ms": round(time_graphed(
            lambda: score_chunks(q, k, starts, key_hi, pos, **kw), 5, flush), 3)}
        for tile, warps, stages, registers in launches:
            def run(tile=tile, warps=warps, stages=stages, registers=registers):
                return score_chunks(q, k, starts, key_hi, pos, chunk_tile=tile, num_warps=warps,
                                    num_stages=stages or None, max_registers=registers or None,
                                    **kw)
            label = f"tile{tile}_warps{warps}_stages{stages}_registers{registers}"
            try:
                row[label] = {"same_scores": torch.equal(run(), reference),
                              "ms": round(time_graphed(run, 5, flush), 3)}
            except Exception as error:  # past the shared memory: record why, go on
                row[label] = {"error": repr(error)[:160]}
            print({name: row}, flush=True)
        result["stages"][name] = row
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
