"""Stage 0 of a decode refresh by launch shape, at several context lengths; hand-off costs too.

    python scripts/stage0_decode_launch.py [--out FILE]  (a CUDA GPU; prints one JSON line)

Llama-3.1-8B layer shape (32 query heads, 8 KV heads, d 128, bf16), one decode query at the last
of S_K random keys, relative pruning RoPE rotated in the kernel, 256-key chunks over every
selectable key and the decode floor's 32 first-step parts (what a refresh from stage 0 runs).
Each launch shape is (chunks per program, first-step parts gathered per load, warps); the
scores must equal those of the launch ``score_chunks`` picks (``auto``, timed too). Then the
stage hand-off (top-k of the chunk scores, position sort, split) for the stage-0 row at each
length and the later stages' rows.
ms per call replayed from a CUDA graph with an L2 flush between calls.
"""

from __future__ import annotations

import argparse

import torch

from ihip_compile.bench import print_and_save, start_gpu_script
from ihip_compile.bench.attention import HEAD_DIM, HEADS, KV_HEADS, _rope_args, time_graphed
from ihip_compile.kernels.prune_stage import FEW_CHUNK_LAUNCH, score_chunks
from ihip_compile.kernels.prune_stage_ref import PRUNE_ROPE_RELATIVE
from ihip_compile.kernels.stage_handoff import stage_handoff
from ihip_compile.kernels.stage_handoff_ref import stage_handoff_ref

CONTEXTS = (1 << 17, 1 << 20, 1 << 21, 1 << 22)
SINKS, WINDOW, CHUNK, PARTS = 256, 1024, 256, 32
LAUNCHES = ((16, 4, 4), (16, 2, 2), (8, 4, 2), (8, 2, 2), (8, 8, 4), (4, 16, 4), (4, 8, 2))
HANDOFFS = ((256, 32, 128), (32, 8, 256), (8, 8, 256))  # chunk, next chunk, chunks kept


def stage0_row(s_k: int, flush) -> dict:
    k = torch.randn(1, KV_HEADS, s_k, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    q = torch.randn(1, HEADS, 1, 1, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    pos = torch.full((1, 1), s_k - 1, device="cuda", dtype=torch.int32)
    key_hi = pos + 1 - WINDOW
    starts = torch.arange(0, s_k, CHUNK, device="cuda", dtype=torch.int32).view(1, 1, -1)
    kw = dict(key_lo=SINKS, chunk_size=CHUNK, rope_mode=PRUNE_ROPE_RELATIVE,
              window_tokens=WINDOW, first_probes=PARTS, **_rope_args("cuda"))
    reference = score_chunks(q, k, starts, key_hi, pos, **kw)
    auto = lambda: score_chunks(q, k, starts, key_hi, pos, **kw)  # noqa: E731
    row = {"auto": {"shape": FEW_CHUNK_LAUNCH,
                    "ms": round(time_graphed(auto, 20, flush), 4)}}
    for tile, group, warps in LAUNCHES:
        def run(tile=tile, group=group, warps=warps):
            return score_chunks(q, k, starts, key_hi, pos, chunk_tile=tile, first_group=group,
                                num_warps=warps, **kw)
        try:
            same = torch.equal(run(), reference)
            row[f"tile{tile}_group{group}_warps{warps}"] = {
                "ms": round(time_graphed(run, 20, flush), 4), "same_scores": same}
        except Exception as error:  # a shape past the shared memory: record why, go on
            row[f"tile{tile}_group{group}_warps{warps}"] = {"error": repr(error)[:200]}
    row["handoff_stage0"] = handoff_row(reference, starts, *HANDOFFS[0], flush)
    return row


def handoff_row(scores, starts, chunk, next_chunk, keep, flush) -> dict:
    div = chunk if chunk == next_chunk else 1
    def run():
        return stage_handoff(scores, starts, keep, chunk, next_chunk, block_div=div)
    ref = stage_handoff_ref(scores, starts, keep, chunk, next_chunk, block_div=div)
    got = run()
    same = torch.equal(got[0], ref[0]) and torch.equal(got[1], ref[1])
    return {"ms": round(time_graphed(run, 20, flush), 4), "same_as_reference": same}


def later_handoffs(flush) -> dict:
    rows = {}
    for chunk, next_chunk, keep in HANDOFFS[1:]:
        scores = torch.randn(1, 1, 1024, device="cuda")
        starts = (torch.arange(1024, device="cuda", dtype=torch.int32) * chunk).view(1, 1, -1)
        rows[f"{chunk}to{next_chunk}"] = handoff_row(scores, starts, chunk, next_chunk, keep,
                                                     flush)
    return rows


def main() -> None:
    args, flush = start_gpu_script(argparse.ArgumentParser())
    result = {"device": torch.cuda.get_device_name(), "handoff_later": later_handoffs(flush)}
    for s_k in CONTEXTS:
        result[f"stage0_{s_k}"] = stage0_row(s_k, flush)
        print(s_k, result[f"stage0_{s_k}"], flush=True)
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
