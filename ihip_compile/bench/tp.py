"""Tensor-parallel benchmark: our backend under transformers' tensor parallelism, 2 GPUs vs 1.

NOT YET RUN ON GPUs: written and smoke-tested on CPU (gloo, ``--tiny``) while no 2-GPU machine
was available. The commands, on a machine with 2 GPUs (the 1-GPU run uses the first one):

    torchrun --nproc-per-node 2 -m ihip_compile.bench tp --out reports/bench/tp
    python -m ihip_compile.bench tp --out reports/bench/tp
    python -m ihip_compile.bench tp --compare reports/bench/tp     # writes tp.md from both runs

Each run loads every model of ``--models`` with ``from_pretrained``, sharded by
``DistributedConfig(tp_size=WORLD_SIZE, tp_plan=tp_plan_for(config, WORLD_SIZE))`` under torchrun
(NCCL on CUDA, gloo on CPU), compiles it in place with ``backend="infinitehip"`` and measures:
  tokens   greedy tokens (and their logits) of seeded random prompts of ``--token-contexts``
           tokens through ``generate()``: below ``dense_below_tokens`` the op is exact dense
           attention, above it the sparse path;
  decode   per context of ``--contexts``: an ``OffloadedCache`` per rank holding that rank's KV
           heads (``local_kv_heads``) of the same seeded random K/V in every run (each rank the
           slice of heads it owns), then greedy decode steps: ms per token over one whole refresh
           cycle after one cycle of warm-up, the tokens, and the GPU bank hit ratios (``--fp8``
           stores the K/V as float8 in host memory).
Models: ``llama8b`` (Llama-3.1-8B's shapes with ``--layers`` decoder layers, random weights saved
once under ``--model-cache``: speed and memory only), ``smollm2`` (the real weights; its 9 query /
3 KV heads do not divide by 2, so on 2 GPUs its attention is replicated and the MLP sharded),
``tiny`` (CPU smoke). Rank 0 writes ``tp_<N>gpu_<model>.json`` (and the logits) under ``--out``,
so models can be run in separate commands (``--models llama8b``, then ``--models smollm2``).

Expected: tokens equal between 1 and 2 GPUs on the dense path, and on the sparse path with
``--options '{"selection_scope": "kv_head"}'`` (each KV head selects its own blocks, so a rank
holding some KV heads selects as one GPU does), up to bf16 near-ties: the comparison reports the
first divergence and the logits gap. With the default per-layer selection the sparse path may
differ (a rank selects from its own heads' scores; docs/tensor_parallel.md).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist

from ihip_compile.config import IHipConfig
from ihip_compile.tp import local_kv_heads, tensor_parallel_size, tp_plan_for

MODELS = ("llama8b", "smollm2", "tiny")
DEFAULT_CACHE = Path.home() / ".cache" / "infinitehip" / "tp-models"


# --- processes and models ---------------------------------------------------------------------
def world() -> tuple[int, int, int]:
    """(rank, local rank, world size) from torchrun's environment; (0, 0, 1) without it."""
    env = os.environ
    return int(env.get("RANK", 0)), int(env.get("LOCAL_RANK", 0)), int(env.get("WORLD_SIZE", 1))


def start_processes(device_type: str) -> torch.device:
    """Bind this rank's device and join the process group (the one transformers then uses)."""
    _, local_rank, world_size = world()
    device = torch.device("cuda", local_rank) if device_type == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                device_id=device if device.type == "cuda" else None)
    return device


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def model_folder(name: str, layers: int, cache: Path) -> Path:
    """A saved checkpoint of ``name``; rank 0 writes it on first use, the others wait."""
    if name == "smollm2":
        from ihip_compile import smollm2

        def converted() -> Path:  # the safetensors copy load_smollm2 also reads
            return smollm2._converted_copy(smollm2.gguf_path(), smollm2.DEFAULT_CACHE_DIR)

        if world()[0] == 0:
            converted()
        barrier()
        return converted()
    target = cache / f"{name}-{layers}layers"
    if world()[0] == 0 and not (target / "config.json").is_file():
        _save_random_model(name, layers, target)
    barrier()
    return target


