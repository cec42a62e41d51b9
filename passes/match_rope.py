"""Describe how each attention site's query was rotated (RoPE), so the op can re-position keys.

Matches   (on the query that reaches each site found by match_attention, through layout-only ops)
          _pattern_hf_rotate_half:  q * cos + cat(-q[..., h:], q[..., :h]) * sin, optionally on
                                    q[..., :rotary_dim] and re-joined with cat(rot, q[..., rd:])
                                    (partial rotary: Phi-3, GPT-NeoX)
          _pattern_complex_pairs:   view_as_real(view_as_complex(q.reshape(..., -1, 2)) * freqs)
                                    .flatten(3) (interleaved pairs, hand-written Llama code)
          and the frequencies: the 1-D ``inv_freq`` feeding ``inv_freq @ position_ids`` (or a
          broadcast multiply) under cos/sin, or a complex freqs_cis table, whose angle at
          position 1 is inv_freq.
Emits     AttentionSite.rope = RopeSite(layout, rotary_dim, inv_freq node or None, source).
Skips     nothing is rewritten here; an unrecognised rotation gives rope_layout=0 (none found),
          frequencies that cannot be traced give inv_freq=None, and the report says which.
Order     after match_attention, before rewrite_attention.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ihip_compile.passes.graph_facts import (
    ADD, CAT, MATMUL, MUL, NEG, arg, is_full_slice, is_function, is_method, shape, value,
)
from ihip_compile.passes.sites import ROPE_INTERLEAVED, ROPE_ROTATE_HALF, PassContext, RopeSite

_LAYOUT_ONLY = ("contiguous", "to", "type_as", "float")


def match_rope(gm: fx.GraphModule, context: PassContext) -> PassResult:
    for site in context.sites:
        site.rope = describe_rope(site.q)
    return PassResult(gm, False)


def describe_rope(q: fx.Node) -> RopeSite | None:
    node = _strip_layout(q)
    for pattern in (_pattern_hf_rotate_half, _pattern_complex_pairs):
        found = pattern(node)
        if found is not None:
            return found
    return None


def _strip_layout(node: Any) -> Any:
    """Walk up through casts and transposes that keep the head-dim channels in place."""
    while True:
        if is_method(node, *_LAYOUT_ONLY):
            node = node.args[0]
        elif is_method(node, "transpose") and not {-1, 3} & set(node.args[1:]):
            node = node.args[0]
        else:
            return node


# --- rotate_half -------------------------------------------------------------------------------
def _pattern_hf_rotate_half(node: Any) -> RopeSite | None:
    head_dim = (shape(node) or (None,))[-1]
    rotated, rotary_dim = node, head_dim
    if is_function(node, *CAT) and _cat_dim(node) in (-1, 3) and len(node.args[0]) == 2:
        rot, passed = node.args[0]
        rd = _slice_bound(passed, start=True)
        if rd is None:
            return None
        rotated, rotary_dim = rot, rd
    found = _rotate_half_terms(rotated)
    if found is None:
        return None
    x, cos = found
    if rotary_dim != head_dim:  # partial: x must be q[..., :rotary_dim] of the same q
        if _slice_bound(x, start=False) != rotary_dim or x.args[0] is not node.args[0][1].args[0]:
            return None
    elif not isinstance(rotary_dim, int):
        return None
    inv_freq, source = _inv_freq_from_cos(cos, rotary_dim)
    return RopeSite(ROPE_ROTATE_HALF, rotary_dim, inv_freq, source)


def _rotate_half_terms(node: Any) -> tuple[fx.Node, fx.Node] | None:
    """x * cos + rotate_half(x) * sin -> (x, cos)."""
    if not is_function(node, *ADD):
        return None
    for plain, rotated in (node.args, node.args[::-1]):
        if not (is_function(plain, *MUL) and is_function(rotated, *MUL)):
            continue
        for x, cos in (plain.args, plain.args[::-1]):
            for half, _sin in (rotated.args, rotated.args[::-1]):
                if isinstance(x, fx.Node) and _is_rotate_half_of(half, x):
                    return x, cos
    return None


def _is_rotate_half_of(node: Any, x: fx.Node) -> bool:
    """cat((-x[..., h:], x[..., :h]), dim=-1) with h = half of x's last dim."""
    if not (is_function(node, *CAT) and _cat_dim(node) in (-1, 3) and len(node.args[0]) == 2):
        return False
    neg, first = node.args[0]
    if not is_function(neg, *NEG):
        return False
    second = neg.args[0]
    dim = (shape(x) or (None,))[-1]
    if not isinstance(dim, int) or dim % 2:
        return False
    half = dim // 2
    return (
        _slice_bound(second, start=True) == half and second.args[0] is x
        and _slice_bound(first, start=False) == half and first.args[0] is x
    )


