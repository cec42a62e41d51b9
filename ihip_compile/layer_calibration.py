"""Calibration: pick each layer's pruning RoPE style and budget from its measured attention.

InfiniteHiP fixes the choice by layer index (the first 3 layers get chunk-indexed pruning RoPE
and twice the budget). Layers differ between models, so this measures instead. On one sample
prompt, run densely, the exact attention of the last ``probe_blocks`` query blocks of every layer
is compared with what the sparse selection (the op's own ``select_blocks`` reference, with RoPE
remapped as beyond the training window) would keep:

    recall(layer, style, factor) = attention mass on the selected keys
                                   / attention mass on all selectable keys
    (selectable: neither sink nor in the sliding window; mass averaged over queries and heads)

Decisions, with the paper's total cost kept:
    style    per layer, the one of ("relative", "chunk_indexed") with the higher recall at the
             normal budget (ties: relative, the cheaper default);
    budget   the ``len(config.wide_layers)`` layers whose recall gains most from twice the
             budget get budget factor 2, the rest 1.

The measurement sees q and k after the model's RoPE (transformers' attention interface hands
them over rotated), exactly as the op does. The prompt must be long enough that each probed
block has selectable keys beyond its window: more than ``sink + window + selected`` tokens.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from ihip_compile.config import IHipConfig, LayerChoice
from ihip_compile.hf_attention import routed_attention

STYLES = ("relative", "chunk_indexed")
_REGISTERED_NAME = "ihip_calibrate"


@dataclasses.dataclass(frozen=True)
class LayerMeasurement:
    """Recall of the selection per (style, budget factor), and the selectable attention mass."""

    layer: int
    recall: dict[tuple[str, int], float]
    selectable_mass: float


def model_rope(model: Any) -> tuple[torch.Tensor, int, int]:
    """(inv_freq, rotary_dim, rope_layout) of a transformers model's RoPE.

    ``inv_freq`` is the rotary module's own buffer, so every scaling type transformers implements
    (linear, dynamic, llama3, yarn, ...) is already folded in; yarn's attention factor multiplies
    cos and sin and therefore already sits in the rotated q and k, which re-rotation preserves.
    """
    from ihip_compile.kernels.rope_delta_ref import ROPE_INTERLEAVED, ROPE_ROTATE_HALF

    for module in model.modules():
        inv_freq = getattr(module, "inv_freq", None)
        if isinstance(inv_freq, torch.Tensor):
            model_type = getattr(getattr(model, "config", None), "model_type", "")
            layout = ROPE_INTERLEAVED if model_type in ("gptj", "codegen") else ROPE_ROTATE_HALF
            return inv_freq, 2 * inv_freq.numel(), layout
    raise ValueError(
        f"{type(model).__name__} has no rotary module with an inv_freq buffer: calibration and "
        "RoPE remapping need a RoPE model"
    )


def calibrate(
    model: Any, input_ids: torch.Tensor, config: IHipConfig, *, probe_blocks: int = 4
) -> IHipConfig:
    """``config`` with ``layer_policy="calibrated"`` and per-layer choices measured on a sample."""
    measurements = measure_layers(model, input_ids, config, probe_blocks=probe_blocks)
    return dataclasses.replace(
        config, layer_policy="calibrated",
        calibrated_layers=choose_layers(measurements, wide_count=len(config.wide_layers)),
    )


def choose_layers(measurements: list[LayerMeasurement], wide_count: int) -> tuple[LayerChoice, ...]:
    """The decision rule of the module docstring, from measured recalls."""
    styles = {}
    gains = {}
    for m in measurements:
        style = max(STYLES, key=lambda s: (m.recall[(s, 1)], s == "relative"))
        styles[m.layer] = style
        gains[m.layer] = m.recall[(style, 2)] - m.recall[(style, 1)]
    wide = set(sorted(gains, key=lambda layer: (-gains[layer], layer))[:wide_count])
    return tuple(
        LayerChoice(layer, styles[layer], 2 if layer in wide else 1) for layer in sorted(styles)
    )


def measure_layers(
    model: Any, input_ids: torch.Tensor, config: IHipConfig, *, probe_blocks: int = 4
) -> list[LayerMeasurement]:
    """One dense forward over ``input_ids`` [1, S]; per layer, recalls of the sparse selection."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids must be [1, S], got {tuple(input_ids.shape)}")
    seq = input_ids.shape[1]
    needed = config.sink_tokens + config.sliding_window_tokens + config.selected_tokens
    if seq <= needed + probe_blocks * config.block_size_q:
        raise ValueError(
            f"calibration prompt of {seq} tokens is too short: it needs more than sink + window + "
            f"selected + probed queries = {needed + probe_blocks * config.block_size_q} tokens"
        )
    rope = model_rope(model)
    found: dict[int, LayerMeasurement] = {}

    def record(module, query, key, value, attention_mask, **kwargs):
        from transformers.integrations.sdpa_attention import sdpa_attention_forward

        layer = getattr(module, "layer_idx", None)
        if layer is None:
            raise ValueError(f"{type(module).__name__} has no layer_idx: cannot calibrate it")
        found[layer] = _measure_one(layer, query, key, kwargs.get("scaling"), config, rope,
                                    probe_blocks)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)

    with routed_attention(model, _REGISTERED_NAME, record), torch.no_grad():
        model(input_ids, use_cache=False, logits_to_keep=1)
    return [found[layer] for layer in sorted(found)]