def _save_random_model(name: str, layers: int, target: Path) -> None:
    import transformers

    from ihip_compile.bench.e2e import LLAMA_8B, TINY

    shape = TINY if name == "tiny" else LLAMA_8B
    config = transformers.LlamaConfig(**shape, num_hidden_layers=layers)
    torch.manual_seed(0)
    init_device = "cuda" if torch.cuda.is_available() else "cpu"
    with torch.device(init_device):
        model = transformers.LlamaForCausalLM(config).to(torch.bfloat16)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def load(folder: Path, dtype: torch.dtype, device: torch.device):
    from transformers import AutoConfig, AutoModelForCausalLM

    world_size = world()[2]
    kwargs = {"dtype": dtype}
    if world_size > 1:
        from transformers.distributed import DistributedConfig

        plan = tp_plan_for(AutoConfig.from_pretrained(folder), world_size)
        kwargs["distributed_config"] = DistributedConfig(tp_size=world_size, tp_plan=plan)
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    return (model if world_size > 1 else model.to(device)).eval()


# --- measurements -----------------------------------------------------------------------------
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def tokens_section(model, args, device) -> tuple[list[dict], list[torch.Tensor]]:
    """Rows per prompt length, and the logits of the generated tokens [new tokens, vocab]."""
    rows, all_logits = [], []
    for context in args.token_contexts:
        ids = torch.randint(3, model.config.vocab_size, (1, context),
                            generator=torch.Generator().manual_seed(context)).to(device)
        _sync(device)
        start = time.perf_counter()
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=args.new_tokens,
                                 min_new_tokens=args.new_tokens, do_sample=False,
                                 output_logits=True, return_dict_in_generate=True)
        _sync(device)
        logits = torch.stack(out.logits, dim=1)[0].float().cpu()  # [new tokens, vocab]
        top2 = logits.topk(2, dim=-1).values
        rows.append({"context": context, "seconds": time.perf_counter() - start,
                     "tokens": out.sequences[0, context:].tolist(),
                     "top2_margin_min": (top2[:, 0] - top2[:, 1]).min().item()})
        all_logits.append(logits)
    return rows, all_logits


def fill_rank_cache(cache, model, context: int, device, dtype, piece: int = 65536) -> None:
    """The same seeded random K/V in every run; each rank writes the heads it owns.

    Rank r of N owns KV heads [r * h, (r + 1) * h) with h = local_kv_heads (transformers'
    colwise split of k_proj/v_proj); with attention replicated, it owns all of them.
    """
    config = model.config
    heads = config.num_key_value_heads
    local = local_kv_heads(model)
    first = world()[0] * local if local < heads else 0
    dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    for layer in range(config.num_hidden_layers):
        for lo in range(0, context, piece):
            n = min(piece, context - lo)
            g = torch.Generator(device=device).manual_seed(1 + 1000 * layer + lo)
            k = torch.randn(1, heads, n, dim, generator=g, device=device, dtype=dtype)
            v = torch.randn(1, heads, n, dim, generator=g, device=device, dtype=dtype)
            cache.update(k[:, first:first + local], v[:, first:first + local], layer)
    _sync(device)


def greedy_steps(model, cache, token, steps: int, device) -> tuple[list[float], list[int]]:
    """Seconds per decode step and the tokens, feeding each argmax back."""
    times, tokens = [], []
    with torch.no_grad():
        for _ in range(steps):
            _sync(device)
            start = time.perf_counter()
            out = model(input_ids=token, past_key_values=cache, use_cache=True, logits_to_keep=1)
            token = out.logits[:, -1:].argmax(-1)
            _sync(device)
            times.append(time.perf_counter() - start)
            tokens.append(token.item())
    return times, tokens


