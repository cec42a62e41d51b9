"""The main job: SmolLM2 answers a question hidden in a long context, through our backend.

    python -m ihip_compile demo                      # CPU-sized: a 1.5k-token prompt, small budgets
    python -m ihip_compile demo --device cuda --context-tokens 131072 --preset paper

Steps, all in one process on the same prompt:
 1. load SmolLM2-135M-Instruct (``ihip_compile.smollm2``) and hide a 5-digit pass key in filler;
 2. dense: prefill the prompt, then ``generate()`` the answer; timed;
 3. ``model.compile(backend=..., options=...)`` (in place, so ``generate()`` uses it; see
    docs/backend.md; ``infinitehip`` on cuda, ``infinitehip_eager`` on cpu), then the same steps
    twice: the first run includes compilation, the second is timed warm;
 4. print both answers, the graph-diff summary the backend wrote under ``--report-dir``, and the
    measured speedup (dense seconds / warm infinitehip seconds). On a CPU the sparse path runs
    the torch references of the Triton kernels, so the speedup can be below 1: it is printed as
    measured.
The prompt is prefilled with ``ihip_compile.chunked_prefill`` without an attention mask (a
mask-free call), and ``generate()`` continues from that cache (its all-valid attention mask
keeps the op on the sparse path). The CPU default is small because the sparse path runs the
kernels' torch references there.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ihip_compile.config import IHipConfig
from ihip_compile.eval.__main__ import PRESETS, tokens
from ihip_compile.eval.data import passkey_prompt
from ihip_compile.eval.run import answer_has_key
from ihip_compile.layer_policy import with_model_facts


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ihip_compile demo", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--context-tokens", type=tokens, default=None,
                   help="prompt length; default 1.5k on cpu, 32k on cuda")
    p.add_argument("--depth", type=float, default=0.3, help="where the key sits, 0..1")
    p.add_argument("--preset", choices=sorted(PRESETS), default=None,
                   help="option preset; default cpu-small on cpu, paper on cuda")
    p.add_argument("--options", default="{}", help="JSON of IHipConfig options over the preset")
    p.add_argument("--report-dir", default="reports/demo")
    p.add_argument("--max-new-tokens", type=int, default=10)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--backend", choices=("infinitehip", "infinitehip_eager"), default=None,
                   help="default: infinitehip on cuda; infinitehip_eager on cpu, where the op runs "
                   "the kernels' torch references and Inductor's C++ build of the model would "
                   "take minutes")
    args = p.parse_args(argv)
    gpu = args.device.startswith("cuda")
    args.backend = args.backend or ("infinitehip" if gpu else "infinitehip_eager")
    args.context_tokens = args.context_tokens or (32768 if gpu else 1536)
    args.preset = args.preset or ("paper" if gpu else "cpu-small")
    return args


def answer(model, tokenizer, ids: torch.Tensor, max_new_tokens: int) -> tuple[str, float]:
    """(decoded answer, seconds): mask-free chunked prefill, then generate() from the cache."""
    from transformers import DynamicCache

    from ihip_compile.chunked_prefill import chunked_prefill

    _sync(ids.device)
    started = time.perf_counter()
    with torch.no_grad():
        cache = DynamicCache()
        chunked_prefill(model, ids, cache, progress=False)
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=max_new_tokens, do_sample=False)
    _sync(ids.device)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True), (
        time.perf_counter() - started)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    from ihip_compile.smollm2 import load_smollm2

    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    print(f"loading SmolLM2-135M-Instruct ({dtype}, {args.device}) ...", flush=True)
    model, tokenizer = load_smollm2(dtype=dtype, device=args.device)
    options = {**PRESETS[args.preset], **json.loads(args.options), "report_dir": args.report_dir}
    config = with_model_facts(IHipConfig.from_options(options), model)
    ids, key = passkey_prompt(tokenizer, args.context_tokens, args.depth, args.seed)
    ids = ids.to(args.device)
    print(f"prompt: {ids.shape[1]} tokens, pass key at depth {args.depth:.0%} (trained context "
          f"{config.trained_context_tokens}, rope_remap={config.rope_remap})", flush=True)

    dense_answer, dense_s = answer(model, tokenizer, ids, args.max_new_tokens)
    print(f"dense        : {dense_answer!r} ({dense_s:.1f} s)", flush=True)

    _clear_reports(Path(args.report_dir))
    model.compile(backend=args.backend, options=config.as_dict())
    _, first_s = answer(model, tokenizer, ids, args.max_new_tokens)
    ihip_answer, ihip_s = answer(model, tokenizer, ids, args.max_new_tokens)
    print(f"infinitehip  : {ihip_answer!r} ({ihip_s:.1f} s warm; {first_s:.1f} s with compile; "
          f"backend {args.backend})")

    print(f"\npass key {key}: dense {_verdict(dense_answer, key)}, "
          f"infinitehip {_verdict(ihip_answer, key)}")
    _print_reports(Path(args.report_dir))
    print(f"\nmeasured speedup (dense / infinitehip, same prompt, warm): {dense_s / ihip_s:.2f}x "
          f"on {args.device}")
    return 0


def _verdict(text: str, key: str) -> str:
    return "correct" if answer_has_key(text, key) else "wrong"


def _clear_reports(folder: Path) -> None:
    """Stale graph reports of an earlier run would be printed as this run's."""
    from ihip_compile.report import reset_numbering

    for stale in folder.glob("graph_*.*"):
        stale.unlink()
    reset_numbering(str(folder))


def _print_reports(folder: Path) -> None:
    """The summary of each graph report the backend wrote: everything before its diff."""
    reports = sorted(folder.glob("graph_*.md"))
    if not reports:
        print(f"\n(no graph report in {folder}: the backend compiled no graph)")
        return
    # The first graph is the prompt's prefill: its summary in full; the others (generate's
    # prefill of the last token, decode) in one line each.
    for index, path in enumerate(reports):
        text = path.read_text()
        print(f"\n--- {path} ---")
        if index == 0:
            print(text.split("\n## Graph diff", 1)[0].rstrip())
        else:
            print(next((line for line in text.splitlines() if "attention sites" in line), ""))
