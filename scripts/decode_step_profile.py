"""Where the time of a decode step goes: profiles of cached and refresh steps.

    python scripts/decode_step_profile.py [--context 1048576] [--layers 4]
        [--backend infinitehip_eager] [--cache offloaded|dynamic]
        [--profiler python|gpu|trace|syncs|none]
        [--options JSON] [--fp8] [--out-dir DIR]

The end-to-end benchmark's model (Llama-3.1-8B shapes, random weights, ``--layers`` layers)
decodes one warm-up refresh cycle, then ``--cycles`` timed cycles; each step is timed (device
synchronised), profiled, and filed by kind: cached (no pruning stage ran in any layer) or
``refresh_stage<i>`` (stage i was the first to run: a stage 2 refresh differs from stage 0's).
``--profiler python``: ``cProfile`` (host time by function; it slows Python about twofold).
``--profiler gpu``: ``torch.profiler`` with CUDA activity only, the GPU time of each step's
kernels and copies (a step whose GPU time is far below its wall time is bound by the host), and
each step's kernels of 0.1 ms or more in launch order (which layer and stage a call served).
``--profiler trace``: ``torch.profiler`` with CPU and CUDA activity, a Chrome trace of every
timed step (``traces/<n>_<kind>.json.gz``, for a timeline viewer: where the host is while the
GPU waits), and per kind the host time of each offloaded attention call, split into the torch
ops it runs (outermost ones) and the Python between them (Triton launches included). The
profiler slows the host: compare its figures with each other, not with untraced steps.
``--profiler none``: step times only (for comparing two versions of the code).
``--profiler syncs``: the device-to-host syncs of each step, by call site (CUDA's sync debug
mode; each one stops the host from queueing work while the GPU drains).
Writes ``steps.json`` (per-step ms, GPU ms, kind) and ``<kind>.txt`` (the heaviest functions or
kernels of each kind's steps) under ``--out-dir``. ``python`` runs on the CPU too (kernels'
torch references: a different profile).
"""

from __future__ import annotations

import argparse
import cProfile
import gzip
import io
import json
import os
import pstats
import time
import warnings

import torch

from ihip_compile.bench.e2e import _sync, dense_cache, fill_cache
from ihip_compile.bench.script_model import add_model_arguments, compiled_model
from ihip_compile.kernels.decode_selection_cache import DENSE_PATH_STATES
from ihip_compile.offload import OffloadedCache


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/decode_step_profile.py")
    add_model_arguments(p)
    p.add_argument("--cache", default="offloaded", choices=["offloaded", "dynamic"])
    p.add_argument("--cycles", type=int, default=2)
    p.add_argument("--profiler", default="python",
                   choices=["python", "gpu", "trace", "syncs", "none"])
    p.add_argument("--top", type=int, default=40)
    p.add_argument("--out-dir", default="decode-step-profile")
    return p.parse_args()


def _bank_counts(cache) -> dict[str, int]:
    """Hits and misses of each bank, summed over layers (offloaded cache; else empty)."""
    if not isinstance(cache, OffloadedCache):
        return {}
    totals: dict[str, int] = {}
    for row in cache.hit_counts():
        for name, count in row.items():
            if name.endswith(("_hits", "_misses")):
                totals[name] = totals.get(name, 0) + count
    return totals


def _stage_runs(cache) -> list[int]:
    """Runs of each pruning stage so far, summed over layers."""
    offloaded = isinstance(cache, OffloadedCache)
    states = cache.store.selection_states if offloaded else DENSE_PATH_STATES
    return [sum(per_stage) for per_stage in zip(*states.stage_runs.values())]


def _step_kind(runs_before: list[int], runs_after: list[int]) -> str:
    """"cached" when no stage ran, else "refresh_stage<i>", i the first stage that ran (a
    refresh recomputes every later stage too)."""
    ran = [i for i, (b, a) in enumerate(zip(runs_before, runs_after)) if a != b]
    return f"refresh_stage{ran[0]}" if ran else "cached"


class PythonProfile:
    """cProfile per step, merged per kind."""

    def __init__(self):
        self.merged: dict[str, pstats.Stats] = {}

    def step(self, run):
        profile = cProfile.Profile()
        profile.enable()
        run()
        profile.disable()
        return profile, None

    def file(self, kind: str, profile) -> None:
        if kind in self.merged:
            self.merged[kind].add(profile)
        else:
            self.merged[kind] = pstats.Stats(profile)

    def text(self, kind: str, top: int) -> str:
        if kind not in self.merged:
            return "no steps of this kind\n"
        out = io.StringIO()
        stats = self.merged[kind]
        stats.stream = out
        stats.sort_stats("tottime").print_stats(top)
        stats.sort_stats("cumulative").print_stats(top)
        return out.getvalue()


