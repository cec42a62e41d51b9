"""Attention benchmark: InfiniteHiP sparse attention vs dense SDPA (``enable_gqa``) on one layer.

    python -m ihip_compile.bench attention [--contexts 131072,...] [--out reports/bench]

Shape: one layer of Llama-3.1-8B (32 query heads, 8 KV heads, head dim 128, bf16), batch 1, the
paper's default selection (sinks 256, window 1024, 2048 selected keys, stages 256/32k, 32/8k,
8/2k; ``--first-probes`` parts in each chunk's first probing step), RoPE remapping on
(rotate_half, theta 500000), random K/V of the largest context, sliced.
Same process, same inputs, for each context:
  decode   one query token. Steps of four kinds are timed, each captured in a CUDA graph with an
           L2 flush between steps (the flush's own time subtracted, so a layer's K/V never sits in
           L2 from the previous step): the whole chain (stages 0-2, positioning of the selection,
           attention), from stage 1, from stage 2, and the all-cached step (attention only). A
           refresh preset r0/r1/r2 recomputes stage i (and all later ones) every r_i steps; its
           average is the mean over one whole cycle. The attention is the op's (``positioned``:
           kernels/positioned_kv_ref.py); ``gathered_*`` times the same steps with the kernel that
           gathers and rotates the selected keys at every step (kernels/sparse_decode.py).
           Dense: SDPA(enable_gqa=True), same graph-and-flush timing.
  prefill  a 32k-token chunk of queries at the end of the context: selection + block-sparse
           attention, vs dense SDPA over all keys without a mask (flash; the causal triangle of
           the chunk's own keys is under 3% of the work at 1M, so this is a lower bound on dense).
           ``--first-stage-blocks`` neighbouring query blocks share the first pruning stage.
           At a quality context, also needles sought by one query block of the chunk (by all its
           queries, or by 4 of them) and how often that block's list finds them.
  quality  for the decode query: share of the exact attention mass (per head, mean) that the
           attended keys (sinks + selected + window) capture, on random data and with planted
           needles (a bump a few dozen keys wide, and an isolated 8-key run, in every KV head),
           and how often the needle's block is selected (counted per block list and trial).
``--selection-scope`` (``layer``, the default, or ``kv_head``): one block selection per layer or
one per KV head; the kernels run as the op runs them (``kernels/selection_scope.py``).
Writes ``attention.json``, ``attention.md`` and, when matplotlib is installed, ``attention.png``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time

import torch
import torch.nn.functional as F

from ihip_compile.bench import l2_flush_buffer
from ihip_compile.config import IHipConfig
from ihip_compile.kernels.block_selection import select_blocks
from ihip_compile.kernels.selection_scope import fold_heads, fold_positions, selection_groups
from ihip_compile.kernels.prune_stage_ref import DEFAULT_FIRST_PROBES
from ihip_compile.kernels.sparse_attention import sparse_attention

HEADS, KV_HEADS, HEAD_DIM = 32, 8, 128
CONTEXTS = (1 << 17, 1 << 18, 1 << 19, 1 << 20, 1 << 21, 1 << 22)
PRESETS = {"32/16/8": (32, 16, 8), "96/24/8": (96, 24, 8)}
SELECTION = dict(block_size_q=64, sink_tokens=256, window_tokens=1024, selected_tokens=2048,
                 stage_chunks=(256, 32, 8), stage_keeps=(32768, 8192, 2048))
ROPE_THETA = 500000.0
SELECTION_SCOPE = {"scope": "layer"}  # set by --selection-scope
PREFILL_CHUNK = 32768


def _sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def time_eager(fn, reps: int) -> float:
    """Mean milliseconds per call (one warm-up call first)."""
    fn()
    _sync()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    _sync()
    return (time.perf_counter() - start) * 1e3 / reps


def time_graphed(fn, reps: int, flush: torch.Tensor | None) -> float:
    """Milliseconds per call of ``fn`` replayed from a CUDA graph, L2 flushed between calls."""
    def body(with_fn):
        for _ in range(reps):
            if flush is not None:
                flush.zero_()
            if with_fn:
                fn()

    def graphed_ms(with_fn):
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            body(with_fn)  # warm-up outside the capture (compiles kernels)
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            body(with_fn)
        graph.replay()
        _sync()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(3):
            graph.replay()
        end.record()
        _sync()
        return start.elapsed_time(end) / (3 * reps)

    return max(graphed_ms(True) - (graphed_ms(False) if flush is not None else 0.0), 0.0)


def cycle_counts(refresh: tuple[int, ...]) -> list[int]:
    """Steps of one refresh cycle by first stage recomputed (index len(refresh) = all cached)."""
    cycle = math.lcm(*refresh)
    counts = [0] * (len(refresh) + 1)
    for step in range(cycle):
        due = [i for i, r in enumerate(refresh) if step % r == 0]
        counts[due[0] if due else len(refresh)] += 1
    return counts


def _rope_args(device):
    inv_freq = 1.0 / ROPE_THETA ** (torch.arange(0, HEAD_DIM, 2, device=device).float() / HEAD_DIM)
    return dict(inv_freq=inv_freq, rotary_dim=HEAD_DIM, rope_layout=1)


def _groups() -> int:
    return selection_groups(KV_HEADS, SELECTION_SCOPE["scope"] == "kv_head")


def _as_selected(q, k, v, pos):
    """The op's layout for the kernels: one sequence per selection group."""
    g = _groups()
    return fold_heads(q, g), fold_heads(k, g), fold_heads(v, g), fold_positions(pos, g)


