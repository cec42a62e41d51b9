"""The packed-sequence predicate of transformers 5.17 (``use_cache=False`` without an attention
mask): read as "always true" only when the positions are provably consecutive in every row."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from pass_graphs import compile_and_run, qkv


def _mask_with_sequence_ids(positions: torch.Tensor, s: int, window: int = 0) -> torch.Tensor:
    """The shape of transformers 5.17's in-graph mask with its packed-sequence predicate."""
    first = positions[:, :1] - 1
    ids = (torch.diff(positions, prepend=first, dim=-1) != 1).cumsum(-1)
    batch = torch.arange(positions.shape[0])[:, None, None, None]
    q_idx = torch.arange(s)[None, None, :, None]
    kv_idx = torch.arange(s)[None, None, None, :]
    mask = kv_idx <= q_idx
    if window:
        mask = mask & (kv_idx > q_idx - window)
    return mask & (ids[batch, q_idx] == ids[batch, kv_idx])


def _assert_left_dense(attend, *args, because: str):
    out, ref, result = compile_and_run(attend, *args)
    assert not result.context.rewrites
    assert because in result.context.skips[0].reason, result.context.skips
    torch.testing.assert_close(out, ref)


def test_consecutive_positions_are_rewritten():
    def attend(q, k, v):
        s = q.shape[2]
        positions = (torch.arange(s) + 0).unsqueeze(0).expand(q.shape[0], -1)
        mask = _mask_with_sequence_ids(positions, s, window=4)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    out, ref, result = compile_and_run(attend, *qkv(kv_heads=4))
    (rewrite,) = result.context.rewrites
    assert rewrite.model_window == 4
    assert "_operator.eq" not in result.ops_after and "torch.diff" not in result.ops_after
    torch.testing.assert_close(out, ref)


def test_position_ids_from_the_caller_stay_dense():
    """Two sequences packed into each row: the mask is block-diagonal, not causal."""
    def attend(q, k, v, positions):
        mask = _mask_with_sequence_ids(positions, q.shape[2])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    packed = torch.tensor([[0, 1, 2, 0, 1, 2], [0, 1, 0, 1, 2, 3]])
    _assert_left_dense(attend, *qkv(kv_heads=4), packed, because="packed sequences")


def test_look_alike_with_restarting_in_graph_positions_stays_dense():
    """Same ops as the transformers predicate, but the in-graph positions restart (arange % 3):
    the ids really separate sequences and a rewrite would attend across them."""
    def attend(q, k, v):
        s = q.shape[2]
        positions = (torch.arange(s) % 3).unsqueeze(0).expand(q.shape[0], -1)
        mask = _mask_with_sequence_ids(positions, s)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    _assert_left_dense(attend, *qkv(kv_heads=4), because="not arange(S) + offset")


def test_look_alike_counting_other_steps_stays_dense():
    """Consecutive positions, but the ids count steps != 2: every step starts a new sequence."""
    def attend(q, k, v):
        s = q.shape[2]
        positions = torch.arange(s).unsqueeze(0).expand(q.shape[0], -1)
        ids = (torch.diff(positions, prepend=positions[:, :1] - 1, dim=-1) != 2).cumsum(-1)
        batch = torch.arange(q.shape[0])[:, None, None, None]
        q_idx = torch.arange(s)[None, None, :, None]
        kv_idx = torch.arange(s)[None, None, None, :]
        mask = (kv_idx <= q_idx) & (ids[batch, q_idx] == ids[batch, kv_idx])
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)

    _assert_left_dense(attend, *qkv(kv_heads=4), because="steps != 1")
