"""End-to-end benchmark: a Llama-3.1-8B-shaped model generating over long contexts.

    python -m ihip_compile.bench e2e --out reports/bench [--layers 4] [--contexts 131072,...]

Random weights (speed and memory only, never accuracy), bf16, batch 1, Llama-3.1-8B's shapes
(hidden 4096, 32 query / 8 KV heads, head dim 128, MLP 14336, vocabulary 128256) with
``--layers`` decoder layers so that the whole run fits one call. Same process, same inputs:
  decode     tokens/s at each context (``max``: the longest the available host memory holds
             for the offloaded cache; a GPU cache that does not fit is recorded as such).
             Ours: the model compiled with the infinitehip backend, KV in host memory
             (``OffloadedCache``), decode steps timed over a whole refresh cycle of the mask
             cache after two (the CUDA graphs' captures). Dense: the same model, uncompiled,
             transformers' SDPA over a ``DynamicCache`` on the GPU. Both caches hold the same random K/V (written directly:
             K/V contents only steer which blocks are selected, not the speed). Also ours over
             that ``DynamicCache`` (``ours_gpu_kv``: the KV on the GPU, for contexts that fit
             there), same model and cycles; and ours and dense over transformers'
             ``StaticCache`` (``ours_static_kv``, ``dense_static_kv``: no concatenation per
             step; each step passes the 2-D mask of the slots in use).
  ttft       time to first token of a ``--ttft-context`` prompt, after a warm-up prompt that
             runs what it runs (the graphs, and the kernels past the model's trained context,
             where RoPE is remapped; ``warm_up_tokens``): ours runs the whole chunked
             prefill, as the first prompt of a new cache (``ours_first_prompt_s``) and as a
             later prompt on the same cache after ``reset()`` (``ours_s``); dense is timed on single chunks (``--dense-chunk-tokens``, whose mask
             must fit the GPU) at a few positions and integrated over the prompt (an estimate,
             labelled as such; the per-chunk rates are in the JSON).
  capacity   largest context on this GPU for the full 32-layer model: dense from free GPU memory,
             ours from available host memory; the GPU memory the KV takes in each case.
  hit ratio  of the GPU block banks over the timed decode steps (attention and pruning banks).
  passkey    SmolLM2-135M-Instruct answers a pass key hidden at ``--passkey-depth`` of a
             ``--passkey-context`` prompt: chunked prefill into an OffloadedCache, generate().
Writes ``e2e.json`` and ``e2e.md`` under ``--out``. A section that fails records its error and
the command exits non-zero after writing what it has.
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import time
import traceback

import torch

from ihip_compile.config import REFRESH_PRESETS, IHipConfig

FULL_LAYERS = 32
SECTIONS = ("decode", "ttft", "capacity", "passkey")
GPU_OOM = "out of GPU memory"  # how a cache that did not fit is recorded
LLAMA_8B = dict(hidden_size=4096, intermediate_size=14336, num_attention_heads=32,
                num_key_value_heads=8, head_dim=128, vocab_size=128256, rope_theta=500000.0,
                max_position_embeddings=131072, rms_norm_eps=1e-5)
TINY = dict(hidden_size=64, intermediate_size=96, num_attention_heads=4, num_key_value_heads=2,
            head_dim=16, vocab_size=96, rope_theta=10000.0, max_position_embeddings=256)


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def build_model(layers: int, device, dtype, tiny: bool):
    import transformers

    shape = TINY if tiny else LLAMA_8B
    config = transformers.LlamaConfig(**shape, num_hidden_layers=layers)
    config._attn_implementation = "sdpa"
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.LlamaForCausalLM(config).to(dtype)
    model.config.dtype = dtype
    return model.eval()


def kv_shape(model) -> tuple[int, int]:
    c = model.config
    return c.num_key_value_heads, c.head_dim


def fill_cache(cache, model, context: int, device, dtype, piece: int = 65536, seed: int = 1):
    """Write the same random K/V (per layer and piece, seeded) into ``cache``."""
    heads, dim = kv_shape(model)
    for layer in range(model.config.num_hidden_layers):
        for lo in range(0, context, piece):
            n = min(piece, context - lo)
            g = torch.Generator(device=device).manual_seed(seed + 1000 * layer + lo)
            k = torch.randn(1, heads, n, dim, generator=g, device=device, dtype=dtype)
            v = torch.randn(1, heads, n, dim, generator=g, device=device, dtype=dtype)
            cache.update(k, v, layer)
    _sync(device)


def dense_cache(model, context, device, dtype):
    """DynamicCache holding ``context`` tokens, filled in one write per layer."""
    from transformers import DynamicCache

    return _filled(DynamicCache(config=model.config), model, context, device, dtype)


def static_cache(model, context, room, device, dtype):
    """transformers' ``StaticCache`` with ``context + room`` slots, its first ``context`` holding
    the K/V ``dense_cache`` writes."""
    from transformers import StaticCache

    cache = StaticCache(config=model.config, max_cache_len=context + room)
    return _filled(cache, model, context, device, dtype)


def _filled(cache, model, context, device, dtype):
    """``cache`` with ``context`` tokens of seeded random K/V per layer, one write per layer."""
    heads, dim = kv_shape(model)
    for layer in range(model.config.num_hidden_layers):
        g = torch.Generator(device=device).manual_seed(1 + 1000 * layer)
        k = torch.randn(1, heads, context, dim, generator=g, device=device, dtype=dtype)
        cache.update(k, torch.randn_like(k), layer)
    return cache


class GrowingMask:
    """Decode-step inputs over a ``StaticCache`` holding ``tokens``: the 2-D attention mask of
    the slots in use, one more at each step (the model hides the unused slots through it)."""

    def __init__(self, tokens: int, device):
        self.tokens, self.device = tokens, device

    def __call__(self) -> dict:
        self.tokens += 1
        return {"attention_mask": torch.ones(1, self.tokens, dtype=torch.long,
                                             device=self.device)}


def time_decode(forward, cache, steps: int, warmup: int, device, vocab: int,
                after_step=lambda: None, step_inputs=dict) -> dict:
    """Mean ms per decode step over ``steps`` steps after ``warmup`` (greedy, logits of 1), and
    each step's ms (a host-bound step varies with the state of the host: the list shows whether
    a mean is the steps' or a few stalls'); ``after_step()`` runs after each timed step, outside
    the timing; ``step_inputs()`` gives each step's further model inputs (``GrowingMask``)."""
    token = torch.randint(3, vocab, (1, 1), device=device)
    times = []
    with torch.no_grad():
        for i in range(warmup + steps):
            _sync(device)
            t0 = time.perf_counter()
            out = forward(input_ids=token, past_key_values=cache, use_cache=True,
                          logits_to_keep=1, **step_inputs())
            token = out.logits[:, -1:].argmax(-1)
            _sync(device)
            if i >= warmup:
                times.append(time.perf_counter() - t0)
                after_step()
    mean = sum(times) / len(times)
    return {"ms_per_token": 1e3 * mean, "tokens_per_s": 1.0 / mean, "steps": steps,
            "ms_min": 1e3 * min(times), "ms_max": 1e3 * max(times),
            "ms_steps": [round(1e3 * t, 3) for t in times]}