def _decode_attention(use_triton):
    """The op's decode attention under renumbering (``positioned``: position a selection when it
    is made, then attend it) and the kernel that gathers and rotates every step (``gathered``)."""
    if use_triton:
        from ihip_compile.kernels.positioned_decode import positioned_decode
        from ihip_compile.kernels.positioned_kv import position_selected_kv
        from ihip_compile.kernels.sparse_decode import sparse_decode
        return position_selected_kv, positioned_decode, sparse_decode
    from ihip_compile.kernels.positioned_decode_ref import positioned_decode_ref
    from ihip_compile.kernels.positioned_kv_ref import position_selected_kv_ref
    from ihip_compile.kernels.sparse_decode_ref import sparse_decode_ref
    return position_selected_kv_ref, positioned_decode_ref, sparse_decode_ref


def _preset_averages(dense, steps):
    """Per refresh preset: mean step time over one cycle and the ratio to dense."""
    kinds = ("from_stage_0", "from_stage_1", "from_stage_2", "cached")
    out = {}
    for name, refresh in PRESETS.items():
        counts = cycle_counts(refresh)
        avg = sum(c * steps[kd] for c, kd in zip(counts, kinds)) / sum(counts)
        out[name] = {"avg_ms": avg, "speedup": dense / avg, "cycle_counts": counts}
    return out


def bench_decode(q, k, v, rope, graphs, flush, reps):
    s_k = k.shape[2]
    dense_inputs = (q, k, v)
    pos = torch.full((1, 1), s_k - 1, device=q.device, dtype=torch.int32)
    q, k, v, pos = _as_selected(q, k, v, pos)
    use_triton = q.is_cuda
    kw = dict(**SELECTION, rope_mode=1, use_triton=use_triton, **rope)
    blocks, stages = select_blocks(q, k, pos, return_stages=True, **kw)
    window = dict(sink_tokens=SELECTION["sink_tokens"], window_tokens=SELECTION["window_tokens"])
    position, attend_positioned, attend_gathered = _decode_attention(use_triton)
    positioned = position(k, v, blocks, pos, **window, **rope)

    def step(start, gathered):
        def run():
            chosen, placed = blocks, positioned
            if start < 3:
                cands = None if start == 0 else stages[start - 1]
                chosen = select_blocks(q, k, pos, start_stage=start, candidates=cands, **kw)
                placed = None if gathered else position(k, v, chosen, pos, **window, **rope)
            if gathered:
                return attend_gathered(q, k, v, chosen, pos, scale=HEAD_DIM ** -0.5, remap=True,
                                       **window, **rope)
            return attend_positioned(q, k, v, placed, pos, scale=HEAD_DIM ** -0.5, **window,
                                     **rope)
        return run

    timer = (lambda fn: time_graphed(fn, reps, flush)) if graphs else \
        (lambda fn: time_eager(fn, reps))
    kinds = ("from_stage_0", "from_stage_1", "from_stage_2", "cached")
    variants = {name: timer(step(i, False)) for i, name in enumerate(kinds)}
    gathered = {name: timer(step(i, True)) for i, name in enumerate(kinds)}
    variants["eager_from_stage_0"] = time_eager(step(0, False), reps)
    variants["eager_cached"] = time_eager(step(3, False), reps)
    dense = timer(lambda: F.scaled_dot_product_attention(*dense_inputs, enable_gqa=True))
    return {"dense_ms": dense, "steps_ms": variants, "presets": _preset_averages(dense, variants),
            "cached_speedup": dense / variants["cached"], "gathered_steps_ms": gathered,
            "gathered_presets": _preset_averages(dense, gathered)}


