"""GPU costs of the stage hand-off kernel against its torch reference.

    python scripts/handoff_costs.py [--out FILE]  (a CUDA GPU; prints one JSON line)

Hand-off: the shapes of the paper's stages (256/32k, 32/8k, 8/2k) at 1M keys (4096 stage-0
chunks) and 4M (16384), for one decode query block and for the 512 query blocks of a 32k prefill
chunk; the kernel's launch (``TILE`` chunks per loop step, ``WARPS``) and two others, and the
torch ops; whether the outputs are equal. CUDA-graph timing as in ``python -m ihip_compile.bench attention``.
"""

import argparse

import torch

from ihip_compile.bench import print_and_save, start_gpu_script
from ihip_compile.bench.attention import time_graphed
from ihip_compile.kernels import stage_handoff as handoff
from ihip_compile.kernels.stage_handoff_ref import stage_handoff_ref

# (query blocks, chunks per row, chunks kept, chunk, next chunk, block divisor)
HANDOFF_SHAPES = [(1, 4096, 128, 256, 32, 1), (1, 16384, 128, 256, 32, 1), (1, 1024, 256, 32, 8, 1),
                  (1, 2048, 256, 32, 8, 1), (1, 640, 128, 256, 32, 1),
                  (1, 1024, 256, 8, 8, 8), (512, 4096, 128, 256, 32, 1),
                  (512, 1024, 256, 32, 8, 1), (512, 1024, 256, 8, 8, 8)]


def handoff_costs(shape, reps=20):
    nqb, n, keep, chunk, next_chunk, div = shape
    gen = torch.Generator(device="cuda").manual_seed(n + nqb)
    scores = torch.randn(1, nqb, n, device="cuda", generator=gen)
    starts = (torch.arange(n, device="cuda", dtype=torch.int32) * chunk).expand(1, nqb, n)
    run = lambda: handoff.stage_handoff(scores, starts, keep, chunk, next_chunk, block_div=div)
    ref = lambda: stage_handoff_ref(scores, starts, keep, chunk, next_chunk, block_div=div)
    got, want = run(), ref()
    row = {"same": torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])}
    row["kernel_ms"] = time_graphed(run, reps, None)
    launch = handoff.TILE, handoff.WARPS
    for tile, warps in ((2048, 8), (4096, 16)):
        handoff.TILE, handoff.WARPS = tile, warps
        row[f"kernel_tile{tile}_w{warps}_ms"] = time_graphed(run, reps, None)
    handoff.TILE, handoff.WARPS = launch
    row["torch_ms"] = time_graphed(ref, reps, None)
    return row


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    args, _ = start_gpu_script(parser)  # timed without an L2 flush, as its reports were
    results = {"handoff": {}}
    for shape in HANDOFF_SHAPES:
        nqb, n, keep, chunk, next_chunk, _ = shape
        name = f"nqb{nqb}_n{n}_keep{keep}_{chunk}to{next_chunk}"
        results["handoff"][name] = handoff_costs(shape)
        print(name, results["handoff"][name], flush=True)
    print_and_save(results, args.out)


if __name__ == "__main__":
    main()