def _bank_totals(cache) -> dict:
    rows = cache.hit_counts()
    return {k: sum(r[k] for r in rows) for k in rows[0] if k != "layer"}


def _ratio(after: dict, before: dict, kind: str):
    hits = after[f"{kind}_hits"] - before[f"{kind}_hits"]
    misses = after[f"{kind}_misses"] - before[f"{kind}_misses"]
    return hits / (hits + misses) if hits + misses else None


class StepBankCounts:
    """Bank counters after every timed step, to tell steps between refreshes (no pruning stage
    ran in any layer) from refresh steps."""

    def __init__(self, cache):
        self.cache = cache
        self.rows = [self._snapshot()]

    def _snapshot(self) -> dict:
        runs = self.cache.store.selection_states.stage_runs
        return {**_bank_totals(self.cache), "stage_runs": sum(sum(r) for r in runs.values())}

    def __call__(self) -> None:
        self.rows.append(self._snapshot())

    def between_refreshes(self) -> dict:
        """Attention-bank hits and misses over the steps that refreshed nothing (a miss there:
        the window entering a block never read before, or a bank too small for the selection)."""
        hits = misses = steps = 0
        for before, after in zip(self.rows, self.rows[1:]):
            if after["stage_runs"] == before["stage_runs"]:
                steps += 1
                hits += after["attention_hits"] - before["attention_hits"]
                misses += after["attention_misses"] - before["attention_misses"]
        return {"steps": steps, "attention_hits": hits, "attention_misses": misses,
                "attention_hit_ratio": hits / (hits + misses) if hits + misses else None}


WARMUP_CYCLES = 2  # refresh cycles decoded before the timed one (offloaded cache)
# Host memory left to the process beside the K/V at ``--contexts max`` (its libraries, the
# model's host side, transfers).
HOST_HEADROOM_BYTES = 8 * 2**30


