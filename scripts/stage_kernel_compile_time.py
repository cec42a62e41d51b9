"""Time a pruning kernel's compilation for a CUDA target, on any machine (no GPU needed).

    python scripts/stage_kernel_compile_time.py [--kernel stage|handoff] [--chunk 256] [--arch 90]

A fresh GPU process pays Triton's compile time once per kernel variant (stage chunk size, RoPE mode,
pooled queries, ...); this measures one variant ahead of time so that changes to a kernel's code
size can be judged without a GPU: the stage kernel at Llama-3.1-8B decode shapes (bf16), or the
stage hand-off as stage 0 runs it (scored, 256-key chunks split into 32-key ones).
"""

from __future__ import annotations

import argparse
import os
import time

os.environ.pop("TRITON_INTERPRET", None)  # compile for real, not for the interpreter

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from ihip_compile.kernels import prune_stage, stage_handoff  # noqa: E402

POINTERS = {"q_ptr": "*bf16", "k_ptr": "*bf16", "starts_ptr": "*i32", "key_hi_ptr": "*i32",
            "block_pos_ptr": "*i32", "inv_freq_ptr": "*fp32", "out_ptr": "*fp32"}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--chunk", type=int, default=256, help="stage chunk size (power of two)")
    p.add_argument("--arch", type=int, default=90, help="CUDA compute capability, e.g. 90")
    p.add_argument("--kernel", choices=("stage", "handoff"), default="stage")
    args = p.parse_args()
    if args.kernel == "handoff":
        return compile_handoff(args.arch)
    first = min(8, args.chunk)
    constants = dict(KB=1, H_KV=8, GROUP=4, NPQ=1, QROWS=16, CHUNK=args.chunk,
                     LOG2_CHUNK=args.chunk.bit_length() - 1, FIRST_PROBES=first,
                     LOG2_FIRST=first.bit_length() - 1, CHUNK_TILE=16, BLOCK_D=128, ROPE_MODE=1,
                     ROTARY_DIM=128, LAYOUT=1, DOT_PRECISION="tf32")
    kernel = prune_stage._score_chunks_kernel
    signature = {name: POINTERS.get(name, "constexpr" if name in constants else "i32")
                 for name in kernel.arg_names}
    source = ASTSource(kernel, signature, constexprs=constants)
    t0 = time.perf_counter()
    compiled = triton.compile(source, target=GPUTarget("cuda", args.arch, 32))
    print(f"stage kernel, chunk {args.chunk}, sm_{args.arch}: compiled in "
          f"{time.perf_counter() - t0:.1f} s, {compiled.asm['ptx'].count(chr(10))} PTX lines")


def compile_handoff(arch: int) -> None:
    kernel = stage_handoff._stage_handoff_kernel
    constants = dict(TILE=stage_handoff.TILE, RATIO=8, SCORED=True, WRITE_KEPT=True)
    pointers = ("scores_ptr", "starts_ptr", "kept_ptr", "children_ptr")
    signature = {name: ("*fp32" if name == "scores_ptr" else "*i32") if name in pointers else
                 "constexpr" if name in constants else "i32" for name in kernel.arg_names}
    t0 = time.perf_counter()
    triton.compile(ASTSource(kernel, signature, constexprs=constants),
                   target=GPUTarget("cuda", arch, 32), options={"num_warps": stage_handoff.WARPS})
    print(f"stage hand-off, tile {stage_handoff.TILE}, sm_{arch}: compiled in "
          f"{time.perf_counter() - t0:.1f} s")


if __name__ == "__main__":
    main()
