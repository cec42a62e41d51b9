"""One rank of the tensor-parallel check; also the 1-process reference when run without torchrun.

    python -m torch.distributed.run --standalone --nproc-per-node 2 tests/tp/tp_worker.py \
        --models DIR --out DIR --cases JSON

Loads a saved model with transformers' own tensor parallelism when ``WORLD_SIZE`` > 1
(``DistributedConfig(tp_size=WORLD_SIZE, tp_plan=tp_plan_for(...))``: the model's plan splits
attention by heads and the MLP by columns, or replicates attention when its heads do not divide;
transformers starts torch.distributed itself, gloo on CPU, NCCL on CUDA).
Then, for every case, on every rank: greedy tokens and their logits from ``generate``, and every
``ihip::attention`` call recorded by the profiler with its query shape, saved to
``OUT/<case name>/rank<r>.pt``. One launch runs all cases, so process start-up is paid once.

A case is a dict: ``name``; ``model``: a folder under ``--models`` (default ``"llama"``);
``attention``: ``"sdpa"`` (the model's own) or ``"op"``
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

from ihip_compile.tp import local_kv_heads, tp_plan_for  # noqa: E402

OP_EVENT = "ihip::attention"


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", required=True, help="folder of saved models, one per name")
    parser.add_argument("--out", required=True)
    parser.add_argument("--cases", required=True, help="JSON list of cases (see above)")
    parser.add_argument("--prompt-tokens", type=int, default=24)
    parser.add_argument("--new-tokens", type=int, default=6)
    return parser.parse_args(argv)


def load(model_dir: Path, world_size: int, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    kwargs = {"dtype": dtype}
    if world_size > 1:
        from transformers.distributed import DistributedConfig

        plan = tp_plan_for(AutoConfig.from_pretrained(model_dir), world_size)
        kwargs["distributed_config"] = DistributedConfig(tp_size=world_size, tp_plan=plan)
    return AutoModelForCausalLM.from_pretrained(model_dir, **kwargs).eval()


def op_calls(prof) -> list[list[int]]:
    """Query shape of every ``ihip::attention`` call seen by the profiler, in call order."""
    return [list(e.input_shapes[0]) for e in prof.events() if e.name == OP_EVENT]


def _local_rows(weight) -> int:
    return (weight.to_local() if hasattr(weight, "to_local") else weight).shape[0]


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
    unknown = set(case) - {
        "name", "model", "attention", "op_kwargs", "backend", "backend_options", "dtype"}
    if unknown:
        raise ValueError(f"unknown case keys {sorted(unknown)}")
    torch._dynamo.reset()  # each case compiles its own model from scratch
    if case.get("backend"):
        from ihip_compile.backend import compiled_graphs

        compiled_graphs.clear()
    model_dir = Path(args.models) / case.get("model", "llama")
    model = load(model_dir, world_size, getattr(torch, case.get("dtype", "float32")))
    if case.get("attention", "sdpa") == "op":
        import op_attention

        op_attention.install(model, case.get("op_kwargs", {}))
    elif case.get("attention", "sdpa") != "sdpa":
        raise ValueError(f"attention must be 'sdpa' or 'op', got {case['attention']!r}")
    if case.get("backend"):
        model.compile(backend=case["backend"], options=case.get("backend_options"))
    prompt = torch.Generator().manual_seed(1)
    ids = torch.randint(3, model.config.vocab_size, (1, args.prompt_tokens), generator=prompt)
    local_q_rows = _local_rows(model.model.layers[0].self_attn.q_proj.weight)
    started = time.perf_counter()
    # generate() alone: its prefill and decode graphs are the ones users run; a separate
    # forward() would be one more graph to compile for the same attention sites.
    greedy = dict(max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                  do_sample=False, output_logits=True, return_dict_in_generate=True)
    if case.get("backend"):
        # Compile first: AOTAutograd traces the op with fake tensors, and the profiler would
        # count those calls too. The profiled run below then executes compiled code only.
        with torch.no_grad():
            model.generate(ids, **greedy)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        out = model.generate(ids, **greedy)
    return {
        "rank": rank,
        "world_size": world_size,
        "local_q_rows": local_q_rows,
        "local_kv_heads": local_kv_heads(model),
        "local_mlp_rows": _local_rows(model.model.layers[0].mlp.gate_proj.weight),
        "logits": torch.stack(out.logits, dim=1)[0].cpu(),  # [new tokens, vocab]
        "tokens": out.sequences[0, ids.shape[1]:].cpu(),
        "op_calls": op_calls(prof),
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
