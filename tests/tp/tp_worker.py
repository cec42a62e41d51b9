"""One rank of the tensor-parallel check; also the 1-process reference when run without torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp/tp_worker.py \
        --model-dir DIR --out DIR --cases JSON

Loads the saved model with transformers' own tensor parallelism when ``WORLD_SIZE`` > 1
(``DistributedConfig(tp_size=WORLD_SIZE)``: the model's ``tp_plan`` splits attention by heads and
the MLP by columns; transformers starts torch.distributed itself, gloo on CPU, NCCL on CUDA).
Then, for every case, on every rank: greedy tokens and their logits from ``generate``, and every
``ihip::attention`` call recorded by the profiler with its query shape, saved to
``OUT/<case name>/rank<r>.pt``. One launch runs all cases, so process start-up is paid once.

A case is a dict: ``name``; ``attention``: ``"sdpa"`` (the model's own) or ``"op"``
(``torch.ops.ihip.attention`` called directly, see ``op_attention.py``, with ``op_kwargs`` as its
scalars); ``backend``: a ``torch.compile`` backend with ``backend_options`` (none: eager);
``dtype``: a torch dtype name (default ``"float32"``). The
model is compiled in place (``model.compile``), which is what ``generate`` uses.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

OP_EVENT = "ihip::attention"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", required=True, help="JSON list of cases (see above)")
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=6)
    return parser.parse_args(argv)


def load(model_dir: str, world_size: int, dtype: torch.dtype):
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if world_size > 1:
        from transformers.distributed import DistributedConfig

        kwargs["distributed_config"] = DistributedConfig(tp_size=world_size)
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()


def op_calls(prof) -> list[list[int]]:
    """Query shape of every ``ihip::attention`` call seen by the profiler, in call order."""
    return [list(e.input_shapes[0]) for e in prof.events() if e.name == OP_EVENT]


def compiled_graph_summaries() -> list[dict]:
    """What the infinitehip backend did to each graph this process compiled."""
    from ihip_compile.backend import compiled_graphs

    return [
        {
            "rewritten_layers": sorted(r.layer for r in g.context.rewrites),
            "skips": [f"{s.node}: {s.reason}" for s in g.context.skips],
            "removed_nodes": list(g.context.removed_nodes),
        }
        for g in compiled_graphs
    ]


def run_case(args: argparse.Namespace, case: dict, world_size: int, rank: int) -> dict:
    unknown = set(case) - {"name", "attention", "op_kwargs", "backend", "backend_options", "dtype"}
    if unknown:
        raise ValueError(f"unknown case keys {sorted(unknown)}")
    torch._dynamo.reset()  # each case compiles its own model from scratch
    if case.get("backend"):
        from ihip_compile.backend import compiled_graphs

        compiled_graphs.clear()
    model = load(args.model_dir, world_size, getattr(torch, case.get("dtype", "float32")))
    if case.get("attention", "sdpa") == "op":
        import op_attention

        op_attention.install(model, case.get("op_kwargs", {}))
    elif case.get("attention", "sdpa") != "sdpa":
        raise ValueError(f"attention must be 'sdpa' or 'op', got {case['attention']!r}")
    if case.get("backend"):
        model.compile(backend=case["backend"], options=case.get("backend_options"))
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (1, args.prompt_tokens), generator=torch.Generator().manual_seed(1))
    q_weight = model.model.layers[0].self_attn.q_proj.weight
    local_q_rows = q_weight.to_local().shape[0] if hasattr(q_weight, "to_local") else q_weight.shape[0]
    started = time.perf_counter()
    # generate() alone: its prefill and decode graphs are the ones users run; a separate
    # forward() would be one more graph to compile for the same attention sites.
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = model.generate(
            ids, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens, do_sample=False,
            output_logits=True, return_dict_in_generate=True,
        )
    return {
        "rank": rank,
        "world_size": world_size,
        "local_q_rows": local_q_rows,
        "logits": torch.stack(out.logits, dim=1)[0].cpu(),  # [new tokens, vocab]
        "tokens": out.sequences[0, ids.shape[1]:].cpu(),
        "op_calls": op_calls(prof),
        "seconds": time.perf_counter() - started,
        "graphs": compiled_graph_summaries() if case.get("backend") else [],
        "seconds": time.perf_counter() - started,
    }


def main(argv=None) -> None:
    args = parse_args(argv)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    for case in json.loads(args.cases):
        result = run_case(args, case, world_size, rank)
        out = Path(args.out) / case["name"]
        out.mkdir(parents=True, exist_ok=True)
        torch.save(result, out / f"rank{rank}.pt")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main()
