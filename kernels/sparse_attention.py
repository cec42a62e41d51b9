"""InfiniteHiP sparse attention end to end: block selection, then block-sparse attention.

The one entry the ``ihip::attention`` op and ``ihip_compile.hip_attention`` call above the dense
threshold. ``per_kv_head`` picks the selection scope (``selection_scope``: one selection per layer,
or one per KV head). Everything stays on the device with shapes fixed by the arguments (no host sync on
the Triton path). ``use_triton`` picks the Triton kernels (CUDA) or their torch references (CPU).

RoPE (keys in the cache are already rotated at their true positions):
    remap=False  attention at true positions; pruning at true positions
    remap=True   attention with StreamingLLM renumbering; pruning with ``pruning_rope``
                 (0 relative, 1 chunk-indexed) positions
"""

from __future__ import annotations

import torch

from ihip_compile.kernels.block_selection import select_blocks
from ihip_compile.kernels.selection_scope import fold_heads, fold_inputs, per_group, unfold_heads
from ihip_compile.kernels.block_sparse_attention_ref import block_sparse_attention_ref
from ihip_compile.kernels.prune_stage_ref import (
    DEFAULT_FIRST_PROBES, PRUNE_ROPE_CHUNK_INDEXED, PRUNE_ROPE_RELATIVE, PRUNE_ROPE_TRUE,
)
from ihip_compile.kernels.sparse_decode_ref import sparse_decode_ref

GPU_DTYPES = (torch.float16, torch.bfloat16, torch.float32)
REFERENCE_DTYPES = GPU_DTYPES + (torch.float64,)


