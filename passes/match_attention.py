"""Find attention sites the op can replace exactly: SDPA calls and the eager attention pattern.

Matches   scaled_dot_product_attention(q, k, v, attn_mask=<causal mask subgraph> | None,
                                       is_causal=..., scale=..., enable_gqa=...)
          eager: matmul(q, k^T) * scale [/ cap, tanh, * cap] [+ additive causal mask]
                 -> softmax(dim=-1) [-> .to] [-> dropout(p=0 or training=False)] -> matmul(., v)
          K/V behind transformers' repeat_kv (x[:, :, None].expand(...).reshape(...)) are taken
          from before it: the op groups query heads itself (head h reads KV head h // group).
Emits     PassContext.sites (AttentionSite) and PassContext.skips (reason per node).
Skips     dropout > 0 or in training; no mask and is_causal=False (bidirectional, encoder,
          cross-attention); a mask that is not exactly causal (+ window, + padding), see
          read_mask; is_causal=True together with a mask or with S_Q != S_K (SDPA aligns such a
          mask top-left); intermediates used elsewhere (e.g. returned attention weights).
Order     first: match_rope and rewrite_attention work on the sites found here.
"""

from __future__ import annotations

import math
import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ihip_compile.passes.graph_facts import (
    DIV, MATMUL, MUL, SDPA, SOFTMAX, ADD, arg, is_full_slice, is_function, is_method, layer_index,
    only_user, same_size, shape, strip_passthrough,
)
from ihip_compile.passes.read_mask import MaskNotUnderstood, read_mask
from ihip_compile.passes.sites import AttentionSite, PassContext, Skip


class NotMatched(Exception):
    """This node is attention-like but not exactly understood; the message is the reason."""


def match_attention(gm: fx.GraphModule, context: PassContext) -> PassResult:
    order = 0
    for node in list(gm.graph.nodes):
        pattern = "sdpa" if is_function(node, *SDPA) else "eager" if _is_softmax(node) else None
        if pattern is None:
            continue
        layer = layer_index(node)
        try:
            site = _match_sdpa(node) if pattern == "sdpa" else _match_eager(node)
        except NotMatched as reason:
            context.skips.append(Skip(node.name, pattern, layer, str(reason)))
            continue
        site.layer, site.layer_source = (layer, "nn_module_stack") if layer is not None \
            else (order, "order in graph")
        order += 1
        context.sites.append(site)
    return PassResult(gm, False)