class GpuProfile:
    """torch.profiler (CUDA activity) per step: GPU ms of the step, kernel totals per kind."""

    LONG_KERNEL_MS = 0.1

    def __init__(self):
        self.kernels: dict[str, dict[str, list[float]]] = {}
        self.long_kernels: list[list] = []  # per step: [name, ms] in launch order

    def step(self, run):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            run()
        rows = {e.key: [e.count, e.self_device_time_total / 1e3]
                for e in prof.key_averages() if e.self_device_time_total > 0}
        long = sorted((e.time_range.start, e.name[:60], round(e.self_device_time_total / 1e3, 3))
                      for e in prof.events()
                      if e.self_device_time_total / 1e3 >= self.LONG_KERNEL_MS)
        self.long_kernels.append([[name, ms] for _, name, ms in long])
        return rows, sum(ms for _, ms in rows.values())

    def file(self, kind: str, rows) -> None:
        totals = self.kernels.setdefault(kind, {})
        for key, (count, ms) in rows.items():
            total = totals.setdefault(key, [0, 0.0])
            total[0] += count
            total[1] += ms

    def text(self, kind: str, top: int) -> str:
        rows = sorted(self.kernels.get(kind, {}).items(), key=lambda r: -r[1][1])[:top]
        if not rows:
            return "no steps of this kind\n"
        lines = [f"{'GPU ms (all steps)':>18}  {'calls':>6}  kernel"]
        lines += [f"{ms:18.3f}  {count:6d}  {key[:120]}" for key, (count, ms) in rows]
        return "\n".join(lines) + "\n"


class TraceProfile:
    """torch.profiler (CPU and CUDA) per step: a Chrome trace of each, and the host time of
    each offloaded attention call, in ops and in Python."""

    def __init__(self, out_dir: str):
        self.trace_dir = os.path.join(out_dir, "traces")
        os.makedirs(self.trace_dir, exist_ok=True)
        self.calls: dict[str, list[str]] = {}
        self.traced = 0

    def step(self, run):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
        return prof, None

    def file(self, kind: str, prof) -> None:
        self.traced += 1
        path = os.path.join(self.trace_dir, f"{self.traced:03d}_{kind}.json")
        prof.export_chrome_trace(path)
        with open(path, "rb") as f:
            events = json.load(f)["traceEvents"]
        with gzip.open(path + ".gz", "wb") as f:
            f.write(json.dumps(events).encode())
        os.remove(path)
        rows = self.calls.setdefault(kind, [])
        for call in _attention_calls(events):
            rows.append(f"{self.traced:6d}  {call['ms']:8.3f}  {call['ops']:5d}  "
                        f"{call['ops_ms']:8.3f}  {call['ms'] - call['ops_ms']:9.3f}")

    def text(self, kind: str, top: int) -> str:
        if kind not in self.calls:
            return "no steps of this kind\n"
        head = "  step  call ms    ops    ops ms  python ms   (each ihip::attention, in order)"
        return "\n".join([head, *self.calls[kind]]) + "\n"


def _attention_calls(events: list[dict]) -> list[dict]:
    """Each ``ihip::attention`` CPU event of a trace: its ms, and the outermost ops inside it
    (how many, their ms); the rest of its time is Python."""
    ops = sorted((e for e in events if e.get("ph") == "X" and e.get("cat") == "cpu_op"),
                 key=lambda e: e["ts"])
    calls = []
    for call in (e for e in ops if e["name"] == "ihip::attention"):
        end, outer = call["ts"] + call["dur"], []
        for e in ops:
            if call["ts"] < e["ts"] < end and (not outer or e["ts"] >= outer[-1]["ts"]
                                                + outer[-1]["dur"]):
                outer.append(e)
        calls.append({"ms": call["dur"] / 1e3, "ops": len(outer),
                      "ops_ms": sum(e["dur"] for e in outer) / 1e3})
    return calls