def decode_section(model, args, device, dtype) -> list[dict]:
    from ihip_compile.offload import OffloadedCache

    cycle = max(args.config.refresh_intervals)
    rows = []
    for context in args.contexts:
        cache = OffloadedCache(model.config, kv_heads=local_kv_heads(model), dtype=dtype,
                               device=device, max_cache_tokens=context + 2 * cycle + 8,
                               ihip_config=args.config, storage_dtype=args.storage_dtype)
        start = time.perf_counter()
        fill_rank_cache(cache, model, context, device, dtype)
        fill_s = time.perf_counter() - start
        first = torch.full((1, 1), 3 + context % (model.config.vocab_size - 3), device=device)
        warm_times, warm_tokens = greedy_steps(model, cache, first, cycle, device)
        last = torch.full((1, 1), warm_tokens[-1], device=device)
        counts_before = cache.hit_counts()
        times, tokens = greedy_steps(model, cache, last, cycle, device)
        ms = 1e3 * sum(times) / len(times)
        rows.append({"context": context, "fill_s": fill_s, "ms_per_token": ms,
                     "tokens_per_s": 1e3 / ms, "first_step_s": warm_times[0],
                     "tokens": warm_tokens + tokens,
                     "hit_ratio": _hit_ratios(counts_before, cache.hit_counts()),
                     "gpu_bank_and_probe_copy_bytes": cache.gpu_bytes, "host_bytes": cache.host_bytes})
        del cache
        if device.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def _hit_ratios(before: list[dict], after: list[dict]) -> dict:
    out = {}
    for kind in ("attention", "pruning"):
        hits = sum(a[f"{kind}_hits"] - b[f"{kind}_hits"] for a, b in zip(after, before))
        misses = sum(a[f"{kind}_misses"] - b[f"{kind}_misses"] for a, b in zip(after, before))
        out[kind] = hits / (hits + misses) if hits + misses else None
    return out


# --- one run ----------------------------------------------------------------------------------
def run(args) -> int:
    rank, _, world_size = world()
    device = start_processes(args.device)
    dtype = getattr(torch, args.dtype)
    result = {"world_size": world_size, "device": _device_name(device), "dtype": args.dtype,
              "fp8_storage": args.fp8,
              "torch": torch.__version__, "config": args.config.as_dict(), "models": {}}
    logits = {}
    for name in args.models:
        layers = args.layers if name != "smollm2" else 0
        folder = model_folder(name, layers, Path(args.model_cache))
        torch._dynamo.reset()
        model = load(folder, dtype, device)
        model.compile(backend=args.backend, options=args.config.as_dict())
        entry = {"folder": str(folder), "tp_size": tensor_parallel_size(model),
                 "local_kv_heads": local_kv_heads(model),
                 "attention_replicated": world_size > 1
                 and tp_plan_for(model.config, world_size) != "auto"}
        for section in args.sections:
            start = time.perf_counter()
            try:
                if section == "tokens":
                    entry["tokens"], logits[name] = tokens_section(model, args, device)
                else:
                    entry["decode"] = decode_section(model, args, device, dtype)
            except Exception as e:  # recorded, and the command exits non-zero
                entry[f"{section}_error"] = f"{type(e).__name__}: {e}"
            entry[f"{section}_wall_s"] = time.perf_counter() - start
        result["models"][name] = entry
        del model
        if rank == 0:
            _write_run(Path(args.out), result, name, logits.get(name, []))
    barrier()
    if dist.is_initialized():
        dist.destroy_process_group()
    failed = any(k.endswith("_error") for m in result["models"].values() for k in m)
    return 1 if failed else 0


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _write_run(out: Path, result: dict, name: str, logits: list[torch.Tensor]) -> None:
    """One file per model and GPU count, so models can be run in separate commands."""
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"tp_{result['world_size']}gpu_{name}"
    torch.save(logits, f"{stem}_logits.pt")
    run = {k: v for k, v in result.items() if k != "models"}
    with open(f"{stem}.json", "w") as f:
        json.dump({**run, "model": name, **result["models"][name]}, f, indent=2, default=str)