def stored_item_sizes(args, dtype) -> tuple[int, int]:
    """Bytes per element of the stored keys and values, and of the keys the pruning stages read
    (``fp8_pruning_keys``: a second copy, in host memory too)."""
    stored = args.storage_dtype or dtype
    pruning = torch.float8_e4m3fn if args.config.fp8_pruning_keys else stored
    return (torch.empty((), dtype=stored).element_size(),
            torch.empty((), dtype=pruning).element_size() if pruning != stored else 0)


def largest_offloaded_context(model, args, dtype, room: int) -> int:
    """The longest context, in whole 64k-token pieces, whose K/V (every layer of ``model``,
    stored as ``args`` says) and ``room`` more tokens fit the available host memory less
    ``HOST_HEADROOM_BYTES``."""
    from ihip_compile.kernels.kv_store import available_host_bytes

    heads, dim = kv_shape(model)
    stored, extra_keys = stored_item_sizes(args, dtype)
    per_token = model.config.num_hidden_layers * heads * dim * (2 * stored + extra_keys)
    tokens = (available_host_bytes() - HOST_HEADROOM_BYTES) // per_token - room
    if tokens < 65536:
        raise ValueError(f"available host memory holds {max(tokens, 0):,} tokens of this model's "
                         "K/V: fewer than one 64k piece")
    return tokens // 65536 * 65536


def whole_step_counts() -> dict:
    """Decode steps of the compiled graphs replayed as one CUDA graph, captured, or run piece by
    piece (``decode_step_replay``), summed over the graphs compiled so far; and the inputs
    their last captures copy at each replay (``staged_inputs``)."""
    from ihip_compile.backend import compiled_graphs
    from ihip_compile.passes.fold_decode_step import STEP_MODULE

    totals = {"replays": 0, "captures": 0, "observed": 0, "staged_inputs": 0}
    for result in compiled_graphs:
        step = getattr(result.gm, STEP_MODULE, None)
        if step is not None:
            for name in ("replays", "captures", "observed"):
                totals[name] += step.stats[name]
            totals["staged_inputs"] += len(step.buffers)
    return totals