class SyncProfile:
    """Device-to-host syncs per step, counted by the Python line that caused them."""

    def __init__(self):
        self.sites: dict[str, dict[str, int]] = {}

    def step(self, run):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch.cuda.set_sync_debug_mode("warn")
            try:
                run()
            finally:
                torch.cuda.set_sync_debug_mode("default")
        sites: dict[str, int] = {}
        for w in caught:
            if "synchroniz" in str(w.message):
                site = f"{w.filename}:{w.lineno}"
                sites[site] = sites.get(site, 0) + 1
        return sites, sum(sites.values())

    def file(self, kind: str, sites) -> None:
        totals = self.sites.setdefault(kind, {})
        for site, count in sites.items():
            totals[site] = totals.get(site, 0) + count

    def text(self, kind: str, top: int) -> str:
        rows = sorted(self.sites.get(kind, {}).items(), key=lambda r: -r[1])[:top]
        if not rows:
            return "no syncs in steps of this kind\n"
        return "\n".join(f"{count:6d}  {site}" for site, count in rows) + "\n"


class NoProfile:
    """Step times only."""

    def step(self, run):
        run()
        return None, None

    def file(self, kind: str, profile) -> None:
        pass

    def text(self, kind: str, top: int) -> str:
        return "step times only (--profiler none)\n"


PROFILERS = {"python": PythonProfile, "gpu": GpuProfile, "syncs": SyncProfile,
             "none": NoProfile}


def main() -> None:
    args = _parse()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if args.profiler in ("gpu", "trace", "syncs") and device.type != "cuda":
        raise SystemExit(f"scripts/decode_step_profile.py --profiler {args.profiler} needs a "
                         f"CUDA GPU")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    built = compiled_model(args, device, dtype)
    config, model, ours = built.config, built.model, built.ours
    cycle = max(config.refresh_intervals)
    if args.cache == "offloaded":
        cache = OffloadedCache(model.config, max_cache_tokens=args.context + (args.cycles + 2)
                               * cycle + 8, dtype=dtype, device=device, ihip_config=config,
                               storage_dtype=built.storage_dtype)
        fill_cache(cache, model, args.context, device, dtype)
    else:
        cache = dense_cache(model, args.context, device, dtype)
    token = torch.randint(3, model.config.vocab_size, (1, 1), device=device)
    profiler = (TraceProfile(args.out_dir) if args.profiler == "trace"
                else PROFILERS[args.profiler]())
    measure = {"gpu": "gpu_ms", "syncs": "syncs"}.get(args.profiler)  # per step, in steps.json
    steps = []
    with torch.no_grad():
        for i in range(cycle + 1 + args.cycles * cycle):
            runs, counts_before = _stage_runs(cache), _bank_counts(cache)
            outputs = []

            def run():
                outputs.append(ours(input_ids=token, past_key_values=cache, use_cache=True,
                                    logits_to_keep=1))
                _sync(device)

            _sync(device)
            t0 = time.perf_counter()
            profile, measured = profiler.step(run)
            ms = 1e3 * (time.perf_counter() - t0)
            token = outputs[0].logits[:, -1:].argmax(-1)
            if i <= cycle:
                warm_hits = _bank_counts(cache)
                continue  # warm-up: compilation and the first selection
            kind = _step_kind(runs, _stage_runs(cache))
            counts = {name: count - counts_before.get(name, 0)
                      for name, count in _bank_counts(cache).items()}
            steps.append({"ms": ms, "kind": kind, "bank_counts": counts})
            if measure:
                steps[-1][measure] = measured
            profiler.file(kind, profile)
    os.makedirs(args.out_dir, exist_ok=True)
    summary = {"context": args.context, "layers": args.layers, "backend": args.backend,
               "cache": args.cache, "profiler": args.profiler, "device": str(device),
               "torch": torch.__version__, "steps": steps}
    if isinstance(profiler, GpuProfile):
        for step, long in zip(steps, profiler.long_kernels[-len(steps):]):
            step["long_kernels"] = long
    for kind in sorted({s["kind"] for s in steps}):
        of_kind = [s for s in steps if s["kind"] == kind]
        summary[f"{kind}_mean_ms"] = (sum(s["ms"] for s in of_kind) / len(of_kind)
                                      if of_kind else None)
        if measure and of_kind:
            summary[f"{kind}_mean_{measure}"] = sum(s[measure] for s in of_kind) / len(of_kind)
        with open(os.path.join(args.out_dir, f"{kind}.txt"), "w") as f:
            f.write(profiler.text(kind, args.top))
    summary["mean_ms"] = sum(s["ms"] for s in steps) / len(steps)
    summary["timed_bank_counts"] = {name: count - warm_hits.get(name, 0)
                                    for name, count in _bank_counts(cache).items()}
    with open(os.path.join(args.out_dir, "steps.json"), "w") as f:
        json.dump(summary, f, indent=1)
    print(json.dumps({k: v for k, v in summary.items() if k != "steps"}))


if __name__ == "__main__":
    main()