# --- comparison -------------------------------------------------------------------------------
def compare(folder: Path) -> str:
    """Markdown table of the 1-GPU and 2-GPU runs in ``folder``."""
    from tabulate import tabulate

    rows, device, dtype = [], None, None
    for name in MODELS:
        paths = [folder / f"tp_{n}gpu_{name}.json" for n in (1, 2)]
        if not all(p.is_file() for p in paths):
            continue
        a, b = (json.loads(p.read_text()) for p in paths)
        device, dtype = b["device"], b["dtype"]
        logits = [torch.load(folder / f"tp_{n}gpu_{name}_logits.pt") for n in (1, 2)]
        for i, (ra, rb) in enumerate(zip(a.get("tokens", []), b.get("tokens", []))):
            gap = (logits[0][i] - logits[1][i]).abs().max().item()
            rows.append([name, "generate", ra["context"], _agreement(ra["tokens"], rb["tokens"]),
                         f"{gap:.3g}", f"{ra['seconds']:.2f} s", f"{rb['seconds']:.2f} s",
                         f"{ra['seconds'] / rb['seconds']:.2f}"])
        for ra, rb in zip(a.get("decode", []), b.get("decode", [])):
            rows.append([name, "decode", ra["context"], _agreement(ra["tokens"], rb["tokens"]),
                         "", f"{ra['ms_per_token']:.2f} ms", f"{rb['ms_per_token']:.2f} ms",
                         f"{ra['ms_per_token'] / rb['ms_per_token']:.2f}"])
    table = tabulate(rows, headers=["model", "what", "context", "same tokens", "max logit gap",
                                    "1 GPU", "2 GPUs", "speedup"], tablefmt="github")
    if not rows:
        raise FileNotFoundError(f"no model has both a 1-GPU and a 2-GPU run in {folder}")
    return (f"# Tensor parallel: 1 vs 2 GPUs ({device}, {dtype})\n\n"
            f"`python -m ihip_compile.bench tp --compare {folder}`\n\n{table}\n")


def _agreement(a: list[int], b: list[int]) -> str:
    diverge = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
    if diverge is None and len(a) == len(b):
        return f"all {len(a)}"
    return f"first {diverge} of {len(a)}"


# --- command line -----------------------------------------------------------------------------
def parse_args(argv):
    p = argparse.ArgumentParser(prog="python -m ihip_compile.bench tp", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="reports/bench/tp")
    p.add_argument("--compare", default=None, help="folder with both runs: write tp.md, exit")
    p.add_argument("--models", default="llama8b,smollm2", help=f"comma-separated of {MODELS}")
    p.add_argument("--layers", type=int, default=4, help="decoder layers of llama8b (8B: 32)")
    p.add_argument("--sections", default="tokens,decode")
    p.add_argument("--token-contexts", default="512,16384")
    p.add_argument("--new-tokens", type=int, default=16)
    p.add_argument("--contexts", default="131072,1048576", help="decode contexts")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    p.add_argument("--backend", default="infinitehip",
                   choices=["infinitehip", "infinitehip_eager"])
    p.add_argument("--options", default="{}", help="infinitehip options as JSON")
    p.add_argument("--model-cache", default=str(DEFAULT_CACHE))
    p.add_argument("--fp8", action="store_true", help="store K/V as float8_e4m3fn in host memory")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--tiny", action="store_true",
                   help="CPU smoke: the tiny model, short contexts, small selection settings")
    args = p.parse_args(argv)
    if args.tiny:
        args.models, args.token_contexts, args.contexts = "tiny", "24,160", "300"
        args.dtype, args.new_tokens = "float32", 4
        args.options = json.dumps({**TINY_OPTIONS, **json.loads(args.options)})
    args.models = [m for m in args.models.split(",") if m]
    unknown = sorted(set(args.models) - set(MODELS))
    if unknown:
        p.error(f"unknown models {unknown}; allowed: {list(MODELS)}")
    args.sections = [s for s in args.sections.split(",") if s]
    if set(args.sections) - {"tokens", "decode"}:
        p.error(f"unknown sections in {args.sections}; allowed: tokens, decode")
    args.token_contexts = [int(c) for c in args.token_contexts.split(",") if c]
    args.contexts = [int(c) for c in args.contexts.split(",") if c]
    args.config = IHipConfig.from_options(json.loads(args.options))
    args.storage_dtype = torch.float8_e4m3fn if args.fp8 else None
    return args


# Small enough that the sparse path runs, and selects, at a few hundred tokens.
TINY_OPTIONS = {"dense_below_tokens": 128, "block_size_q": 16, "sink_tokens": 8,
                "sliding_window_tokens": 32, "selected_tokens": 32,
                "stages": [[32, 128], [8, 32]], "refresh_intervals": [4, 2],
                "gpu_cache_tokens": 256}


def main(argv: list[str]) -> int:
    args = parse_args(argv)
    if args.compare:
        text = compare(Path(args.compare))
        (Path(args.compare) / "tp.md").write_text(text)
        print(text)
        return 0
    return run(args)
