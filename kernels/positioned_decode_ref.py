"""Decode attention over positioned sinks and selected keys plus the window: the executable spec.

``positioned`` (``positioned_kv_ref``) holds the sinks and the selected keys in slot order,
rotated for a window starting at ``positioned.win_lo``; the window keys are read from ``k``/``v``
in place (at their true positions, as renumbering leaves them). With this step's window start
``win_lo`` and ``turn = win_lo - positioned.win_lo``, the query meets the positioned keys turned
by ``-turn``. Visibility
and the softmax are those of ``block_sparse_attention_ref`` for one query, so

    positioned_decode_ref(q, k, v, position_selected_kv_ref(k, v, blocks, p0, ...), p, ...)
        == sparse_decode_ref(q, k, v, blocks, p, remap=True, ...)   (up to rounding)

for a later step p >= p0 of the same sequence (the same sink count).
"""

from __future__ import annotations

import torch

from ihip_compile.kernels.positioned_kv_ref import PositionedKV, decode_window_start
from ihip_compile.kernels.rope_delta_ref import rotate_by_delta


def check_positioned_decode_inputs(q, k, positioned: PositionedKV, sink_tokens: int) -> None:
    b, h, s_q, d = q.shape
    if s_q != 1:
        raise ValueError(f"positioned decode takes one query token (S_Q == 1), got S_Q={s_q}")
    h_kv, n = k.shape[1], positioned.keys.shape[1]
    if tuple(positioned.k.shape) != (b, h_kv, n, d):
        raise ValueError(f"positioned keys must be [B={b}, H_KV={h_kv}, N={n}, D={d}], got "
                         f"{tuple(positioned.k.shape)}")
    if not positioned.matches(k.shape[2], sink_tokens):
        raise ValueError(f"positioned with {positioned.sinks} sink slots, but {k.shape[2]} keys "
                         f"and sink_tokens={sink_tokens} lay out {min(sink_tokens, k.shape[2])}: "
                         "position the selection again")


def positioned_decode_ref(
    q, k, v, positioned: PositionedKV, q_positions=None, *, scale: float, sink_tokens: int,
    window_tokens: int, softcap: float = 0.0, inv_freq, rotary_dim: int, rope_layout: int,
    num_splits=None,
):
    """q [B, H, 1, D]; k, v [B, H_KV, S_K, D]; q_positions [B, 1] or [1] (default S_K - 1)."""
    check_positioned_decode_inputs(q, k, positioned, sink_tokens)
    b, h, _, d = q.shape
    h_kv, s_k = k.shape[1], k.shape[2]
    if q_positions is None:
        q_positions = torch.full((b, 1), s_k - 1, device=q.device, dtype=torch.long)
    p = q_positions.reshape(-1, 1).expand(b, 1).long()  # [B, 1]
    win_lo, win_len = decode_window_start(q_positions, b, sink_tokens, window_tokens)
    turn = (win_lo - positioned.win_lo).view(b, 1, 1)
    q_turned = rotate_by_delta(q, -turn, inv_freq, rotary_dim, rope_layout)
    offsets = torch.arange(int(win_len.max()) if b else 0, device=q.device)
    win_keys = win_lo.long()[:, None] + offsets  # [B, W]
    win_ok = (offsets < win_len.long()[:, None]) & (win_keys < s_k)
    batch = torch.arange(b, device=q.device)[:, None]
    safe = win_keys.clamp(0, max(s_k - 1, 0))
    k_win = k.transpose(1, 2)[batch, safe].transpose(1, 2)  # [B, H_KV, W, D]
    v_win = v.transpose(1, 2)[batch, safe].transpose(1, 2)

    acc = torch.promote_types(q.dtype, torch.float32)  # fp32, or fp64 for the fp64 stick
    group = h // h_kv

    def scores_of(query, keys):
        return torch.einsum("bkgd,bknd->bkgn", query.view(b, h_kv, group, d).to(acc), keys.to(acc))

    scores = torch.cat([scores_of(q_turned, positioned.k), scores_of(q, k_win)], -1) * scale
    if softcap > 0:
        scores = softcap * torch.tanh(scores / softcap)
    fixed = positioned.keys.long()  # [B, N]
    is_sink = torch.arange(fixed.shape[1], device=q.device) < positioned.sinks
    fixed_vis = (fixed >= 0) & (fixed <= p) & (is_sink | (fixed <= p - window_tokens))
    win_from = (p - window_tokens + 1).clamp(min=sink_tokens)
    win_vis = win_ok & (win_keys <= p) & (win_keys >= win_from)
    visible = torch.cat([fixed_vis, win_vis], -1)[:, None, None]
    scores = scores.masked_fill(~visible, float("-inf"))
    probs = torch.softmax(scores, -1).nan_to_num(0.0)  # a row with no visible key gives 0
    values = torch.cat([positioned.v, v_win], 2)
    out = torch.einsum("bkgn,bknd->bkgd", probs.to(v.dtype), values)
    return out.reshape(b, h, 1, d).to(q.dtype)
