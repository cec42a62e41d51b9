"""Selection scope: one block selection per layer, or one per KV head.

The selection and attention kernels take one block list per sequence, shared by that sequence's
heads (a chunk's score is the max over them). The scope decides what a "sequence" is:
    layer     (default) the whole layer: one selection from the scores of all heads;
    kv_head   every KV head with the GROUP query heads that share it is a sequence of its own,
              so a KV head's keys are chosen from its own heads' scores only.
Under tensor parallelism a rank holds whole KV heads, so with ``kv_head`` it selects exactly what
one GPU selects for them (the op is invariant under head sharding); with ``layer`` it selects
from its local heads' scores, a different selection. ``kv_head`` costs more selection work at
prefill (H_KV lists per query block instead of one; see docs/tensor_parallel.md).

Folding into ``groups`` sequences per batch row (1 for ``layer``, H_KV for ``kv_head``):
    q [B, H, S_Q, D] -> [B * groups, H / groups, S_Q, D]   k, v likewise with H_KV
    positions [B, S_Q] -> [B * groups, S_Q]                 blocks [B * groups, ...] <-> [B, groups, ...]
Query head h reads KV head h // GROUP (the GQA convention), so the fold is a reshape: a view for
contiguous caches and decode queries, a copy only for strided inputs (e.g. a prefill's q).
"""

from __future__ import annotations

import torch


def selection_groups(kv_heads: int, per_kv_head: bool) -> int:
    """Sequences per batch row that select on their own."""
    return kv_heads if per_kv_head else 1


def fold_heads(t: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, N, S, D] with N a multiple of ``groups`` -> [B * groups, N / groups, S, D]."""
    if not isinstance(t, torch.Tensor):  # keys read where they lie: host_keys, bank_kv
        return t.fold(groups)
    b, n = t.shape[:2]
    return t.reshape(b * groups, n // groups, *t.shape[2:])


def fold_positions(positions: torch.Tensor, groups: int) -> torch.Tensor:
    """[B, S_Q] -> [B * groups, S_Q]: every group of a row sees its queries' positions."""
    return positions.repeat_interleave(groups, dim=0) if groups > 1 else positions


def fold_query_positions(q_positions: torch.Tensor, batch: int, s_q: int,
                         groups: int) -> torch.Tensor:
    """The op's query positions ([S_Q] or [B, S_Q]) as the kernels' [B * groups, S_Q]."""
    pos = q_positions if q_positions.dim() == 2 else q_positions.unsqueeze(0)
    return fold_positions(pos.expand(batch, s_q), groups)


def fold_inputs(q, k, v, q_positions, per_kv_head: bool):
    """The op's inputs as the kernels' sequences: (q, k, v, positions [B * G, S_Q], G)."""
    groups = selection_groups(k.shape[1], per_kv_head)
    pos = fold_query_positions(q_positions.to(q.device), q.shape[0], q.shape[2], groups)
    return fold_heads(q, groups), fold_heads(k, groups), fold_heads(v, groups), pos, groups


def unfold_heads(t: torch.Tensor, batch: int) -> torch.Tensor:
    """[B * groups, N / groups, ...] -> [B, N, ...] (attention outputs back to query heads)."""
    return t.reshape(batch, -1, *t.shape[2:])


def per_group(t: torch.Tensor, batch: int) -> torch.Tensor:
    """[B * groups, ...] -> [B, groups, ...] (block lists and stage outputs, for callers)."""
    return t.view(batch, -1, *t.shape[1:])


def per_sequence(t: torch.Tensor) -> torch.Tensor:
    """[B, groups, ...] -> [B * groups, ...]: the inverse of ``per_group``."""
    return t.flatten(0, 1)
