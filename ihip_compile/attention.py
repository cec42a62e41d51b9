"""Public functions: InfiniteHiP attention and its block selection, outside any compiled graph.

    out = hip_attention(q, k, v)                        # [B, H, S_Q, D], causal, GQA
    blocks = select_blocks(q, k)                        # [B, G, NQB, TOPK] sorted 8-token blocks

Both read their settings from an ``IHipConfig`` (default: the paper's), for one layer (``layer``
picks the per-layer policy: wide layers get twice the budget). ``hip_attention`` goes through
``torch.ops.ihip.attention``, the same op the compiled graphs call: exact dense SDPA below
``dense_below_tokens`` keys, sparse above (Triton on CUDA, the torch references on CPU).
"""

from __future__ import annotations

import math

import torch

from ihip_compile.config import IHipConfig
from ihip_compile.kernels import ops as _ops  # noqa: F401  (registers torch.ops.ihip.*)
from ihip_compile.kernels import block_selection
from ihip_compile.kernels.selection_scope import fold_inputs, per_group, per_sequence
from ihip_compile.kernels.sparse_attention import check_attention_inputs, pruning_rope_mode
from ihip_compile.layer_policy import sparse_args_for_layer

# Layer index that no config lists among its wide or dense layers: the normal policy.
_NORMAL_LAYER = -1


def _default_positions(q, k, q_positions):
    if q_positions is not None:
        return q_positions.to(device=q.device)
    s_q, s_k = q.shape[2], k.shape[2]
    return torch.arange(s_k - s_q, s_k, device=q.device)


def hip_attention(
    q: torch.Tensor,  # [B, H, S_Q, D]
    k: torch.Tensor,  # [B, H_KV, S_K, D]
    v: torch.Tensor,  # [B, H_KV, S_K, D]
    *,
    config: IHipConfig | None = None,
    layer: int | None = None,
    scale: float | None = None,
    softcap: float = 0.0,
    q_positions: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
    rotary_dim: int = 0,
    rope_layout: int = 0,
) -> torch.Tensor:  # [B, H, S_Q, D]
    """Causal attention, query i at key index ``S_K - S_Q + i`` unless ``q_positions`` says.

    ``inv_freq``/``rotary_dim``/``rope_layout`` (1 rotate_half, 2 interleaved) describe the RoPE
    the keys were rotated with; with them, positions are remapped as ``config.rope_remap`` says.
    """
    config = IHipConfig.from_options(config)
    check_attention_inputs(q, k, v, q_positions)
    args = sparse_args_for_layer(config, _NORMAL_LAYER if layer is None else layer)
    return torch.ops.ihip.attention(
        q, k, v, _default_positions(q, k, q_positions), None, inv_freq,
        layer=_NORMAL_LAYER if layer is None else layer,
        scale=1.0 / math.sqrt(q.shape[-1]) if scale is None else scale, softcap=softcap,
        rotary_dim=rotary_dim, rope_layout=rope_layout, **args,
    )


def select_blocks(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    config: IHipConfig | None = None,
    layer: int | None = None,
    q_positions: torch.Tensor | None = None,
    inv_freq: torch.Tensor | None = None,
    rotary_dim: int = 0,
    rope_layout: int = 0,
    remap: bool = False,
    start_stage: int = 0,
    candidates: torch.Tensor | None = None,
    return_stages: bool = False,
):
    """Selected 8-token blocks per query block: [B, G, NQB, TOPK] int32, sorted, -1 last.

    Exactly what the sparse path attends besides sinks and window. G is 1 with
    ``selection_scope="layer"`` (one list for all heads) and H_KV with ``"kv_head"`` (each KV
    head's list, chosen from its own query heads' scores; ``kernels/selection_scope.py``).
    Stages and ``candidates`` have the same leading [B, G] ([B, G, NQB, N]). ``remap=True`` scores with the
    layer's pruning RoPE positions. ``start_stage``/``candidates``/``return_stages``: see
    ``ihip_compile.kernels.block_selection.select_blocks`` (reusing stages across decode steps).
    """
    config = IHipConfig.from_options(config)
    check_attention_inputs(q, k, k, q_positions)
    args = sparse_args_for_layer(config, _NORMAL_LAYER if layer is None else layer)
    b = q.shape[0]
    q, k, _, positions, _ = fold_inputs(q, k, k, _default_positions(q, k, q_positions),
                                        args["per_kv_head"])
    selected = block_selection.select_blocks(
        q, k, positions, block_size_q=args["block_size_q"],
        sink_tokens=args["sink_tokens"], window_tokens=args["window_tokens"],
        selected_tokens=args["selected_tokens"], stage_chunks=args["stage_chunks"],
        stage_keeps=args["stage_keeps"], rope_mode=pruning_rope_mode(args["pruning_rope"], remap),
        inv_freq=inv_freq, rotary_dim=rotary_dim, rope_layout=rope_layout,
        start_stage=start_stage, first_probes=args["first_probes"],
        exact_probe_blocks=args["exact_probe_blocks"],
        first_stage_blocks=args["first_stage_blocks"],
        candidates=None if candidates is None else per_sequence(candidates),
        return_stages=return_stages,
    )
    if return_stages:
        blocks, stages = selected
        return per_group(blocks, b), [per_group(s, b) for s in stages]
    return per_group(selected, b)
