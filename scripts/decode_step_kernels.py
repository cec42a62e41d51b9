"""Which kernels a decode step of each kind runs, and the GPU time of each (H200 breakdown).

    python scripts/decode_step_kernels.py [--context 1048576] [--out FILE]  (a CUDA GPU)

The benchmark's decode steps (``bench.attention``: Llama-3.1-8B layer shape, paper budgets,
renumbering, the op's positioned attention) run eagerly 20 times each under the torch
profiler; per step kind, each kernel's GPU time per step (us, mean over the 20) and its launches
per step. Kernel times only: in a CUDA graph a step also waits ~1-2 us between dependent
launches, which this does not show (``bench attention`` times the graphed steps).
"""

from __future__ import annotations

import argparse
import collections

import torch
from torch.profiler import ProfilerActivity, profile

from ihip_compile.bench import print_and_save, start_gpu_script
from ihip_compile.bench.attention import HEAD_DIM, HEADS, KV_HEADS, SELECTION, _rope_args
from ihip_compile.kernels.block_selection import select_blocks
from ihip_compile.kernels.positioned_decode import positioned_decode
from ihip_compile.kernels.positioned_kv import position_selected_kv

STEPS = 20
KINDS = ("from_stage_0", "from_stage_1", "from_stage_2", "cached")


def step_functions(s_k: int):
    torch.manual_seed(0)
    k = torch.randn(1, KV_HEADS, s_k, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    q = torch.randn(1, HEADS, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    pos = torch.full((1, 1), s_k - 1, device="cuda", dtype=torch.int32)
    rope = _rope_args("cuda")
    kw = dict(**SELECTION, rope_mode=1, use_triton=True, **rope)
    window = dict(sink_tokens=SELECTION["sink_tokens"], window_tokens=SELECTION["window_tokens"])
    blocks, stages = select_blocks(q, k, pos, return_stages=True, **kw)
    placed = position_selected_kv(k, v, blocks, pos, **window, **rope)

    def step(start):
        def run():
            chosen = placed
            if start < 3:
                cands = None if start == 0 else stages[start - 1]
                chosen = position_selected_kv(k, v, select_blocks(
                    q, k, pos, start_stage=start, candidates=cands, **kw), pos, **window, **rope)
            return positioned_decode(q, k, v, chosen, pos, scale=HEAD_DIM ** -0.5, **window,
                                     **rope)
        return run

    return {kind: step(i) for i, kind in enumerate(KINDS)}


def kernel_times(fn) -> list[dict]:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            fn()
        torch.cuda.synchronize()
    per_kernel = collections.defaultdict(lambda: [0.0, 0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            entry = per_kernel[event.name[:90]]
            entry[0] += event.device_time
            entry[1] += 1
    rows = [{"kernel": name, "us_per_step": round(total / STEPS, 2), "launches": count / STEPS}
            for name, (total, count) in per_kernel.items()]
    return sorted(rows, key=lambda r: -r["us_per_step"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--context", type=int, default=1 << 20)
    args, _ = start_gpu_script(parser)
    result = {"device": torch.cuda.get_device_name(), "context": args.context}
    for kind, fn in step_functions(args.context).items():
        rows = kernel_times(fn)
        result[kind] = {"kernel_us": round(sum(r["us_per_step"] for r in rows), 2),
                        "launches": sum(r["launches"] for r in rows), "kernels": rows}
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
