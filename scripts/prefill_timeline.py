"""Where the time to first token of a long prompt goes, over an ``OffloadedCache``.

    python scripts/prefill_timeline.py [--context 1048576] [--chunk 32768] [--layers 4]
        [--backend infinitehip_eager] [--options JSON] [--fp8] [--top 30] [--out-dir DIR]

The end-to-end benchmark's model (Llama-3.1-8B shapes, random weights, ``--layers`` layers)
first prefills a short prompt (compiling the graphs). Then, on one cache:
1. ``allocate`` times the allocation and pinning of the cache's host memory (which a cache
   otherwise does inside its first prompt, layer by layer; ``--allocate-in-prompt`` leaves it
   there, as a new cache's first prompt has it);
2. ``first`` feeds the whole prompt chunk by chunk, each chunk timed (device synchronised);
3. ``again`` ``reset()``s the cache and feeds the same prompt again (a server's next prompt:
   host memory already allocated and touched), profiling its last chunk with ``torch.profiler``
   (CPU and CUDA): the heaviest ops by device time and by host time.
Writes ``timeline.json`` and ``last_chunk_profile.txt`` under ``--out-dir``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

import torch

from ihip_compile.bench.e2e import _sync
from ihip_compile.bench.script_model import add_model_arguments, compiled_model
from ihip_compile.offload import OffloadedCache


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/prefill_timeline.py")
    add_model_arguments(p)
    p.add_argument("--chunk", type=int, default=32768)
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--allocate-in-prompt", action="store_true",
                   help="do not allocate the host memory before the first prompt")
    p.add_argument("--out-dir", default="prefill-timeline")
    return p.parse_args()


def _feed(ours, ids, cache, chunk: int, device, profile_last: bool = False):
    """Feed ``ids`` into ``cache`` chunk by chunk; per-chunk ms, and the last chunk's
    profiler when asked."""
    ms, prof = [], None
    starts = list(range(0, ids.shape[1], chunk))
    for lo in starts:
        piece = ids[:, lo:lo + chunk]

        def run():
            ours(input_ids=piece, past_key_values=cache, use_cache=True, logits_to_keep=1)
            _sync(device)

        _sync(device)
        t0 = time.perf_counter()
        if profile_last and lo == starts[-1]:
            prof = _profiled(run)
        else:
            run()
        ms.append(1e3 * (time.perf_counter() - t0))
    return ms, prof


def _profiled(run):
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities) as prof:
        run()
    return prof


def _tables(prof, top: int) -> str:
    averages = prof.key_averages()
    parts = []
    for sort in ("self_cuda_time_total", "self_cpu_time_total"):
        if sort == "self_cuda_time_total" and not torch.cuda.is_available():
            continue
        parts.append(f"sorted by {sort}\n" + averages.table(sort_by=sort, row_limit=top))
    return "\n\n".join(parts)


def _summary(ms: list[float]) -> dict:
    return {"total_s": sum(ms) / 1e3, "chunk_ms": [round(m, 2) for m in ms]}


def main() -> None:
    args = _parse()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    built = compiled_model(args, device, dtype)
    config, model, ours, storage = built.config, built.model, built.ours, built.storage_dtype
    ids = torch.randint(3, model.config.vocab_size, (1, args.context),
                        generator=torch.Generator().manual_seed(2)).to(device)

    def cache_for(tokens):
        return OffloadedCache(model.config, max_cache_tokens=tokens, dtype=dtype, device=device,
                              ihip_config=config, storage_dtype=storage)

    result = {"context": args.context, "chunk": args.chunk, "layers": args.layers,
              "backend": args.backend, "options": json.loads(args.options), "fp8": args.fp8,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__}
    with torch.no_grad():
        _feed(ours, ids[:, :3 * args.chunk], cache_for(3 * args.chunk), args.chunk, device)
        gc.collect()  # the compiler's trace records hold the warm-up cache in reference cycles
        cache = cache_for(args.context + 8)
        if not args.allocate_in_prompt:
            t0 = time.perf_counter()
            cache.allocate()
            result["allocate_s"] = time.perf_counter() - t0
        result["host_bytes"] = cache.host_bytes
        result["first"] = _summary(_feed(ours, ids, cache, args.chunk, device)[0])
        cache.reset()
        again, prof = _feed(ours, ids, cache, args.chunk, device, profile_last=True)
        result["again"] = _summary(again)
        result["again"]["last_chunk_profiled"] = True
    os.makedirs(args.out_dir, exist_ok=True)
    with open(os.path.join(args.out_dir, "timeline.json"), "w") as f:
        json.dump(result, f, indent=1)
    with open(os.path.join(args.out_dir, "last_chunk_profile.txt"), "w") as f:
        f.write(_tables(prof, args.top))
    print(json.dumps({k: v for k, v in result.items() if k not in ("first", "again")}))
    for name in ("first", "again"):
        print(name, f"{result[name]['total_s']:.2f} s")


if __name__ == "__main__":
    main()
