"""Where the host time of a decode step goes: Python profiles of cached and refresh steps.

    python scripts/decode_step_profile.py [--context 1048576] [--layers 4]
        [--backend infinitehip_eager] [--cache offloaded|dynamic] [--out-dir DIR]

The end-to-end benchmark's model (Llama-3.1-8B shapes, random weights, ``--layers`` layers)
decodes one warm-up refresh cycle, then ``--cycles`` timed cycles; each step is timed (device
synchronised) and profiled with ``cProfile``, then filed as cached (no pruning stage ran in any
layer) or refresh. Writes ``steps.json`` (per-step ms and kind) and ``cached.txt`` /
``refresh.txt`` (the functions with the most own time, then the most total time) under
``--out-dir``. Runs on the CPU too (kernels' torch references: a different profile).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import os
import pstats
import time

import torch

from ihip_compile.bench.e2e import build_model, dense_cache, fill_cache
from ihip_compile.config import IHipConfig
from ihip_compile.kernels.decode_selection_cache import DENSE_PATH_STATES
from ihip_compile.offload import OffloadedCache


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/decode_step_profile.py")
    p.add_argument("--context", type=int, default=1 << 20)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--backend", default="infinitehip_eager",
                   choices=["infinitehip", "infinitehip_eager"])
    p.add_argument("--cache", default="offloaded", choices=["offloaded", "dynamic"])
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--options", default="{}", help="infinitehip options as JSON")
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out-dir", default="decode-step-profile")
    return p.parse_args()


def _stage_runs(cache) -> int:
    states = cache.store.selection_states if isinstance(cache, OffloadedCache) else DENSE_PATH_STATES
    return sum(sum(runs) for runs in states.stage_runs.values())


def _stats_text(stats: pstats.Stats | None, top: int) -> str:
    if stats is None:
        return "no steps of this kind\n"
    out = io.StringIO()
    stats.stream = out
    stats.sort_stats("tottime").print_stats(top)
    stats.sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def main() -> None:
    args = _parse()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = IHipConfig.from_options(json.loads(args.options))
    model = build_model(args.layers, device, dtype, tiny=False)
    ours = torch.compile(model, backend=args.backend, options=config.as_dict())
    cycle = max(config.refresh_intervals)
    if args.cache == "offloaded":
        cache = OffloadedCache(model.config, max_cache_tokens=args.context + (args.cycles + 2)
                               * cycle + 8, dtype=dtype, device=device, ihip_config=config)
        fill_cache(cache, model, args.context, device, dtype)
    else:
        cache = dense_cache(model, args.context, device, dtype)
    token = torch.randint(3, model.config.vocab_size, (1, 1), device=device)
    steps, merged = [], {"cached": None, "refresh": None}
    with torch.no_grad():
        for i in range(cycle + 1 + args.cycles * cycle):
            runs = _stage_runs(cache)
            profile = cProfile.Profile()
            torch.cuda.synchronize() if device.type == "cuda" else None
            t0 = time.perf_counter()
            profile.enable()
            out = ours(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            torch.cuda.synchronize() if device.type == "cuda" else None
            profile.disable()
            ms = 1e3 * (time.perf_counter() - t0)
            if i <= cycle:
                continue  # warm-up: compilation and the first selection
            kind = "refresh" if _stage_runs(cache) != runs else "cached"
            steps.append({"ms": ms, "kind": kind})
            if merged[kind] is None:
                merged[kind] = pstats.Stats(profile)
            else:
                merged[kind].add(profile)
    os.makedirs(args.out_dir, exist_ok=True)
    summary = {"context": args.context, "layers": args.layers, "backend": args.backend,
               "cache": args.cache, "device": str(device), "torch": torch.__version__,
               "steps": steps}
    for kind in merged:
        times = [s["ms"] for s in steps if s["kind"] == kind]
        summary[f"{kind}_mean_ms"] = sum(times) / len(times) if times else None
        with open(os.path.join(args.out_dir, f"{kind}.txt"), "w") as f:
            f.write(_stats_text(merged[kind], args.top))
    summary["mean_ms"] = sum(s["ms"] for s in steps) / len(steps)
    with open(os.path.join(args.out_dir, "steps.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "steps"}))


if __name__ == "__main__":
    main()