def _measure_one(layer, q, k, scale, config, rope, probe_blocks) -> LayerMeasurement:
    from ihip_compile.kernels.block_selection import select_blocks
    from ihip_compile.kernels.selection_scope import (
        fold_heads, fold_positions, selection_groups,
    )
    from ihip_compile.kernels.prune_stage_ref import (
        PRUNE_ROPE_CHUNK_INDEXED, PRUNE_ROPE_RELATIVE,
    )

    inv_freq, rotary_dim, layout = rope
    seq = k.shape[2]
    probe = probe_blocks * config.block_size_q
    q_probe = q[:, :, seq - probe:].float()  # [1, H, probe, D]
    positions = torch.arange(seq - probe, seq, device=q.device)
    groups = selection_groups(k.shape[1], config.selection_scope == "kv_head")
    mass = _selectable_mass(q_probe, k.float(), positions, scale, config, groups)  # [G, NQB, S_K]
    modes = {"relative": PRUNE_ROPE_RELATIVE, "chunk_indexed": PRUNE_ROPE_CHUNK_INDEXED}
    recall = {}
    for style, mode in modes.items():
        for factor in (1, 2):
            blocks = select_blocks(
                fold_heads(q_probe, groups), fold_heads(k.float(), groups),
                fold_positions(positions[None], groups), block_size_q=config.block_size_q,
                sink_tokens=config.sink_tokens, window_tokens=config.sliding_window_tokens,
                selected_tokens=config.selected_tokens * factor,
                stage_chunks=[s.chunk_size for s in config.stages],
                stage_keeps=[s.keep_tokens * factor for s in config.stages],
                rope_mode=mode, inv_freq=inv_freq.to(q.device), rotary_dim=rotary_dim,
                rope_layout=layout, use_triton=False, first_probes=config.first_probe_parts,
                first_stage_blocks=config.first_stage_query_blocks,
            )  # [G, NQB, TOPK]
            kept = _blocks_to_key_mask(blocks, config.block_size_k, seq)
            recall[(style, factor)] = float(
                (mass * kept).sum() / mass.sum().clamp_min(1e-30)
            )
    return LayerMeasurement(layer, recall, float(mass.sum(-1).mean()))


def _selectable_mass(q, k, positions, scale, config, groups) -> torch.Tensor:
    """[G, NQB, S_K]: exact attention mass per key, averaged over a block's queries and the query
    heads of each selection group (all heads, or one KV head's), zero outside the selectable range
    (sinks and each query's window excluded)."""
    h, h_kv = q.shape[1], k.shape[1]
    k = k.repeat_interleave(h // h_kv, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = torch.einsum("bhqd,bhkd->bhqk", q, k) * scale
    keys = torch.arange(k.shape[2], device=q.device)
    visible = keys[None, :] <= positions[:, None]
    probs = scores.masked_fill(~visible, float("-inf")).softmax(-1)[0]  # [H, probe, S_K]
    selectable = (keys[None, :] >= config.sink_tokens) & (
        keys[None, :] <= positions[:, None] - config.sliding_window_tokens
    )
    probs = probs * selectable
    return probs.view(groups, h // groups, -1, config.block_size_q, k.shape[2]).mean((1, 3))


def _blocks_to_key_mask(blocks: torch.Tensor, block_size_k: int, seq: int) -> torch.Tensor:
    """[..., TOPK] block indices (-1 empty) -> [..., S_K] float 0/1 of the keys they cover."""
    kept = torch.zeros(*blocks.shape[:-1], seq + block_size_k, device=blocks.device)
    keys = blocks.long()[..., None] * block_size_k + torch.arange(block_size_k, device=blocks.device)
    keys = torch.where(blocks[..., None] < 0, seq, keys).flatten(-2)
    kept.scatter_(-1, keys, 1.0)
    return kept[..., :seq]