def bench_prefill(q_chunk, k, v, rope, reps):
    s_k, chunk = k.shape[2], q_chunk.shape[2]
    pos = torch.arange(s_k - chunk, s_k, device=k.device)
    use_triton = k.is_cuda
    args = dict(SELECTION, scale=HEAD_DIM ** -0.5, remap=True, pruning_rope=0,
                use_triton=use_triton, per_kv_head=_groups() > 1, **rope)
    ours = time_eager(lambda: sparse_attention(q_chunk, k, v, pos, **args), reps)
    dense_inputs = (q_chunk, k, v)
    q_chunk, k, v, pos = _as_selected(q_chunk, k, v, pos[None])
    sel_kw = dict(**SELECTION, rope_mode=1, use_triton=use_triton, **rope)
    blocks, stages = select_blocks(q_chunk, k, pos, return_stages=True, **sel_kw)
    parts = {"stage_0_to_2": time_eager(lambda: select_blocks(q_chunk, k, pos, **sel_kw), reps),
             "stage_1_to_2": time_eager(lambda: select_blocks(
                 q_chunk, k, pos, start_stage=1, candidates=stages[0], **sel_kw), reps),
             "stage_2": time_eager(lambda: select_blocks(
                 q_chunk, k, pos, start_stage=2, candidates=stages[1], **sel_kw), reps)}
    if use_triton:
        from ihip_compile.kernels.block_sparse_attention import block_sparse_attention as attend
    else:
        from ihip_compile.kernels.block_sparse_attention_ref import (
            block_sparse_attention_ref as attend)
    attn_kw = dict(scale=HEAD_DIM ** -0.5, block_size_q=64, sink_tokens=256, window_tokens=1024,
                   remap=True, **rope)
    parts["attention"] = time_eager(lambda: attend(q_chunk, k, v, pos, blocks, **attn_kw), reps)
    try:
        dense = time_eager(lambda: F.scaled_dot_product_attention(*dense_inputs, enable_gqa=True),
                           max(1, reps // 2))
    except RuntimeError as e:  # no fused kernel for the shape: say so rather than guess
        dense, parts["dense_error"] = float("nan"), str(e)[:200]
    return {"ours_ms": ours, "dense_ms": dense, "speedup": dense / ours, "parts_ms": parts}


def _mass_captured(q, k, blocks, s_k):
    """Mean over heads of the exact softmax mass on sinks + selected blocks + window.

    q [1, H, 1, D], k [1, H_KV, S_K, D]; blocks [G, 1, TOPK], one list per selection group."""
    group = HEADS // KV_HEADS
    masses = []
    for g in range(KV_HEADS):
        keys = torch.zeros(s_k, dtype=torch.bool, device=k.device)
        keys[: SELECTION["sink_tokens"]] = True
        keys[max(s_k - SELECTION["window_tokens"], 0):] = True
        row = blocks[g * blocks.shape[0] // KV_HEADS, 0]
        chosen = row[row >= 0].long()
        idx = (chosen[:, None] * 8 + torch.arange(8, device=k.device)).flatten()
        keys[idx.clamp(max=s_k - 1)] = True
        scores = (q[0, g * group:(g + 1) * group, 0].float() @ k[0, g].float().T) * HEAD_DIM ** -0.5
        probs = torch.softmax(scores, -1)
        masses.append(probs[:, keys].sum(-1))
    return torch.cat(masses).mean().item()


def bench_quality(q, k, rope, trials, seed):
    s_k = k.shape[2]
    pos = torch.full((1, 1), s_k - 1, device=k.device, dtype=torch.int32)
    kw = dict(**SELECTION, rope_mode=0, use_triton=k.is_cuda)  # random data carries no RoPE
    def select(keys):
        g = _groups()
        return select_blocks(fold_heads(q, g), fold_heads(keys, g), fold_positions(pos, g), **kw)

    out = {"random_mass": _mass_captured(q, k, select(k), s_k)}
    gen = torch.Generator().manual_seed(seed)
    group = HEADS // KV_HEADS
    directions = torch.stack([q[0, g * group:(g + 1) * group, 0].float().mean(0)
                              for g in range(KV_HEADS)])
    directions = directions / directions.norm(dim=-1, keepdim=True)  # [H_KV, D]
    lo, hi = SELECTION["sink_tokens"] + 64, s_k - SELECTION["window_tokens"] - 64
    for kind, width in (("needle_wide", 24.0), ("needle_8_keys", 0.0)):
        found, masses = 0, []
        for _ in range(trials):
            center = int(torch.randint(lo, hi, (1,), generator=gen))
            span = slice(center - 64, center + 64)
            saved = k[:, :, span].clone()
            j = torch.arange(span.start, span.stop, device=k.device, dtype=torch.float32)
            if width:
                bump = torch.exp(-(((j - center) / width) ** 2))
            else:
                start = center - center % 8
                bump = ((j >= start) & (j < start + 8)).float()
            k[0, :, span] += (20.0 * bump[None, :, None] * directions[:, None, :]).to(k.dtype)
            blocks = select(k)  # the needle is in every KV head: count each list's finding
            found += int((blocks[:, 0] == center // 8).any(-1).sum())
            masses.append(_mass_captured(q, k, blocks, s_k))
            k[:, :, span] = saved
        out[kind] = {"found": found, "trials": trials * _groups(),
                     "mean_mass": sum(masses) / len(masses)}
    return out


def bench_prefill_quality(q_chunk, k, trials, seed):
    """Needles sought by one query block of a prefill chunk: that block's queries (all 64, or
    only 4 consecutive ones) lean towards a direction of their own per KV head, and a bump of
    keys a few dozen wide towards it sits at a random place before the chunk's window. Found:
    the block's list holds the bump's peak (counted per block list and trial)."""
    s_k, chunk = k.shape[2], q_chunk.shape[2]
    pos = torch.arange(s_k - chunk, s_k, device=k.device)[None]
    kw = dict(**SELECTION, rope_mode=0, use_triton=k.is_cuda)  # random data carries no RoPE
    block_q, group = SELECTION["block_size_q"], HEADS // KV_HEADS
    gen = torch.Generator().manual_seed(seed)
    lo = SELECTION["sink_tokens"] + 64
    hi = s_k - chunk - SELECTION["window_tokens"] - 64
    out = {}
    for kind, rows in (("block_needle", block_q), ("four_query_needle", 4)):
        found = 0
        for _ in range(trials):
            block = int(torch.randint(0, -(-chunk // block_q), (1,), generator=gen))
            first = min(block * block_q + int(torch.randint(0, block_q - rows + 1, (1,),
                                                            generator=gen)), chunk - rows)
            center = int(torch.randint(lo, hi, (1,), generator=gen))
            toward = torch.randn(KV_HEADS, HEAD_DIM, generator=gen)
            toward = (toward / toward.norm(dim=-1, keepdim=True)).to(k.device)
            span, rows_span = slice(center - 64, center + 64), slice(first, first + rows)
            saved_k, saved_q = k[:, :, span].clone(), q_chunk[:, :, rows_span].clone()
            j = torch.arange(span.start, span.stop, device=k.device, dtype=torch.float32)
            bump = torch.exp(-(((j - center) / 24.0) ** 2))
            lean = 4.0 * toward.repeat_interleave(group, 0)[:, None, :]
            q_chunk[0, :, rows_span] += lean.to(q_chunk.dtype)
            k[0, :, span] += (20.0 * bump[None, :, None] * toward[:, None, :]).to(k.dtype)
            g = _groups()
            blocks = select_blocks(fold_heads(q_chunk, g), fold_heads(k, g),
                                   fold_positions(pos, g), **kw)
            found += int((blocks[:, block] == center // 8).any(-1).sum())
            k[:, :, span], q_chunk[:, :, rows_span] = saved_k, saved_q
        out[kind] = {"found": found, "trials": trials * _groups()}
    return out


def _markdown(results) -> str:
    lines = ["| context | dense decode ms | cached step ms | 32/16/8 avg ms (x) | 96/24/8 avg ms "
             "(x) | dense prefill 32k ms | ours prefill ms (x) |", "|---" * 7 + "|"]
    for r in results["contexts"]:
        d, p = r["decode"], r.get("prefill")
        pre = f"{p['dense_ms']:.1f} | {p['ours_ms']:.1f} ({p['speedup']:.1f}x)" if p else "- | -"
        lines.append(
            f"| {r['context']} | {d['dense_ms']:.3f} | {d['steps_ms']['cached']:.4f} | "
            f"{d['presets']['32/16/8']['avg_ms']:.4f} ({d['presets']['32/16/8']['speedup']:.1f}x)"
            f" | {d['presets']['96/24/8']['avg_ms']:.4f} "
            f"({d['presets']['96/24/8']['speedup']:.1f}x) | {pre} |")
    lines += ["", "Decode steps (ms): " + "; ".join(
        f"{r['context']}: " + ", ".join(f"{k} {v:.4f}" for k, v in r["decode"]["steps_ms"].items())
        for r in results["contexts"])]
    for r in results["contexts"]:
        if "prefill" in r:
            parts = ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}"
                              for k, v in r["prefill"]["parts_ms"].items())
            lines.append(f"\nPrefill parts at {r['context']} (ms): {parts}")
            if "needles" in r["prefill"]:
                lines.append(f"\nPrefill needles at {r['context']}: "
                             f"{json.dumps(r['prefill']['needles'])}")
        if "quality" in r:
            lines.append(f"\nQuality at {r['context']}: {json.dumps(r['quality'])}")
    return "\n".join(lines) + "\n"


def _plot(results, path) -> str:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib not installed: no plot"
    ctx = [r["context"] for r in results["contexts"]]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.loglog(ctx, [r["decode"]["dense_ms"] for r in results["contexts"]], "o-", label="dense")
    for name in PRESETS:
        ax.loglog(ctx, [r["decode"]["presets"][name]["avg_ms"] for r in results["contexts"]],
                  "s-", label=f"ours {name}")
    ax.set_xlabel("context (keys)"), ax.set_ylabel("decode ms / layer"), ax.legend()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    return path


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="python -m ihip_compile.bench attention")
    parser.add_argument("--contexts", default=",".join(map(str, CONTEXTS)))
    parser.add_argument("--prefill-contexts", default="131072,1048576,4194304")
    parser.add_argument("--quality-contexts", default="131072,1048576")
    parser.add_argument("--trials", type=int, default=10)
    parser.add_argument("--prefill-chunk", type=int, default=PREFILL_CHUNK)
    parser.add_argument("--first-probes", type=int, default=DEFAULT_FIRST_PROBES,
                        help="parts of each chunk's first probing step (2: plain halving)")
    parser.add_argument("--exact-probe-blocks", type=int, default=0,
                        help="selections of at most this many query blocks score every key of "
                             "a chunk (exact chunk maxima; 1: every decode step)")
    parser.add_argument("--first-stage-blocks", type=int,
                        default=IHipConfig().first_stage_query_blocks,
                        help="neighbouring query blocks of a prefill chunk that share the first "
                             "pruning stage")
    parser.add_argument("--selection-scope", choices=["layer", "kv_head"], default="layer")
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--out", default="reports/bench")
    args = parser.parse_args(argv)
    contexts = [int(c) for c in args.contexts.split(",")]
    SELECTION["first_probes"] = args.first_probes
    SELECTION["exact_probe_blocks"] = args.exact_probe_blocks
    SELECTION["first_stage_blocks"] = args.first_stage_blocks
    SELECTION_SCOPE["scope"] = args.selection_scope
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    k_all = torch.randn(1, KV_HEADS, max(contexts), HEAD_DIM, device=device, dtype=dtype)
    v_all = torch.randn_like(k_all)
    q = torch.randn(1, HEADS, 1, HEAD_DIM, device=device, dtype=dtype)
    rope = _rope_args(device)
    graphs = device == "cuda"
    flush = l2_flush_buffer(device) if graphs else None
    results = {"device": torch.cuda.get_device_name() if graphs else "cpu",
               "torch": torch.__version__, "shape": [HEADS, KV_HEADS, HEAD_DIM, str(dtype)],
               "selection": {k: list(v) if isinstance(v, tuple) else v
                             for k, v in SELECTION.items()},
               "selection_scope": args.selection_scope, "contexts": []}
    for s_k in contexts:
        k, v = k_all[:, :, :s_k], v_all[:, :, :s_k]
        row = {"context": s_k, "decode": bench_decode(q, k, v, rope, graphs, flush, args.reps)}
        if str(s_k) in args.prefill_contexts.split(","):
            chunk = torch.randn(1, HEADS, min(args.prefill_chunk, s_k), HEAD_DIM, device=device,
                                dtype=dtype)
            row["prefill"] = bench_prefill(chunk, k, v, rope, reps=2)
            if str(s_k) in args.quality_contexts.split(","):
                row["prefill"]["needles"] = bench_prefill_quality(chunk, k, args.trials, s_k)
            del chunk
        if str(s_k) in args.quality_contexts.split(","):
            row["quality"] = bench_quality(q, k, rope, args.trials, seed=s_k)
        results["contexts"].append(row)
        print(json.dumps(row), flush=True)
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, "attention.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "attention.md"), "w") as f:
        f.write(_markdown(results))
    print(_plot(results, os.path.join(args.out, "attention.png")))
    print(_markdown(results))
    return 0
