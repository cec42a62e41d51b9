"""Benchmarks: ``python -m ihip_compile.bench <name> [args]``.

Each benchmark is a module ``ihip_compile.bench.<name>`` with ``main(argv) -> int``; results go to
``reports/bench/`` (JSON, a markdown table, a plot when matplotlib is installed).
"""

import argparse
import json

import torch


def l2_flush_buffer(device) -> torch.Tensor:
    """256 MiB, more than any GPU's L2 cache: zeroing it between timed calls evicts their inputs
    (``bench.attention.time_graphed``)."""
    return torch.empty(256 << 20, dtype=torch.uint8, device=device)


def start_gpu_script(parser: argparse.ArgumentParser) -> tuple[argparse.Namespace, torch.Tensor]:
    """A measurement script's beginning: its arguments plus ``--out``, a clear stop without a
    CUDA GPU, a fixed seed, and an L2 flush buffer. Returns ``(args, flush)``."""
    parser.add_argument("--out", default=None, help="also write the JSON result to this file")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit(f"{parser.prog} times Triton kernels: it needs a CUDA GPU")
    torch.manual_seed(0)
    return args, l2_flush_buffer("cuda")


def print_and_save(result: dict, out: str | None) -> None:
    """A measurement script's ending: its result as one JSON line, and in ``out`` when given."""
    print(json.dumps(result))
    if out:
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
