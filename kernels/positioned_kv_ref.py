"""Keys and values of a decode selection, gathered once and re-positioned: the executable spec.

A decode step attends the sinks, the selected 8-key blocks and the sliding window
(``block_sparse_attention_ref``). Between two refreshes of the selection the blocks stay the same,
and under RoPE renumbering so does every sink and selected key's position relative to the window's
start. Gathering and rotating those keys at every step (``sparse_decode``) costs a trigonometric
pair per key element and a dependent index load per tile; most of a cached step's time at 1M keys.
Instead a refresh writes them once, in slot order (sinks, then the selected keys), rotated to the
positions they take when the window starts at ``win_lo``:

    positioned = position_selected_kv_ref(k, v, blocks, q_positions, ...)

and each later step attends ``positioned`` plus the window keys read in place
(``positioned_decode_ref``). If the window has started to move since (``win_lo`` now > then),
every positioned key would turn by the same ``turn = win_lo_now - win_lo``: the query is turned by
``-turn`` for those keys instead (rotations are orthogonal), one rotation per query row.

Slots that the attention could never show (empty blocks, keys past S_K, selected keys among the
sinks) get key index -1. Valid for later steps of the same sequence while S_K holds at least
``sink_tokens`` keys or has not grown (the number of sinks fixes every slot's position).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ihip_compile.kernels.block_sparse_attention_ref import attention_block_plan, slot_keys
from ihip_compile.kernels.rope_delta_ref import rotate_by_delta


@dataclass
class PositionedKV:
    """Sinks and selected keys of one decode selection per sequence, in slot order."""

    k: torch.Tensor  # [B, H_KV, N, D] rotated to the renumbered positions of ``win_lo``
    v: torch.Tensor  # [B, H_KV, N, D]
    keys: torch.Tensor  # [B, N] int32 key index of each slot, -1 for slots never attended
    win_lo: torch.Tensor  # [B] int32 window start the rotations assume
    sinks: int  # sink slots at the front (min(sink_tokens, S_K) when positioned)

    def matches(self, s_k: int, sink_tokens: int) -> bool:
        """Whether a step over ``s_k`` keys lays out the same sink slots."""
        return self.sinks == min(sink_tokens, s_k)


def decode_window_start(q_positions, batch: int, sink_tokens: int, window_tokens: int):
    """``(win_lo, win_len)`` [B] int32 of one query per row (``attention_block_plan``)."""
    pos = q_positions.reshape(-1, 1).expand(batch, 1).long()
    empty = torch.zeros((batch, 1), dtype=torch.int32, device=pos.device)
    win_lo, win_len, _ = attention_block_plan(pos, pos, empty, sink_tokens, window_tokens)
    return win_lo[:, 0], win_len[:, 0]


def check_positioning_inputs(k, v, block_indices, q_positions) -> None:
    b = k.shape[0]
    if k.dim() != 4 or k.shape != v.shape:
        raise ValueError(f"k and v must be [B, H_KV, S_K, D] of one shape, got {tuple(k.shape)} "
                         f"and {tuple(v.shape)}")
    if block_indices.dim() != 3 or tuple(block_indices.shape[:2]) != (b, 1):
        raise ValueError(f"block_indices must be [B={b}, 1, TOPK], got "
                         f"{tuple(block_indices.shape)}")
    if not (k.device == v.device == block_indices.device == q_positions.device):
        raise ValueError(f"k, v, block_indices and q_positions must be on one device, got "
                         f"{k.device}, {v.device}, {block_indices.device}, {q_positions.device}")
    if q_positions.numel() not in (1, b) or q_positions.is_floating_point():
        raise ValueError(f"q_positions must be an integer [B={b}, 1] or [1] tensor, got "
                         f"{q_positions.dtype} {tuple(q_positions.shape)}")


def position_selected_kv_ref(
    k, v, block_indices, q_positions, *, sink_tokens: int, window_tokens: int,
    block_size_k: int = 8, inv_freq, rotary_dim: int, rope_layout: int,
) -> PositionedKV:
    """Gather and re-position the sinks and selected blocks that a query at ``q_positions``
    attends with ``block_indices`` [B, 1, TOPK] (the renumbering of ``sparse_decode``)."""
    check_positioning_inputs(k, v, block_indices, q_positions)
    b, s_k = k.shape[0], k.shape[2]
    win_lo, _ = decode_window_start(q_positions, b, sink_tokens, window_tokens)
    n_valid = (block_indices >= 0).sum(-1).to(torch.int32)
    sinks = min(sink_tokens, s_k)
    keys, ok, kind, delta = slot_keys(block_indices, win_lo[:, None], win_lo[:, None] * 0,
                                      n_valid, sinks, block_size_k, 0, s_k)
    keys, ok, delta = keys[:, 0], ok[:, 0], delta[:, 0]  # [B, N]
    ok = ok & ((kind == 0) | (keys >= sink_tokens))
    batch = torch.arange(b, device=k.device)[:, None]
    k_sel = k.transpose(1, 2)[batch, keys].transpose(1, 2)  # [B, H_KV, N, D]
    v_sel = v.transpose(1, 2)[batch, keys].transpose(1, 2)
    k_sel = rotate_by_delta(k_sel, delta[:, None], inv_freq, rotary_dim, rope_layout)
    shown = ok[:, None, :, None]  # rows of slots never attended are zeros
    k_sel, v_sel = k_sel.masked_fill(~shown, 0), v_sel.masked_fill(~shown, 0)
    return PositionedKV(k_sel, v_sel, torch.where(ok, keys, -1).to(torch.int32), win_lo, sinks)
