"""A transformers attention function that calls ``torch.ops.ihip.attention`` directly.

It lets the tensor-parallel tests run our op on each rank's local heads without going through
the graph passes: a failure here is the op's, a failure only under ``backend="infinitehip"`` is the
backend's. Registered under ``OP_ATTENTION`` with transformers' ``AttentionInterface``; select it
with ``attn_implementation=OP_ATTENTION``.

Supported: unpadded batches under a plain causal mask (prefill and decode). Anything else raises,
because the compact mask description below would silently differ from the mask transformers built.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

import ihip_compile.kernels.ops  # noqa: F401  (registers torch.ops.ihip.*)

OP_ATTENTION = "ihip_op_direct"


def ihip_op_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                      **kwargs):
    """query [B, H, S_Q, D], key/value [B, H_KV, S_K, D] -> ([B, S_Q, H, D_V], None)."""
    s_q, s_k = query.shape[-2], key.shape[-2]
    q_positions = torch.arange(s_k - s_q, s_k, device=query.device)  # [S_Q]
    _check_plain_causal(attention_mask, q_positions, s_k)
    if dropout:
        raise ValueError(f"{OP_ATTENTION} is inference-only: dropout must be 0, got {dropout}")
    scale = float(scaling if scaling is not None else query.shape[-1] ** -0.5)
    kwargs = dict(module.ihip_op_kwargs)
    groups = kwargs.pop("head_groups", 1)
    if key.shape[1] % groups:
        raise ValueError(f"head_groups ({groups}) must divide the KV heads ({key.shape[1]})")
    # head_groups=N calls the op once per contiguous slice of heads: what each of N tensor-parallel
    # ranks does with its local heads (colwise q/k/v projections give rank r the r-th slice).
    outs = [
        torch.ops.ihip.attention(
            q, k, v, q_positions, None, None, layer=module.layer_idx, scale=scale, **kwargs
        )
        for q, k, v in zip(query.chunk(groups, 1), key.chunk(groups, 1), value.chunk(groups, 1))
    ]
    return torch.cat(outs, dim=1).transpose(1, 2).contiguous(), None


def _check_plain_causal(attention_mask, q_positions, s_k):
    if attention_mask is None:
        return
    if attention_mask.dtype != torch.bool:
        visible = attention_mask == 0
    else:
        visible = attention_mask
    expected = torch.arange(s_k, device=q_positions.device)[None, :] <= q_positions[:, None]
    if visible.shape[-2:] != expected.shape or not bool((visible == expected).all()):
        raise ValueError(
            f"{OP_ATTENTION} handles only unpadded causal attention; got a mask of shape "
            f"{tuple(attention_mask.shape)} that is not the causal one"
        )


def install(model, op_kwargs: dict) -> None:
    """Route ``model``'s attention layers through the op, with ``op_kwargs`` as its scalars."""
    AttentionInterface.register(OP_ATTENTION, ihip_op_attention)
    # Without a mask function of its own, transformers passes no mask at all to a custom
    # attention: SDPA's mask lets _check_plain_causal see padding instead of ignoring it.
    AttentionMaskInterface.register(OP_ATTENTION, sdpa_mask)
    layers = [m for m in model.modules() if hasattr(m, "layer_idx") and hasattr(m, "o_proj")]
    if not layers:
        raise ValueError(f"{type(model).__name__} has no attention layers with a layer_idx")
    for layer in layers:
        layer.ihip_op_kwargs = dict(op_kwargs)
    model.set_attn_implementation(OP_ATTENTION)
