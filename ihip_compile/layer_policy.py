"""Per-layer sparse-attention arguments: what each rewritten attention site passes to the op.

The paper's default policy: layers in ``config.wide_layers`` get twice the selection budget and
chunk-indexed positions while pruning; every other layer gets the normal budget and relative
positions. Layers in ``config.dense_layers`` stay exact dense attention. RoPE remapping starts
beyond the model's trained context when it is known (``rope_remap="auto"``), at every sparse
call with ``"always"``, and never with ``"off"``.
"""

from __future__ import annotations

from typing import Any

from ihip_compile.config import IHipConfig

PRUNING_ROPE_RELATIVE, PRUNING_ROPE_CHUNK_INDEXED = 0, 1
REMAP_NEVER = -1

# A key length no context reaches: used as dense_below_tokens for layers kept dense.
_ALWAYS_DENSE = 2**62


def remap_beyond_tokens(config: IHipConfig) -> int:
    """Key length beyond which the op remaps RoPE positions (-1: never)."""
    if config.rope_remap == "off":
        return REMAP_NEVER
    if config.rope_remap == "always" or config.trained_context_tokens is None:
        return 0
    return config.trained_context_tokens


def sparse_args_for_layer(config: IHipConfig, layer: int) -> dict[str, Any]:
    """Keyword scalars of ``torch.ops.ihip.attention`` for one layer."""
    wide = layer in config.wide_layers
    factor = 2 if wide else 1
    return {
        "dense_below_tokens": _ALWAYS_DENSE if layer in config.dense_layers
        else config.dense_below_tokens,
        "block_size_q": config.block_size_q,
        "sink_tokens": config.sink_tokens,
        "window_tokens": config.sliding_window_tokens,
        "selected_tokens": config.selected_tokens * factor,
        "stage_chunks": [s.chunk_size for s in config.stages],
        "stage_keeps": [s.keep_tokens * factor for s in config.stages],
        "pruning_rope": PRUNING_ROPE_CHUNK_INDEXED if wide else PRUNING_ROPE_RELATIVE,
        "remap_beyond_tokens": remap_beyond_tokens(config),
        "refresh_intervals": list(config.refresh_intervals),
    }
