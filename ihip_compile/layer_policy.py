"""Per-layer sparse-attention arguments: what each rewritten attention site passes to the op.

Two policies (``config.layer_policy``):
    "paper"       layers in ``config.wide_layers`` get twice the selection budget and
                  chunk-indexed positions while pruning; every other layer gets the normal budget
                  and relative positions (InfiniteHiP's default).
    "calibrated"  ``config.calibrated_layers`` names, per layer, the pruning RoPE style and the
                  budget factor that ``ihip_compile.layer_calibration.calibrate`` measured on a
                  sample prompt. A layer missing from that table is an error, never a guess.
Layers in ``config.dense_layers`` stay exact dense attention under both.

RoPE remapping (``config.rope_remap``): ``"always"`` remaps at every sparse call, ``"off"`` never,
``"auto"`` only once the keys outgrow the model's trained context (``trained_context_tokens``).
The graph the backend sees does not carry the model's config, so that length is given as an
option, filled from the model by ``with_model_facts``, or read by the backend from the model
Dynamo is tracing (``traced_model``); when it is unknown, ``"auto"`` remaps at every sparse call:
renumbered positions are always inside the window, true ones may not be.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from ihip_compile.config import IHipConfig

PRUNING_ROPE_RELATIVE, PRUNING_ROPE_CHUNK_INDEXED = 0, 1
REMAP_NEVER = -1

# A key length no context reaches: used as dense_below_tokens for layers kept dense.
_ALWAYS_DENSE = 2**62


def infer_trained_context_tokens(model_or_config: Any) -> int | None:
    """The context length a model was trained (or fine-tuned) to, from its config; None if unstated.

    Scaled RoPE (linear, dynamic, llama3, yarn) extends a model: its ``max_position_embeddings`` is
    the extended length it was tuned to reach (Llama 3.1: 131072, while the llama3 scaling keeps the
    pre-extension 8192 as ``original_max_position_embeddings``). Distances up to the extended length
    are the ones the model handles, so that is the length remapping must stay within.
    """
    config = getattr(model_or_config, "config", model_or_config)
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(config, name, None)
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return None


def with_model_facts(config: IHipConfig, model: Any) -> IHipConfig:
    """``config`` with ``trained_context_tokens`` filled from ``model`` when not given."""
    if config.trained_context_tokens is not None:
        return config
    trained = infer_trained_context_tokens(model)
    return config if trained is None else dataclasses.replace(config, trained_context_tokens=trained)


def remap_beyond_tokens(config: IHipConfig) -> int:
    """Key length beyond which the op remaps RoPE positions (-1: never)."""
    if config.rope_remap == "off":
        return REMAP_NEVER
    if config.rope_remap == "always" or config.trained_context_tokens is None:
        return 0
    return config.trained_context_tokens


def layer_choice(config: IHipConfig, layer: int) -> tuple[int, int]:
    """(pruning_rope op value, budget factor) of one layer under ``config.layer_policy``."""
    if config.layer_policy == "calibrated":
        for choice in config.calibrated_layers:
            if choice.layer == layer:
                rope = PRUNING_ROPE_CHUNK_INDEXED if choice.pruning_rope == "chunk_indexed" else (
                    PRUNING_ROPE_RELATIVE)
                return rope, choice.budget_factor
        raise ValueError(
            f"layer_policy='calibrated' but calibrated_layers has no entry for layer {layer} "
            f"(it names layers {sorted(c.layer for c in config.calibrated_layers)}); calibrate "
            "on the same model that is compiled"
        )
    if layer in config.wide_layers:
        return PRUNING_ROPE_CHUNK_INDEXED, 2
    return PRUNING_ROPE_RELATIVE, 1


def sparse_args_for_layer(config: IHipConfig, layer: int) -> dict[str, Any]:
    """Keyword scalars of ``torch.ops.ihip.attention`` for one layer."""
    pruning_rope, factor = layer_choice(config, layer)
    return {
        "dense_below_tokens": _ALWAYS_DENSE if layer in config.dense_layers
        else config.dense_below_tokens,
        "block_size_q": config.block_size_q,
        "sink_tokens": config.sink_tokens,
        "window_tokens": config.sliding_window_tokens,
        "selected_tokens": config.selected_tokens * factor,
        "stage_chunks": [s.chunk_size for s in config.stages],
        "stage_keeps": [s.keep_tokens * factor for s in config.stages],
        "pruning_rope": pruning_rope,
        "remap_beyond_tokens": remap_beyond_tokens(config),
        "refresh_intervals": list(config.refresh_intervals),
        "first_probes": config.first_probe_parts,
        "exact_probe_blocks": config.exact_probe_query_blocks,
        "first_stage_blocks": config.first_stage_query_blocks,
        "per_kv_head": config.selection_scope == "kv_head",
    }