def _slice_bound(node: Any, start: bool) -> int | None:
    """x[..., b:] (start) or x[..., :b] -> b."""
    if not is_function(node, operator.getitem):
        return None
    index = node.args[1]
    if not (isinstance(index, tuple) and len(index) == 2 and index[0] is Ellipsis):
        return None
    s = index[1]
    if not isinstance(s, slice) or s.step is not None:
        return None
    if start and s.stop is None and isinstance(s.start, int):
        return s.start
    if not start and s.start is None and isinstance(s.stop, int):
        return s.stop
    return None


def _cat_dim(node: fx.Node) -> Any:
    return arg(node, 1, "dim", 0)


def _inv_freq_from_cos(cos: Any, rotary_dim: int) -> tuple[fx.Node | None, str]:
    """cos <- [unsqueeze/to/* scaling] <- cos(cat(f, f)) <- f = (inv_freq @ positions)^T."""
    node = cos
    while is_method(node, "unsqueeze", "to", "float") or _is_new_axes(node) or (
        is_function(node, *MUL) and isinstance(node.args[1], (int, float))
    ):
        node = node.args[0]
    if not (is_method(node, "cos") or is_function(node, torch.cos)):
        return None, "not found: cos is not computed in the graph"
    emb = node.args[0]
    if not (is_function(emb, *CAT) and len(emb.args[0]) == 2 and emb.args[0][0] is emb.args[0][1]):
        return None, "not found: cos angle is not cat(freqs, freqs)"
    freqs = emb.args[0][0]
    if is_method(freqs, "transpose"):
        freqs = freqs.args[0]
    if not is_function(freqs, *MATMUL, *MUL):
        return None, "not found: angles are not inv_freq times positions"
    for operand in freqs.args:
        source = _strip_broadcast(operand)
        src_shape = shape(source)
        if src_shape is not None and len(src_shape) == 1 and src_shape[0] == rotary_dim // 2 \
                and value(source).is_floating_point():
            return source, f"inv_freq ({source.name})"
    return None, "not found: no 1-D [rotary_dim/2] frequency vector under the angles"


def _is_new_axes(node: Any) -> bool:
    """x[None, :, None]-style indexing: only inserts axes, values unchanged."""
    return is_function(node, operator.getitem) and isinstance(node.args[1], tuple) \
        and all(i is None or is_full_slice(i) for i in node.args[1])


def _strip_broadcast(node: Any) -> Any:
    while is_method(node, "to", "float", "expand") or _is_new_axes(node):
        node = node.args[0]
    return node


# --- complex pairs -----------------------------------------------------------------------------
def _pattern_complex_pairs(node: Any) -> RopeSite | None:
    if not (is_method(node, "flatten") or is_function(node, torch.flatten)):
        return None
    real = node.args[0]
    if not is_function(real, torch.view_as_real):
        return None
    product = real.args[0]
    if not is_function(product, *MUL):
        return None
    for x_complex, freqs in (product.args, product.args[::-1]):
        if not is_function(x_complex, torch.view_as_complex):
            continue
        pairs = x_complex.args[0]
        pair_shape = shape(pairs)
        if pair_shape is None or pair_shape[-1] != 2:
            continue
        rotary_dim = 2 * pair_shape[-2]
        table, source = _inv_freq_from_table(freqs, rotary_dim)
        return RopeSite(ROPE_INTERLEAVED, rotary_dim, table, source, inv_freq_is_table=True)
    return None


def _inv_freq_from_table(freqs: Any, rotary_dim: int) -> tuple[Any, str]:
    """A complex [max_positions, rotary_dim/2] table indexed by position: angle(table[1])."""
    node = freqs
    while is_method(node, "view", "reshape", "to") or is_function(node, operator.getitem):
        node = node.args[0]
    table = value(node)
    ok = isinstance(table, torch.Tensor) and table.is_complex() and table.dim() == 2 \
        and table.shape[-1] == rotary_dim // 2 and isinstance(table.shape[0], int) \
        and table.shape[0] > 1
    if node.op not in ("placeholder", "get_attr") or not ok:
        return None, "not found: complex frequencies do not come from a position table"
    return node, f"angle({node.name}[1]) (complex position table)"
