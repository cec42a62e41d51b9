"""GPU memory of a prompt read after decode, over an ``OffloadedCache`` (a server's next request).

    python scripts/prefill_memory.py [--context 1048576] [--chunk 32768] [--layers 4]
        [--decode-steps 40] [--backend infinitehip_eager] [--options JSON] [--fp8] [--out FILE]

The end-to-end benchmark's model (Llama-3.1-8B shapes, random weights, ``--layers`` layers)
prefills a short prompt (compiling the graphs), then, on one cache: reads a prompt of
``--context`` tokens, decodes ``--decode-steps`` tokens (which make the GPU banks and stage 0's
probe copies), ``reset()``s the cache and reads another prompt of the same length. Recorded: the
device bytes of the banks and probe copies after decode, the device memory allocated when the
second prompt starts, and the peak allocated (and reserved by torch's caching allocator) while
it is read, with the scratch buffers it left. Prints
and writes JSON (``--out``).
"""

from __future__ import annotations

import argparse
import json
import time

import torch

from ihip_compile.bench.e2e import _prompt, _sync
from ihip_compile.bench.script_model import add_model_arguments, compiled_model
from ihip_compile.chunked_prefill import chunked_prefill
from ihip_compile.kernels import offloaded_attention
from ihip_compile.offload import OffloadedCache


def _parse() -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="scripts/prefill_memory.py")
    add_model_arguments(p)
    p.add_argument("--chunk", type=int, default=32768)
    p.add_argument("--decode-steps", type=int, default=40)
    p.add_argument("--out", default=None, help="write the JSON here too")
    return p.parse_args()


def _decode(ours, cache, logits, steps: int) -> None:
    token = logits.argmax(-1, keepdim=True)
    for _ in range(steps):
        out = ours(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1:].argmax(-1)


def _scratch_bytes() -> int:
    return sum(t.numel() * t.element_size() for t in offloaded_attention._SCRATCH.values())


def main() -> None:
    args = _parse()
    if not torch.cuda.is_available():
        raise SystemExit("scripts/prefill_memory.py measures GPU memory: it needs a CUDA device")
    device, dtype = torch.device("cuda"), torch.bfloat16
    built = compiled_model(args, device, dtype)
    config, model, ours, storage = built.config, built.model, built.ours, built.storage_dtype

    def cache_for(tokens):
        return OffloadedCache(model.config, max_cache_tokens=tokens, dtype=dtype, device=device,
                              ihip_config=config, storage_dtype=storage)

    result = {"context": args.context, "chunk": args.chunk, "layers": args.layers,
              "decode_steps": args.decode_steps, "backend": args.backend,
              "options": json.loads(args.options), "fp8": args.fp8,
              "device": torch.cuda.get_device_name(device), "torch": torch.__version__}
    with torch.no_grad():
        warm = cache_for(3 * args.chunk)
        chunked_prefill(ours, _prompt(model, 3 * args.chunk, 1, device), warm,
                        chunk_tokens=args.chunk, leave_last=False, progress=False)
        del warm
        cache = cache_for(args.context + args.decode_steps + 8)
        cache.allocate()
        logits = chunked_prefill(ours, _prompt(model, args.context, 2, device), cache,
                                 chunk_tokens=args.chunk, leave_last=False, progress=False)
        _decode(ours, cache, logits, args.decode_steps)
        _sync(device)
        result["banks_and_probe_copies_after_decode_bytes"] = cache.gpu_bytes
        cache.reset()
        result["allocated_at_second_prompt_bytes"] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        chunked_prefill(ours, _prompt(model, args.context, 3, device), cache,
                        chunk_tokens=args.chunk, leave_last=False, progress=False)
        _sync(device)
        result["second_prompt_s"] = time.perf_counter() - t0
        result["peak_during_second_prompt_bytes"] = torch.cuda.max_memory_allocated()
        result["peak_reserved_during_second_prompt_bytes"] = torch.cuda.max_memory_reserved()
        result["allocated_after_second_prompt_bytes"] = torch.cuda.memory_allocated()
        result["banks_and_probe_copies_after_second_prompt_bytes"] = cache.gpu_bytes
        result["scratch_after_second_prompt_bytes"] = _scratch_bytes()
    result["model_bytes"] = sum(p.numel() * p.element_size() for p in model.parameters())
    text = json.dumps(result, indent=1)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