# --- SDPA --------------------------------------------------------------------------------------
def _match_sdpa(node: fx.Node) -> AttentionSite:
    q, k, v = (arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    mask = arg(node, 3, "attn_mask")
    dropout = arg(node, 4, "dropout_p", 0.0)
    is_causal = arg(node, 5, "is_causal", False)
    scale = arg(node, 6, "scale")
    if not isinstance(dropout, (int, float)) or dropout != 0.0:
        raise NotMatched(f"dropout_p={dropout} (only 0 is exact)")
    if not isinstance(is_causal, bool):
        raise NotMatched(f"is_causal is not a constant ({is_causal})")
    q_shape, k_shape = shape(q), shape(k)
    if q_shape is None or k_shape is None or len(q_shape) != 4 or len(k_shape) != 4:
        raise NotMatched("q or k is not a 4-D [B, H, S, D] tensor")
    if scale is None:
        scale = 1.0 / math.sqrt(q_shape[-1]) if isinstance(q_shape[-1], int) else None
    if not isinstance(scale, (int, float)):
        raise NotMatched(f"scale is not a constant ({scale})")
    k_base, v_base, stripped = _strip_repeat_kv(k), _strip_repeat_kv(v), False
    if k_base is not k or v_base is not v:
        if k_base is k or v_base is v:
            raise NotMatched("repeat_kv on only one of K and V")
        stripped = True
    _check_heads(q_shape, shape(k_base))
    s_q, s_k = q_shape[2], k_shape[2]
    if mask is None:
        if not is_causal:
            raise NotMatched("no mask and is_causal=False: bidirectional (encoder or "
                             "cross-attention)")
        if not same_size(s_q, s_k):
            raise NotMatched("is_causal=True with S_Q != S_K (SDPA aligns it top-left)")
        description = None
    else:
        if is_causal:
            raise NotMatched("both attn_mask and is_causal=True")
        try:
            description = read_mask(mask, s_q, s_k)
        except MaskNotUnderstood as reason:
            raise NotMatched(str(reason)) from None
    return AttentionSite(
        node=node, pattern="sdpa", layer=-1, layer_source="", q=q, k=k_base, v=v_base,
        scale=float(scale), softcap=0.0, mask=description, stripped_repeat_kv=stripped,
    )


def _check_heads(q_shape: tuple, k_shape: tuple | None) -> None:
    if k_shape is None or len(k_shape) != 4:
        raise NotMatched("key is not a 4-D [B, H_KV, S_K, D] tensor")
    h, h_kv = q_shape[1], k_shape[1]
    if not (isinstance(h, int) and isinstance(h_kv, int) and h_kv > 0 and h % h_kv == 0):
        raise NotMatched(f"query heads {h} not a multiple of key heads {h_kv}")


def _strip_repeat_kv(x: Any) -> Any:
    """x[:, :, None, :, :].expand(B, H_KV, G, S, D).reshape(B, H_KV * G, S, D) -> x."""
    if not is_method(x, "reshape"):
        return x
    expand = x.args[0]
    if not (is_method(expand, "expand") and len(expand.users) == 1):
        return x
    unsqueeze = expand.args[0]
    if not is_function(unsqueeze, operator.getitem):
        return x
    source, index = unsqueeze.args
    expected = (True, True, None, True, True)
    if not (isinstance(index, tuple) and len(index) == 5 and all(
        (e is None and i is None) or (e and is_full_slice(i)) for e, i in zip(expected, index)
    )):
        return x
    src, out = shape(source), shape(x)
    if src is None or out is None or len(src) != 4 or len(out) != 4:
        return x
    group_sizes = expand.args[1:] if len(expand.args) > 2 else expand.args[1]
    if len(group_sizes) != 5 or not same_size(group_sizes[1], src[1]):
        return x
    if not (same_size(out[2], src[2]) and same_size(out[3], src[3])):
        return x
    return source


# --- eager -------------------------------------------------------------------------------------
def _is_softmax(node: fx.Node) -> bool:
    """A softmax over [B, H, S_Q, S_K] scores (router or output softmaxes are not candidates)."""
    found = is_function(node, *SOFTMAX) or is_method(node, "softmax")
    return found and len(shape(node) or ()) == 4


def _match_eager(softmax: fx.Node) -> AttentionSite:
    dim = arg(softmax, 1, "dim")
    if dim not in (-1, 3):
        raise NotMatched(f"softmax over dim {dim}, not the key dim")
    output = _after_softmax(softmax)
    v = output.args[1]
    scores, mask = softmax.args[0], None
    if is_function(scores, *ADD) and only_user(scores) is softmax:
        scores, mask = scores.args
    scores, softcap = _strip_softcap(scores)
    if not (is_function(scores, *MUL) and isinstance(scores.args[1], (int, float))):
        raise NotMatched("scores are not matmul(q, k^T) * constant scale")
    scale = float(scores.args[1])
    product = scores.args[0]
    if not (is_function(product, *MATMUL) and len(product.users) == 1):
        raise NotMatched("scores are not a private matmul(q, k^T)")
    q, k_t = product.args
    if not (is_method(k_t, "transpose") and tuple(k_t.args[1:]) in ((2, 3), (-1, -2), (-2, -1))):
        raise NotMatched("key is not transposed as k.transpose(2, 3)")
    k = k_t.args[0]
    k_base, v_base = _strip_repeat_kv(k), _strip_repeat_kv(v)
    if (k_base is k) != (v_base is v):
        raise NotMatched("repeat_kv on only one of K and V")
    q_shape, k_shape = shape(q), shape(k)
    if q_shape is None or k_shape is None or len(q_shape) != 4:
        raise NotMatched("q or k is not a 4-D [B, H, S, D] tensor")
    _check_heads(q_shape, shape(k_base))
    if mask is None:
        raise NotMatched("eager attention without a mask: bidirectional")
    try:
        description = read_mask(_strip_key_slice(mask, k_shape[2]), q_shape[2], k_shape[2])
    except MaskNotUnderstood as reason:
        raise NotMatched(str(reason)) from None
    if description.kind != "additive":
        raise NotMatched("eager attention adds a boolean mask")
    return AttentionSite(
        node=output, pattern="eager", layer=-1, layer_source="", q=q, k=k_base, v=v_base,
        scale=scale, softcap=softcap, mask=description, stripped_repeat_kv=k_base is not k,
    )


def _after_softmax(softmax: fx.Node) -> fx.Node:
    """Follow softmax -> [.to] -> [dropout(p=0)] -> matmul(probs, v); return the matmul."""
    node = softmax
    while True:
        user = only_user(node)
        if user is None:
            raise NotMatched("attention weights are used more than once (e.g. returned)")
        if is_method(user, "to", "type_as"):
            node = user
            continue
        if is_function(user, torch.nn.functional.dropout):
            p, training = arg(user, 1, "p", 0.5), arg(user, 2, "training", True)
            if p != 0.0 and training is not False:
                raise NotMatched(f"dropout p={p} in training mode")
            node = user
            continue
        if is_function(user, *MATMUL) and user.args[0] is node:
            return user
        raise NotMatched(f"softmax output feeds {user.format_node()}, not matmul(probs, v)")


def _strip_softcap(scores: fx.Node) -> tuple[fx.Node, float]:
    """cap * tanh(x / cap) -> (x, cap); anything else -> (scores, 0)."""
    if not (is_function(scores, *MUL) and isinstance(scores.args[1], (int, float))):
        return scores, 0.0
    tanh = scores.args[0]
    if not (is_function(tanh, torch.tanh) or is_method(tanh, "tanh")):
        return scores, 0.0
    div = tanh.args[0]
    cap = float(scores.args[1])
    if is_function(div, *DIV) and div.args[1] == cap and cap > 0:
        return div.args[0], cap
    raise NotMatched("tanh soft-cap with mismatched divisor and multiplier")


def _strip_key_slice(mask: fx.Node, s_k: Any) -> fx.Node:
    """``mask[:, :, :, :S_K]`` (older eager code) is only a view when it keeps all S_K keys."""
    mask = strip_passthrough(mask)
    if is_function(mask, operator.getitem):
        source, index = mask.args
        if isinstance(index, tuple) and len(index) == 4 and all(map(is_full_slice, index[:3])):
            last = index[3]
            src = shape(source)
            if isinstance(last, slice) and last.start is None and last.step is None \
                    and src is not None and same_size(src[3], s_k):
                return source
    return mask
