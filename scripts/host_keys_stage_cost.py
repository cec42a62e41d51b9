"""A decode refresh's stage 0 with the keys in pinned host memory, as an offloaded cache holds
them (``host_keys.BlockMajorKeys``): the stage kernel reads only the probed keys, over PCIe.

    python scripts/host_keys_stage_cost.py [--context 1048576] [--launches 8,4,2 16,2,2 ...]
        [--out FILE]  (a CUDA GPU)

Llama-3.1-8B layer shape (32 query heads, 8 KV heads, d 128, bf16), one decode query block,
256-key chunks over every key, the relative pruning RoPE rotating every probe in the kernel, 8
first-step parts (keys in host memory take no decode probe floor). Keys are stored block-major
[N_BLOCKS, H_KV, BLOCK, D] in pinned memory; ms per call, mean of 10 after a warm-up.
Also timed: the same with the first step's probes read in a device copy (``probe_key_copy``).
``--launches`` also times the given launches (chunks per program, first-step parts per load,
warps; ``prune_stage.score_chunks``' tuning arguments), each checked to give the default's
scores: the default launch was tuned with the keys in device memory.
"""

from __future__ import annotations

import argparse

import torch
from triton.runtime.errors import OutOfResources

from ihip_compile.bench import print_and_save, start_gpu_script
from ihip_compile.bench.attention import HEAD_DIM, HEADS, KV_HEADS, time_eager
from ihip_compile.kernels.host_keys import BlockMajorKeys
from ihip_compile.kernels.probe_key_copy import ProbeKeyCopy
from ihip_compile.kernels.prune_stage import score_chunks

BLOCK, CHUNK, SINKS, WINDOW = 8, 256, 256, 1024  # BLOCK: the store's block_size_k


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/host_keys_stage_cost.py")
    parser.add_argument("--context", type=int, default=1 << 20)
    parser.add_argument("--launches", nargs="*", default=[],
                        help="launches to time as TILE,GROUP,WARPS")
    args, _ = start_gpu_script(parser)
    s_k = args.context
    blocks = torch.randn(s_k // BLOCK, KV_HEADS, BLOCK, HEAD_DIM, dtype=torch.bfloat16)
    keys = BlockMajorKeys(blocks.pin_memory(), 1, s_k, torch.device("cuda"))
    q = torch.randn(1, HEADS, 1, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    starts = torch.arange(0, s_k, CHUNK, dtype=torch.int32, device="cuda")[None, None]
    pos = torch.full((1, 1), s_k - 1, dtype=torch.int32, device="cuda")
    inv_freq = 1.0 / 500000.0 ** (torch.arange(0, HEAD_DIM, 2, device="cuda").float() / HEAD_DIM)
    kw = dict(key_lo=SINKS, chunk_size=CHUNK, rope_mode=1, inv_freq=inv_freq,
              rotary_dim=HEAD_DIM, rope_layout=1, window_tokens=WINDOW, first_probes=8)
    key_hi = pos + 1 - WINDOW
    ms = time_eager(lambda: score_chunks(q, keys, starts, key_hi, pos, **kw), 10)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "context": s_k, "stage_0_host_keys_ms": round(ms, 3)}
    expected = score_chunks(q, keys, starts, key_hi, pos, **kw)
    stride = CHUNK // kw["first_probes"]
    copy = ProbeKeyCopy(stride).update(keys.blocks, 1, s_k, s_k, keys.device)
    with_copy = BlockMajorKeys(keys.blocks, 1, s_k, keys.device, 1, None, copy, stride)
    result["stage_0_first_probes_on_device_ms"] = round(
        time_eager(lambda: score_chunks(q, with_copy, starts, key_hi, pos, **kw), 10), 3)
    result["first_probes_on_device_same_scores"] = torch.equal(
        score_chunks(q, with_copy, starts, key_hi, pos, **kw), expected)
    for launch in args.launches:
        tile, group, warps = (int(x) for x in launch.split(","))
        tuned = dict(kw, chunk_tile=tile, first_group=group, num_warps=warps)
        try:
            same = torch.equal(score_chunks(q, keys, starts, key_hi, pos, **tuned), expected)
        except OutOfResources as error:  # a tile too large for one multiprocessor
            result[f"launch_{launch}"] = {"error": str(error)}
            continue
        result[f"launch_{launch}"] = {
            "ms": round(time_eager(lambda: score_chunks(q, keys, starts, key_hi, pos, **tuned),
                                   10), 3),
            "same_scores": same}
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
