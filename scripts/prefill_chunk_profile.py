"""Where a prefill chunk's time goes, kernel by kernel (torch profiler, CUDA time).

    python scripts/prefill_chunk_profile.py [--context 1048576] [--top 30] [--out FILE]

One layer of Llama-3.1-8B's shape (the attention benchmark's inputs, ``bench.attention``): a
32k-token chunk of random queries at the end of S_K random keys, run as the op runs it
(``sparse_attention``, RoPE re-positioning on). After two warm-up calls, three calls are
profiled; each kernel's CUDA time is given per call, largest first, with the wall time per call
measured in the same process without the profiler.
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile

from ihip_compile.bench import print_and_save, start_gpu_script
from ihip_compile.bench.attention import (
    HEAD_DIM, HEADS, KV_HEADS, PREFILL_CHUNK, SELECTION, _rope_args, time_eager,
)
from ihip_compile.kernels.sparse_attention import sparse_attention

CALLS = 3


def kernel_table(prof, top: int) -> list[dict]:
    """The ``top`` kernels by CUDA time: name, ms per call, launches per call."""
    rows = []
    for event in prof.key_averages():
        cuda_us = getattr(event, "device_time_total", 0.0)
        if cuda_us <= 0 or event.key.startswith(("cudaLaunch", "Memcpy", "Memset")):
            continue
        rows.append({"kernel": event.key[:120], "ms_per_call": round(cuda_us / 1e3 / CALLS, 3),
                     "launches_per_call": event.count / CALLS})
    rows.sort(key=lambda r: -r["ms_per_call"])
    return rows[:top]


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/prefill_chunk_profile.py")
    parser.add_argument("--context", type=int, default=1 << 20)
    parser.add_argument("--top", type=int, default=30)
    args, _ = start_gpu_script(parser)
    s_k = args.context
    k = torch.randn(1, KV_HEADS, s_k, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(1, HEADS, PREFILL_CHUNK, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    pos = torch.arange(s_k - PREFILL_CHUNK, s_k, device="cuda")
    kw = dict(SELECTION, scale=HEAD_DIM ** -0.5, remap=True, pruning_rope=0, use_triton=True,
              **_rope_args("cuda"))

    def run():
        return sparse_attention(q, k, v, pos, **kw)

    wall_ms = time_eager(run, 3)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(CALLS):
            run()
        torch.cuda.synchronize()
    table = kernel_table(prof, args.top)
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "context": s_k, "chunk": PREFILL_CHUNK, "wall_ms_per_call": round(wall_ms, 3),
              "kernel_ms_per_call": round(sum(r["ms_per_call"] for r in kernel_table(
                  prof, 10 ** 6)), 3), "kernels": table}
    for row in table:
        print(f"{row['ms_per_call']:9.3f} ms  x{row['launches_per_call']:<5g} {row['kernel']}")
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
