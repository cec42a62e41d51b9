"""A prefill chunk's time and needle recall for each value of one selection setting.

    python scripts/prefill_selection_ab.py --setting first_stage_blocks --values 1,2,4,8
    python scripts/prefill_selection_ab.py --setting fp8_scoring --values false,auto
        [--contexts 1048576] [--trials 20] [--out FILE]

One layer of Llama-3.1-8B's shape (the attention benchmark's inputs, ``bench.attention``): a
32k-token chunk of random queries at the end of S_K random keys. For each value of the
``select_blocks`` keyword ``--setting`` (``auto`` stands for None), in the same process on the
same inputs: the chunk's sparse attention, its parts and dense SDPA (``bench_prefill``); needles
sought by one query block, by all its queries or by 4 of them (``bench_prefill_quality``); and
the share of the first value's selection that each value's selection also holds (on the random
data, no needle).
"""

from __future__ import annotations

import argparse
import json

import torch

from ihip_compile.bench import print_and_save, start_gpu_script
from ihip_compile.bench.attention import (
    HEAD_DIM, HEADS, KV_HEADS, PREFILL_CHUNK, SELECTION, _rope_args, bench_prefill,
    bench_prefill_quality,
)
from ihip_compile.kernels.block_selection import select_blocks

_WORDS = {"auto": None, "true": True, "false": False}


def setting_value(text: str):
    """``auto``/``true``/``false`` or a JSON number."""
    return _WORDS[text] if text in _WORDS else json.loads(text)


def kept_share(chosen: torch.Tensor, baseline: torch.Tensor) -> float:
    """Share of the baseline lists' blocks that the same query block's list also holds."""
    hits = total = 0
    for row, base in zip(chosen.flatten(0, 1).tolist(), baseline.flatten(0, 1).tolist()):
        wanted = {x for x in base if x >= 0}
        hits += len(wanted & set(row))
        total += len(wanted)
    return hits / max(total, 1)


def context_row(s_k: int, setting: str, values, trials: int) -> dict:
    k = torch.randn(1, KV_HEADS, s_k, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    chunk = torch.randn(1, HEADS, PREFILL_CHUNK, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    rope = _rope_args("cuda")
    pos = torch.arange(s_k - PREFILL_CHUNK, s_k, device="cuda")[None]
    row, baseline = {}, None
    for text in values:
        SELECTION[setting] = setting_value(text)
        chosen = select_blocks(chunk, k, pos, rope_mode=1, use_triton=True, **SELECTION, **rope)
        baseline = chosen if baseline is None else baseline
        name = f"{setting}_{text}"
        row[name] = {
            "prefill": bench_prefill(chunk, k, v, rope, reps=3),
            "needles": bench_prefill_quality(chunk, k, trials, seed=s_k),
            "kept_of_first": kept_share(chosen, baseline),
        }
        print({name: row[name]["prefill"]["ours_ms"]}, flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(prog="scripts/prefill_selection_ab.py")
    parser.add_argument("--setting", required=True,
                        help="a select_blocks keyword in the benchmark's SELECTION")
    parser.add_argument("--values", required=True, help="comma-separated; auto means None")
    parser.add_argument("--contexts", default="1048576")
    parser.add_argument("--trials", type=int, default=20)
    args, _ = start_gpu_script(parser)
    values = args.values.split(",")
    result = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "chunk": PREFILL_CHUNK, "setting": args.setting, "contexts": {}}
    for s_k in (int(c) for c in args.contexts.split(",")):
        result["contexts"][s_k] = context_row(s_k, args.setting, values, args.trials)
    print_and_save(result, args.out)


if __name__ == "__main__":
    main()
