"""How fast a GPU reads blocks of an offloaded cache's pinned host memory: a contiguous copy
against the bank's gather kernel reading scattered blocks in place.

    python scripts/host_read_bandwidth.py [--blocks 4096] [--out FILE]  (a CUDA GPU)

The host copy is block-major, as an offloaded cache holds it: [131072 blocks, 8 KV heads, 8
tokens, d 128] (1M tokens of one layer's keys), pinned. Timed, for bf16 and FP8 storage:
    memcpy_contig   ``--blocks`` consecutive blocks copied to the device (the copy engine)
    gather_blocks   ``--blocks`` random distinct blocks, sorted, read in place by
                    ``kernels/block_cache.gather_blocks`` (every one a miss), as a refresh's
                    stage 1 reads the blocks stage 0 kept
Each entry is [ms per call, GB/s], the mean of 20 calls after one, timed by CUDA events; the
gathered blocks are checked bit for bit against the host copy.
"""

from __future__ import annotations

import argparse

import torch

from ihip_compile.bench import print_and_save, start_gpu_script
from ihip_compile.kernels.block_cache import gather_blocks

HOST_BLOCKS, KV_HEADS, BLOCK, HEAD_DIM = 131072, 8, 8, 128
REPS = 20


def _ms(fn) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(REPS):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / REPS


def _measure(dtype: torch.dtype, n: int) -> dict:
    host = torch.empty(HOST_BLOCKS, KV_HEADS, BLOCK, HEAD_DIM, dtype=dtype).pin_memory()
    ids = torch.randperm(HOST_BLOCKS, device="cuda")[:n].sort().values
    bank = torch.zeros(1, KV_HEADS, BLOCK, HEAD_DIM, dtype=dtype, device="cuda")
    out = torch.empty(n, KV_HEADS, BLOCK, HEAD_DIM, dtype=dtype, device="cuda")
    misses = torch.full((n,), -1, dtype=torch.int32, device="cuda")
    nbytes = out.numel() * out.element_size()
    name = str(dtype).removeprefix("torch.")
    result = {}
    for kind, fn in (("memcpy_contig", lambda: out.copy_(host[:n], non_blocking=True)),
                     ("gather_blocks", lambda: gather_blocks(bank, host, misses, ids.int(),
                                                             out_dtype=dtype))):
        ms = _ms(fn)
        result[f"{name}_{kind}"] = [ms, nbytes / ms / 1e6]
    got = gather_blocks(bank, host, misses, ids.int(), out_dtype=dtype)
    result[f"{name}_check"] = torch.equal(got.view(torch.uint8).cpu(),
                                          host[ids.cpu()].view(torch.uint8))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/host_read_bandwidth.py")
    parser.add_argument("--blocks", type=int, default=4096)
    args, _ = start_gpu_script(parser)
    result = {"blocks": args.blocks, "device": torch.cuda.get_device_name()}
    for dtype in (torch.bfloat16, torch.float8_e4m3fn):
        result.update(_measure(dtype, args.blocks))
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