def check_attention_inputs(q, k, v, q_positions=None) -> None:
    """Raise ValueError naming the bad input unless q, k, v (and q_positions) fit the kernels."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 4:
            raise ValueError(f"{name} must be a 4-D tensor [B, heads, S, D], got "
                             f"{getattr(t, 'shape', type(t).__name__)}")
    b, h, _, d = q.shape
    if k.shape[0] != b or v.shape[0] != b or k.shape[3] != d or v.shape[3] != d:
        raise ValueError(f"k and v must be [B={b}, H_KV, S_K, D={d}], got {tuple(k.shape)} and "
                         f"{tuple(v.shape)} (the sparse kernels need D_V == D)")
    if k.shape[1:3] != v.shape[1:3] or h % k.shape[1]:
        raise ValueError(f"k/v heads must match and divide q's {h} heads, got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    if not (q.dtype == k.dtype == v.dtype):
        raise ValueError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    allowed = GPU_DTYPES if q.is_cuda else REFERENCE_DTYPES
    if q.dtype not in allowed:
        raise ValueError(f"dtype {q.dtype} is not supported on {q.device.type}; allowed: {allowed}")
    if q.device.type not in ("cpu", "cuda"):
        raise ValueError(f"device {q.device} not supported: the sparse path runs on cuda or cpu")
    if d > 256:
        raise ValueError(f"head dim D={d} is larger than the kernels' 256")
    if q_positions is not None and q_positions.shape[-1] != q.shape[2]:
        raise ValueError(f"q_positions must be [S_Q] or [B, S_Q] with S_Q={q.shape[2]}, got "
                         f"{tuple(q_positions.shape)}")


def pruning_rope_mode(pruning_rope: int, remap: bool) -> int:
    """``rope_mode`` of ``select_blocks`` for the op's ``pruning_rope`` (0 relative, 1
    chunk-indexed), which applies only while remapping; otherwise true positions."""
    if not remap:
        return PRUNE_ROPE_TRUE
    return PRUNE_ROPE_CHUNK_INDEXED if pruning_rope == 1 else PRUNE_ROPE_RELATIVE


def sparse_attention(
    q, k, v, q_positions, *, scale: float, softcap: float = 0.0, block_size_q: int = 64,
    sink_tokens: int = 256, window_tokens: int = 1024, selected_tokens: int = 2048,
    stage_chunks=(256, 32, 8), stage_keeps=(32768, 8192, 2048), pruning_rope: int = 0,
    remap: bool = False, inv_freq=None, rotary_dim: int = 0, rope_layout: int = 0,
    use_triton: bool | None = None, first_probes: int = DEFAULT_FIRST_PROBES,
    exact_probe_blocks: int = 0, first_stage_blocks: int = 1, per_kv_head: bool = False,
    kv_for_attention=None,
):
    """q [B, H, S_Q, D], k/v [B, H_KV, S_K, D], q_positions [S_Q] or [B, S_Q] -> [B, H, S_Q, D].

    ``kv_for_attention(blocks [B, G, NQB, TOPK], window_tokens)``, when given, returns the (k, v)
    to attend once the blocks are selected (the offloaded cache fills the values it needs then);
    otherwise ``k``, ``v`` are used. G is 1, or H_KV with ``per_kv_head``.
    """
    check_attention_inputs(q, k, v, q_positions)
    if use_triton is None:
        use_triton = q.is_cuda
    rope = rope_layout != 0 and inv_freq is not None and rotary_dim > 0
    if remap and not rope:
        remap = False  # no RoPE found in the model: positions mean nothing to the scores
    prune_mode = pruning_rope_mode(pruning_rope, remap)
    b = q.shape[0]
    q, k, v, pos, groups = fold_inputs(q, k, v, q_positions, per_kv_head)
    rope_args = dict(inv_freq=inv_freq, rotary_dim=rotary_dim, rope_layout=rope_layout)
    blocks = select_blocks(
        q, k, pos, block_size_q=block_size_q, sink_tokens=sink_tokens,
        window_tokens=window_tokens, selected_tokens=selected_tokens, stage_chunks=stage_chunks,
        stage_keeps=stage_keeps, rope_mode=prune_mode, use_triton=use_triton,
        first_probes=first_probes, exact_probe_blocks=exact_probe_blocks,
        first_stage_blocks=first_stage_blocks, **rope_args,
    )
    if kv_for_attention is not None:
        k, v = kv_for_attention(per_group(blocks, b), window_tokens)
        k, v = fold_heads(k, groups), fold_heads(v, groups)
    common = dict(scale=scale, sink_tokens=sink_tokens, window_tokens=window_tokens,
                  block_size_k=stage_chunks[-1], softcap=softcap, remap=remap, **rope_args)
    out = attend_selected_blocks(q, k, v, blocks, pos, block_size_q, use_triton, common)
    return unfold_heads(out, b)


def sparse_kwargs(op_args: dict, s_k: int, use_triton: bool) -> dict:
    """Keyword arguments of ``sparse_attention`` and ``cached_sparse_decode`` from the
    ``ihip::attention`` keyword scalars ``op_args`` (remapping decided for ``s_k`` keys)."""
    remap_beyond = op_args.get("remap_beyond_tokens", -1)
    return dict(
        scale=op_args["scale"], softcap=op_args.get("softcap", 0.0),
        block_size_q=op_args["block_size_q"], sink_tokens=op_args["sink_tokens"],
        window_tokens=op_args["window_tokens"], selected_tokens=op_args["selected_tokens"],
        stage_chunks=tuple(op_args["stage_chunks"]), stage_keeps=tuple(op_args["stage_keeps"]),
        pruning_rope=op_args.get("pruning_rope", 0), remap=0 <= remap_beyond < s_k,
        rotary_dim=op_args.get("rotary_dim", 0), rope_layout=op_args.get("rope_layout", 0),
        first_probes=op_args.get("first_probes", DEFAULT_FIRST_PROBES),
        exact_probe_blocks=op_args.get("exact_probe_blocks", 0),
        first_stage_blocks=op_args.get("first_stage_blocks", 1),
        per_kv_head=op_args.get("per_kv_head", False), use_triton=use_triton,
    )


def attend_selected_blocks(q, k, v, blocks, pos, block_size_q, use_triton, common):
    """Block-sparse attention of the selected blocks: the decode or the prefill kernel."""
    if q.shape[2] == 1:
        if use_triton:
            from ihip_compile.kernels.sparse_decode import sparse_decode
            return sparse_decode(q, k, v, blocks, pos, **common)
        return sparse_decode_ref(q, k, v, blocks, pos, **common)
    if use_triton:
        from ihip_compile.kernels.block_sparse_attention import block_sparse_attention
        return block_sparse_attention(q, k, v, pos, blocks, block_size_q=block_size_q, **common)
    return block_sparse_attention_ref(q, k, v, pos, blocks, block_size_q=block_size_q, **common)
