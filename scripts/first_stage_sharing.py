"""A prefill chunk's time and needle recall by how many query blocks share the first stage.

    python scripts/first_stage_sharing.py [--contexts 1048576] [--shares 1,2,4,8] [--out FILE]

One layer of Llama-3.1-8B's shape (the attention benchmark's inputs, ``bench.attention``): a
32k-token chunk of random queries at the end of S_K random keys. For each number of query blocks
sharing stage 0, in the same process on the same inputs: the chunk's sparse attention, its parts
and dense SDPA (``bench_prefill``); needles sought by one query block, by all its queries or by
4 of them (``bench_prefill_quality``); and the share of the unshared selection's blocks that the
shared one also selects (on the random data, no needle).
"""

from __future__ import annotations

import argparse

import torch

from ihip_compile.bench import print_and_save, start_gpu_script
from ihip_compile.bench.attention import (
    HEAD_DIM, HEADS, KV_HEADS, PREFILL_CHUNK, SELECTION, _rope_args, bench_prefill,
    bench_prefill_quality,
)
from ihip_compile.kernels.block_selection import select_blocks


def kept_share(chosen: torch.Tensor, unshared: torch.Tensor) -> float:
    """Share of the unshared lists' blocks that the same query block's list also holds."""
    hits = total = 0
    for row, base in zip(chosen.flatten(0, 1).tolist(), unshared.flatten(0, 1).tolist()):
        wanted = {x for x in base if x >= 0}
        hits += len(wanted & set(row))
        total += len(wanted)
    return hits / max(total, 1)


def context_row(s_k: int, shares, trials: int) -> dict:
    k = torch.randn(1, KV_HEADS, s_k, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    chunk = torch.randn(1, HEADS, PREFILL_CHUNK, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    rope = _rope_args("cuda")
    pos = torch.arange(s_k - PREFILL_CHUNK, s_k, device="cuda")[None]
    row, unshared = {}, None
    for share in shares:
        SELECTION["first_stage_blocks"] = share
        chosen = select_blocks(chunk, k, pos, rope_mode=1, use_triton=True, **SELECTION, **rope)
        unshared = chosen if unshared is None else unshared
        row[f"share_{share}"] = {
            "prefill": bench_prefill(chunk, k, v, rope, reps=3),
            "needles": bench_prefill_quality(chunk, k, trials, seed=s_k),
            "kept_of_unshared": kept_share(chosen, unshared),
        }
        print({share: row[f"share_{share}"]["prefill"]["ours_ms"]}, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/first_stage_sharing.py")
    parser.add_argument("--contexts", default="1048576")
    parser.add_argument("--shares", default="1,2,4,8")
    parser.add_argument("--trials", type=int, default=20)
    args, _ = start_gpu_script(parser)
    shares = [int(s) for s in args.shares.split(",")]
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "chunk": PREFILL_CHUNK, "contexts": {}}
    for s_k in (int(c) for c in args.contexts.split(",")):
        result["contexts"][s_k] = context_row(s_k, shares, args.trials)
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