def decode_section(args, model, ours, device, dtype, on_row=lambda rows: None) -> list[dict]:
    from ihip_compile.kernels.offloaded_attention import release_scratch
    from ihip_compile.offload import OffloadedCache

    rows = []
    cycle = max(args.refresh)
    room = (WARMUP_CYCLES + 1) * cycle + 8  # the decode steps' tokens beyond the context
    for context in args.contexts:
        row = {"context": context}
        if context == "max":
            row["context"] = context = largest_offloaded_context(model, args, dtype, room)
            row["context_note"] = ("max: the largest multiple of 64k tokens whose K/V, all "
                                   "layers, fit the available host memory less "
                                   f"{HOST_HEADROOM_BYTES / 2**30:.0f} GiB")
        try:
            cache = OffloadedCache(model.config, max_cache_tokens=context + room,
                                   dtype=dtype, device=device, ihip_config=args.config,
                                   storage_dtype=args.storage_dtype)
            t0 = time.perf_counter()
            fill_cache(cache, model, context, device, dtype)
            row["ours_fill_s"] = time.perf_counter() - t0
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats()
            # Warm-up: compile, a refresh cycle so the banks hold the selection, and one more:
            # a bank's admissions of each read size are captured at their second read.
            time_decode(ours, cache, 1, WARMUP_CYCLES * cycle, device, model.config.vocab_size)
            before, steps_before = _bank_totals(cache), whole_step_counts()
            per_step = StepBankCounts(cache)
            row["ours"] = time_decode(ours, cache, cycle, 0, device, model.config.vocab_size,
                                      per_step)
            after = _bank_totals(cache)
            steps_after = whole_step_counts()
            row["whole_step_graph"] = {k: n - steps_before[k] for k, n in steps_after.items()
                                       if k != "staged_inputs"}
            row["whole_step_graph"]["staged_inputs"] = steps_after["staged_inputs"]
            row["hit_ratio"] = {k: _ratio(after, before, k) for k in ("attention", "pruning")}
            row["between_refreshes"] = per_step.between_refreshes()
            row["blocks_streamed"] = after["streamed_blocks"] - before["streamed_blocks"]
            row["in_place_scans"] = after["in_place_scans"] - before["in_place_scans"]
            row["ours_gpu_bank_and_probe_copy_bytes"] = cache.gpu_bytes
            if device.type == "cuda":
                row["ours_peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
            del cache
            release_scratch()
        except Exception as e:  # recorded, never hidden: the command exits non-zero
            row["ours_error"] = _error(e)
        for static in (False, True):
            row.update(_ours_gpu_kv_decode(args, model, ours, context, device, dtype, static))
            row.update(_dense_decode(args, model, context, device, dtype, static))
        for name, key in (("ours", "speedup"), ("ours_gpu_kv", "speedup_gpu_kv"),
                          ("ours_static_kv", "speedup_static_kv")):
            if name in row and "dense" in row:
                row[key] = row["dense"]["ms_per_token"] / row[name]["ms_per_token"]
        if "ours_static_kv" in row and "dense_static_kv" in row:
            row["speedup_static_kv_vs_dense_static"] = (
                row["dense_static_kv"]["ms_per_token"] / row["ours_static_kv"]["ms_per_token"])
        rows.append(row)
        _log(row)
        on_row(rows)  # partial results survive a run cut short
    return rows


def _ours_gpu_kv_decode(args, model, ours, context, device, dtype, static=False) -> dict:
    """Ours with the KV in GPU memory: transformers' ``DynamicCache`` (as a prompt that fits
    there runs without ``OffloadedCache``), or with ``static`` its ``StaticCache`` (no
    concatenation per step): one refresh cycle of warm-up, one timed."""
    cycle = max(args.refresh)
    name = "ours_static_kv" if static else "ours_gpu_kv"
    try:
        cache, inputs = _gpu_cache(model, context, 2 * cycle + 2, device, dtype, static)
        time_decode(ours, cache, 1, cycle, device, model.config.vocab_size, step_inputs=inputs)
        out = {name: time_decode(ours, cache, cycle, 0, device, model.config.vocab_size,
                                 step_inputs=inputs)}
        del cache
    except torch.OutOfMemoryError as e:
        out = {f"{name}_error": f"{GPU_OOM}: {str(e).splitlines()[0]}"}
    except Exception as e:
        out = {f"{name}_error": _error(e)}
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _gpu_cache(model, context, room, device, dtype, static):
    """A GPU cache holding ``context`` tokens and the per-step inputs it needs."""
    if static:
        return static_cache(model, context, room, device, dtype), GrowingMask(context, device)
    return dense_cache(model, context, device, dtype), dict


def _dense_decode(args, model, context, device, dtype, static=False) -> dict:
    """The uncompiled model over a ``DynamicCache`` (``dense``) or a ``StaticCache``
    (``dense_static_kv``: attention over every slot, the unused ones masked)."""
    name, out = ("dense_static_kv" if static else "dense"), {}
    try:
        forwards = _dense_forwards(args, model)
        # every setting decodes into the one cache
        room = 2 * len(forwards) * (args.dense_steps + 2) + 2
        cache, inputs = _gpu_cache(model, context, room, device, dtype, static)
        out[f"{name}_kv_bytes"] = sum(t.numel() * t.element_size() for layer in cache.layers
                                      for t in (layer.keys, layer.values))

        def run(forward):
            return lambda: time_decode(forward, cache, args.dense_steps, 2, device,
                                       model.config.vocab_size, step_inputs=inputs)

        out[f"{name}_by_sdpa"] = {
            f"{setting}{suffix}": _with_cudnn_sdpa(enabled, run(forward))
            for suffix, forward in forwards.items()
            for setting, enabled in _dense_sdpa_settings(device)}
        # The baseline is the fastest setting: a user can switch cuDNN's SDPA off, or compile.
        out[name] = min(out[f"{name}_by_sdpa"].values(), key=lambda r: r["ms_per_token"])
        cache = None  # released before the allocator's cache is emptied
    except torch.OutOfMemoryError as e:
        out[f"{name}_error"] = f"{GPU_OOM}: {str(e).splitlines()[0]}"
    except Exception as e:
        out[f"{name}_error"] = _error(e)
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return out


def _dense_forwards(args, model) -> dict:
    """The dense model as timed: uncompiled, and with ``--dense-inductor`` also compiled by
    torch.compile's default backend (``args.dense_compiled``, made once in ``main``)."""
    forwards = {"": model}
    if args.dense_compiled is not None:
        forwards["_inductor"] = args.dense_compiled
    return forwards


def _dense_sdpa_settings(device) -> list[tuple[str, bool]]:
    """SDPA settings to time dense decode with. On CUDA, torch's default may pick cuDNN's
    attention, which plans anew for every key length (each decode step: ~12 ms of host time per
    layer on an H200 with torch 2.11); timed with it off too."""
    if device.type != "cuda":
        return [("default", True)]
    return [("default", True), ("cudnn_off", False)]


def _with_cudnn_sdpa(enabled: bool, run):
    previous = torch.backends.cuda.cudnn_sdp_enabled()
    torch.backends.cuda.enable_cudnn_sdp(previous and enabled)
    try:
        return run()
    finally:
        torch.backends.cuda.enable_cudnn_sdp(previous)


def ttft_section(args, model, ours, device, dtype) -> dict:
    from ihip_compile.offload import OffloadedCache

    context, chunk = args.ttft_context, args.chunk_tokens
    warm_tokens = _warm_up_tokens(args.config, model, context, chunk)
    result = {"context": context, "chunk_tokens": chunk, "warm_up_tokens": warm_tokens}
    warm = OffloadedCache(model.config, max_cache_tokens=warm_tokens, dtype=dtype,
                          device=device, ihip_config=args.config,
                          storage_dtype=args.storage_dtype)
    _timed_prefill(ours, _prompt(model, warm_tokens, 2, device), warm, chunk, device, False)
    # The compiler's trace records hold the warm-up cache in reference cycles: free its pinned
    # host memory now, not whenever the cycle collector next runs (maybe inside a timed prompt).
    del warm
    gc.collect()
    cache = OffloadedCache(model.config, max_cache_tokens=context + 8, dtype=dtype,
                           device=device, ihip_config=args.config,
                           storage_dtype=args.storage_dtype)
    # The first prompt allocates and pins the cache's host memory as its layers fill, and
    # compiles the kernels' variants for lengths the warm-up did not reach; a later prompt on
    # the same cache (a server's next request, after ``reset()``) does neither.
    result["ours_first_prompt_s"] = _timed_prefill(
        ours, _prompt(model, context, 2, device), cache, chunk, device, args.progress)
    cache.reset()
    result["ours_s"] = _timed_prefill(ours, _prompt(model, context, 3, device), cache, chunk,
                                      device, args.progress)
    del cache
    # Dense may need shorter chunks than ours: transformers' SDPA builds a [chunk, past + chunk]
    # mask, which for a 32k chunk past 768k keys is larger than the GPU's free memory.
    dense_chunk = args.dense_chunk_tokens or chunk
    result["dense_chunk_tokens"] = dense_chunk
    result.update(_dense_ttft_estimate(args, model, context, dense_chunk, device, dtype))
    if "dense_estimate_s" in result:
        for ours_key, ratio_key in (("ours_s", "ratio_ours_over_dense"),
                                    ("ours_first_prompt_s", "ratio_first_prompt_over_dense")):
            result[ratio_key] = result[ours_key] / result["dense_estimate_s"]
    return result


def _warm_up_tokens(config: IHipConfig, model, context: int, chunk: int) -> int:
    """A warm-up prompt's length: three chunks (the first chunk's graph, then the one for a
    dynamic key count), and past the model's trained context when the timed prompt goes there.
    From there on RoPE is remapped, which runs other kernel variants: a first prompt that crossed
    it cold would stop there to compile them (8.5-10.5 s on an H200; Triton's disk cache keeps them
    for later processes), reports/bench/first_prompt/."""
    from ihip_compile.layer_policy import infer_trained_context_tokens

    tokens = 3 * chunk
    trained = config.trained_context_tokens or infer_trained_context_tokens(model)
    if config.rope_remap == "auto" and trained and context > trained:
        tokens = max(tokens, (trained // chunk + 1) * chunk)
    return min(tokens, context)


def _prompt(model, tokens: int, seed: int, device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, tokens), generator=generator).to(device)


def _timed_prefill(ours, ids, cache, chunk: int, device, progress: bool) -> float:
    """Seconds from the prompt to its last token's greedy choice on the host."""
    from ihip_compile.chunked_prefill import chunked_prefill

    _sync(device)
    t0 = time.perf_counter()
    logits = chunked_prefill(ours, ids, cache, chunk_tokens=chunk, leave_last=False,
                             progress=progress)
    logits.argmax(-1).item()
    return time.perf_counter() - t0


def _dense_ttft_estimate(args, model, context, chunk, device, dtype) -> dict:
    """Dense chunk times at sampled positions, integrated (trapezoid) over the prompt."""
    n_chunks = -(-context // chunk)
    positions = sorted({0, n_chunks // 4, n_chunks // 2, (3 * n_chunks) // 4, n_chunks - 1})
    samples = []
    ids = torch.randint(3, model.config.vocab_size, (1, chunk), device=device)
    with torch.no_grad():
        model(input_ids=ids, use_cache=True, logits_to_keep=1)  # warm-up
    for index in positions:
        past = index * chunk
        try:
            cache = dense_cache(model, past, device, dtype) if past else None
            kwargs = {"past_key_values": cache} if cache is not None else {}
            with torch.no_grad():
                _sync(device)
                t0 = time.perf_counter()
                model(input_ids=ids, use_cache=True, logits_to_keep=1, **kwargs)
                _sync(device)
            samples.append({"chunk_index": index, "past_tokens": past,
                            "ms": 1e3 * (time.perf_counter() - t0)})
            del cache
        except torch.OutOfMemoryError as e:
            samples.append({"chunk_index": index, "past_tokens": past,
                            "error": f"{GPU_OOM}: {str(e).splitlines()[0]}"})
        if device.type == "cuda":
            torch.cuda.empty_cache()
    out = {"dense_chunk_samples": samples}
    timed = [(s["chunk_index"], s["ms"]) for s in samples if "ms" in s]
    if len(timed) == len(samples) and len(timed) >= 2:
        total = 0.0
        for i in range(n_chunks):
            for (a, ta), (b, tb) in zip(timed, timed[1:]):
                if a <= i <= b:
                    total += ta + (tb - ta) * (i - a) / max(b - a, 1)
                    break
        out["dense_estimate_s"] = total / 1e3
        out["dense_estimate_note"] = "sum of per-chunk times interpolated between the samples"
    else:
        out["dense_estimate_note"] = "dense could not run every sampled chunk: see the samples"
    return out


def capacity_section(args, model, device, dtype) -> dict:
    """Largest context for the full 32-layer model: dense on this GPU, ours from host memory."""
    from ihip_compile.kernels.kv_store import available_host_bytes
    from ihip_compile.kernels.probe_key_copy import copy_stride

    heads, dim = kv_shape(model)
    item = torch.empty((), dtype=dtype).element_size()
    store_item, extra_keys_item = stored_item_sizes(args, dtype)
    pruning_item = extra_keys_item or store_item
    per_token_gpu = FULL_LAYERS * heads * 2 * dim * item
    per_token_host = FULL_LAYERS * heads * dim * (2 * store_item + extra_keys_item)
    params_per_layer = sum(p.numel() for p in model.model.layers[0].parameters())
    other = sum(p.numel() for p in model.parameters()) - params_per_layer * len(model.model.layers)
    full_weights = (params_per_layer * FULL_LAYERS + other) * item
    out = {"full_layers": FULL_LAYERS, "kv_bytes_per_token_dense": per_token_gpu,
           "kv_bytes_per_token_host": per_token_host, "full_model_weight_bytes": full_weights}
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info()
        in_use = torch.cuda.memory_allocated()
        reserve = args.activation_reserve_gib * 2**30
        budget = total - full_weights - reserve
        out.update(gpu_total_bytes=total, activation_reserve_bytes=reserve,
                   dense_max_tokens=max(0, budget // per_token_gpu),
                   note_gpu="dense: (GPU total - 32-layer weights - reserve) / KV bytes per token;"
                            f" bench process had {in_use} bytes allocated, {free} free")
    host = available_host_bytes()
    ours_tokens = host // per_token_host
    attention, pruning = args.config.gpu_cache_tokens, args.config.pruning_bank_tokens()
    # The attention bank's keys and values, the pruning bank's keys, as stored.
    banks = FULL_LAYERS * (2 * attention * store_item + pruning * pruning_item) * heads * dim
    # One layer's keys and values at the full context: the scratch a prefill chunk fills. A
    # decode step on CUDA reads keys and values where they lie and gives it back.
    prefill_scratch = 2 * ours_tokens * heads * dim * item
    # Every layer's device copy of the keys stage 0 probes first (probe_key_copy).
    stride = copy_stride(args.config.stages[0].chunk_size, args.config.first_probe_parts)

    def probe_copies(tokens):
        return FULL_LAYERS * (tokens // stride) * heads * dim * pruning_item if stride else 0

    fixed = banks + probe_copies(ours_tokens)
    out.update(host_available_bytes=host, ours_max_tokens=ours_tokens,
               ours_gpu_kv_bytes_at_max=fixed + prefill_scratch, ours_gpu_bank_bytes=banks,
               ours_gpu_probe_copy_bytes_at_max=probe_copies(ours_tokens),
               ours_gpu_prefill_scratch_bytes_at_max=prefill_scratch,
               ours_gpu_decode_kv_bytes_at_max=fixed)
    if "dense_max_tokens" in out:
        out["capacity_ratio"] = ours_tokens / max(out["dense_max_tokens"], 1)
        dense_kv = max(out["dense_max_tokens"] * per_token_gpu, 1)
        layer_kv = out["dense_max_tokens"] * heads * dim * item  # one layer's keys
        fixed = banks + probe_copies(out["dense_max_tokens"])
        out["ours_gpu_kv_fraction_of_dense_at_dense_max"] = (fixed + 2 * layer_kv) / dense_kv
        out["ours_gpu_decode_kv_fraction_of_dense_at_dense_max"] = fixed / dense_kv
    return out


def passkey_section(args, device, dtype) -> dict:
    """SmolLM2 answers a pass key hidden in a ``--passkey-context`` prompt: chunked prefill into
    an OffloadedCache, then generate(), compiled with the backend (the end-to-end proof)."""
    from ihip_compile.chunked_prefill import chunked_prefill
    from ihip_compile.eval.data import passkey_prompt
    from ihip_compile.eval.run import answer_has_key
    from ihip_compile.layer_policy import with_model_facts
    from ihip_compile.offload import OffloadedCache
    from ihip_compile.smollm2 import load_smollm2

    model, tokenizer = load_smollm2(dtype=dtype, device=device)
    config = with_model_facts(args.config, model)
    ids, key = passkey_prompt(tokenizer, args.passkey_context, args.passkey_depth, seed=7)
    ids = ids.to(device)
    model.compile(backend=args.backend, options=config.as_dict())
    cache = OffloadedCache(model.config, max_cache_tokens=ids.shape[1] + args.passkey_new_tokens,
                           dtype=dtype, device=device, ihip_config=config,
                           storage_dtype=args.storage_dtype)
    _sync(device)
    t0 = time.perf_counter()
    chunked_prefill(model, ids, cache, chunk_tokens=args.chunk_tokens, progress=args.progress)
    prefill_s = time.perf_counter() - t0
    per_step = StepBankCounts(cache)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                         max_new_tokens=args.passkey_new_tokens, do_sample=False,
                         streamer=AfterEachToken(per_step))
    _sync(device)
    text = tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    return {"context": ids.shape[1], "depth": args.passkey_depth, "key": key, "answer": text,
            "correct": answer_has_key(text, key), "prefill_s": prefill_s,
            "total_s": time.perf_counter() - t0, "hit_ratio": cache.hit_ratios(),
            "between_refreshes": per_step.between_refreshes(),
            "trained_context_tokens": config.trained_context_tokens}


class AfterEachToken:
    """A ``generate()`` streamer that only calls ``callback()`` after each generated token (the
    first ``put`` carries the prompt)."""

    def __init__(self, callback):
        self.callback, self.seen_prompt = callback, False

    def put(self, _tokens) -> None:
        if self.seen_prompt:
            self.callback()
        self.seen_prompt = True

    def end(self) -> None:
        pass


def _error(e: Exception) -> str:
    return "".join(traceback.format_exception_only(type(e), e)).strip()


def _log(obj) -> None:
    print(json.dumps(obj, default=str), flush=True)


def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m ihip_compile.bench e2e", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/bench", help="folder for e2e.json and e2e.md")
    p.add_argument("--layers", type=int, default=4, help="decoder layers (8B has 32)")
    p.add_argument("--contexts", default="131072,524288,1048576",
                   help="decode contexts, comma-separated; 'max': the longest the available "
                        "host memory holds for the offloaded cache")
    p.add_argument("--ttft-context", type=int, default=1 << 20)
    p.add_argument("--chunk-tokens", type=int, default=32768)
    p.add_argument("--dense-chunk-tokens", type=int, default=None,
                   help="dense's prefill chunk for the time-to-first-token estimate "
                        "(default: --chunk-tokens)")
    p.add_argument("--refresh", default="default",
                   help=f"refresh preset {sorted(REFRESH_PRESETS)} or comma-separated steps")
    p.add_argument("--gpu-cache-tokens", type=int, default=IHipConfig.gpu_cache_tokens)
    p.add_argument("--fp8", action="store_true", help="store K/V as float8_e4m3fn in host memory")
    p.add_argument("--dense-steps", type=int, default=16)
    p.add_argument("--dense-inductor", action="store_true",
                   help="also time dense decode compiled by torch.compile's default backend "
                        "(the baseline is the fastest dense setting)")
    p.add_argument("--activation-reserve-gib", type=float, default=8.0)
    p.add_argument("--sections", default="decode,ttft,capacity,passkey")
    p.add_argument("--passkey-context", type=int, default=1 << 20)
    p.add_argument("--passkey-depth", type=float, default=0.5)
    p.add_argument("--passkey-new-tokens", type=int, default=10,
                   help="tokens generate() adds after the pass-key prompt")
    p.add_argument("--backend", default="infinitehip",
                   choices=["infinitehip", "infinitehip_eager"])
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (a CPU smoke run)")
    p.add_argument("--options", default="{}", help="extra infinitehip options as JSON")
    p.add_argument("--progress", action="store_true")
    args = p.parse_args(argv)
    try:
        args.contexts = [c if c == "max" else int(c) for c in args.contexts.split(",") if c]
    except ValueError:
        p.error(f"--contexts takes token counts and 'max', comma-separated; got {args.contexts!r}")
    refresh = (REFRESH_PRESETS[args.refresh] if args.refresh in REFRESH_PRESETS
               else tuple(int(r) for r in args.refresh.split(",")))
    options = {"refresh_intervals": list(refresh), "gpu_cache_tokens": args.gpu_cache_tokens,
               **json.loads(args.options)}
    args.config = IHipConfig.from_options(options)
    args.refresh = args.config.refresh_intervals
    args.storage_dtype = torch.float8_e4m3fn if args.fp8 else None
    args.sections = [s for s in args.sections.split(",") if s]
    unknown = set(args.sections) - set(SECTIONS)
    if unknown:
        p.error(f"unknown sections {sorted(unknown)}; allowed: {', '.join(SECTIONS)}")
    return args


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(args.layers, device, dtype, args.tiny)
    ours = torch.compile(model, backend=args.backend, options=args.config.as_dict())
    # A copy, so that the dense model's compiled frames never mix with ours.
    args.dense_compiled = torch.compile(copy.deepcopy(model)) if args.dense_inductor else None
    result = {"command": "python -m ihip_compile.bench e2e", "argv": argv,
              "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "torch": torch.__version__, "layers": args.layers, "dtype": str(dtype),
              "config": args.config.as_dict(), "fp8_storage": args.fp8}
    def save_partial(rows):
        result["decode"] = rows
        _write(args.out, result)

    sections = {"decode": lambda: decode_section(args, model, ours, device, dtype, save_partial),
                "ttft": lambda: ttft_section(args, model, ours, device, dtype),
                "capacity": lambda: capacity_section(args, model, device, dtype),
                "passkey": lambda: passkey_section(args, device, dtype)}
    failed = False
    for name in args.sections:
        t0 = time.perf_counter()
        try:
            result[name] = sections[name]()
        except Exception as e:
            result[name] = {"error": _error(e)}
            failed = True
        result[f"{name}_wall_s"] = time.perf_counter() - t0
        _write(args.out, result)
    failed = failed or any(_failed(r) for r in result.get("decode", []) if isinstance(r, dict))
    return 1 if failed else 0


def _failed(row: dict) -> bool:
    """Whether a decode row records a failure. A GPU-resident cache that does not fit in GPU
    memory is a result (the context is beyond what it can run), not a failure; ours never
    may fail."""
    if "ours_error" in row:
        return True
    return any(not row[key].startswith(GPU_OOM)
               for key in ("ours_gpu_kv_error", "dense_error", "ours_static_kv_error",
                           "dense_static_kv_error") if key in row)


def _write(out_dir: str, result: dict) -> None:
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "e2e.json"), "w") as f:
        json.dump(result, f, indent=2, default=str)
    with open(os.path.join(out_dir, "e2e.md"), "w") as f:
        f.write(markdown(result))


def markdown(result: dict) -> str:
    from tabulate import tabulate

    lines = [f"# End-to-end ({result['device']}, {result['layers']} layers, {result['dtype']})",
             "", f"`{result['command']} {' '.join(result['argv'])}`", ""]
    rows = []
    for r in result.get("decode", []) if isinstance(result.get("decode"), list) else []:
        ours, dense = r.get("ours", {}), r.get("dense", {})
        hit = r.get("hit_ratio", {})
        between = r.get("between_refreshes", {})
        error = next((r[k] for k in r if k.endswith("_error")), "")
        rows.append([r["context"], ours.get("tokens_per_s"),
                     r.get("ours_gpu_kv", {}).get("tokens_per_s"),
                     r.get("ours_static_kv", {}).get("tokens_per_s"), dense.get("tokens_per_s"),
                     r.get("dense_static_kv", {}).get("tokens_per_s"), r.get("speedup"),
                     r.get("speedup_gpu_kv"), r.get("speedup_static_kv"), hit.get("attention"),
                     hit.get("pruning"), between.get("attention_hit_ratio"), error])
    if rows:
        lines += ["## Decode", "", tabulate(rows, headers=[
            "context", "ours tok/s (KV in host memory)", "ours tok/s (KV on the GPU)",
            "ours tok/s (static cache on the GPU)", "dense tok/s", "dense tok/s (static cache)",
            "speedup", "speedup, KV on the GPU", "speedup, static cache", "hit attention",
            "hit pruning", "hit attention between refreshes", "error"], tablefmt="github",
            floatfmt=".3g"), ""]
    for name in ("ttft", "capacity", "passkey"):
        if name in result:
            lines += [f"## {name}", "", "```json", json.dumps(result[name], indent=2,
                                                             default=str), "```", ""]
    return "\n".join(lines)
