"""Read the boolean mask subgraph that transformers builds in the graph into a compact description.

Matches   the vmap-free mask of transformers 5.17 ``sdpa_mask``, index vectors
              q = q_arange[None, None, :, None]      kv = kv_arange[None, None, None, :]
          combined with ``&`` from exactly these predicates (``new_ones`` is "true", ``.to(device)``
          and the final ``expand`` change nothing):
              causal          kv <= q
              sliding window  kv > q - W                      (W: an int constant)
              padding         padding_2d[batch[:, None, None, None], kv]
              one sequence    ids[batch, q] == ids[batch, kv]   (ids: the packed-sequence ids of
                              provably consecutive positions, always true; read_sequence_ids.py)
          and the eager form ``torch.where(mask, 0.0, min_float)`` of the same.
Emits     MaskDescription (q vector, kv arange and offset, window, padding source), nothing else:
          the rewrite pass turns it into ``q_positions`` and ``kv_valid``.
Skips     any other op in the subgraph, a mask without the causal predicate (bidirectional or
          arbitrary), two windows or two padding reads, a kv vector that is not arange(S_K) + c,
          vectors whose lengths differ from the attention's S_Q / S_K, sequence ids that may hold
          several packed sequences (position ids given by the caller or not consecutive).
"""

from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Any

import torch
import torch.fx as fx

from ihip_compile.passes.graph_facts import (
    ADD, SUB, arg, is_full_slice, is_function, is_method, same_size, shape, value,
)
from ihip_compile.passes.read_sequence_ids import why_not_one_sequence
from ihip_compile.passes.sites import MaskDescription

# transformers fills masked scores with the dtype's minimum; anything at or below the minimum of
# the smallest float type we accept still zeroes the softmax weight.
_ADDITIVE_FILL_AT_MOST = torch.finfo(torch.bfloat16).min


class MaskNotUnderstood(Exception):
    """The mask subgraph holds something we cannot describe exactly."""


@dataclass(frozen=True)
class _Index:
    axis: str  # "q", "kv" or "batch"
    vector: fx.Node  # the 1-D tensor before unsqueezing
    offset: int  # added constant (the window shift)


@dataclass(frozen=True)
class _Predicates:
    items: frozenset  # of ("causal", q, kv), ("window", q, kv, W), ("padding", source, batch, kv),
    # ("one_sequence", q, kv, ids)


_TRUE = _Predicates(frozenset())
_AXIS_BY_INDEX = {
    (None, None, "s", None): "q",
    (None, None, None, "s"): "kv",
    ("s", None, None, None): "batch",
}


def read_mask(mask: fx.Node, s_q: Any, s_k: Any) -> MaskDescription:
    """Describe ``mask``; raises MaskNotUnderstood with the reason when it is not exactly a
    causal (+ window, + padding) mask for S_Q queries and S_K keys."""
    kind = "sdpa_bool"
    if is_function(mask, torch.where):
        mask, kind = _additive_source(mask), "additive"
    term = _read(mask)
    if not isinstance(term, _Predicates):
        raise MaskNotUnderstood(f"mask node {mask.name} is not a boolean predicate")
    causal = [p for p in term.items if p[0] == "causal"]
    windows = [p for p in term.items if p[0] == "window"]
    paddings = [p for p in term.items if p[0] == "padding"]
    if not causal:
        raise MaskNotUnderstood("mask has no causal predicate (bidirectional or arbitrary mask)")
    if len(windows) > 1 or len(paddings) > 1:
        raise MaskNotUnderstood("mask combines several windows or padding reads")
    indexed_by_q = ("causal", "window", "one_sequence")
    q_vectors = {p[1] for p in term.items if p[0] in indexed_by_q}
    kv_vectors = {p[2] for p in term.items if p[0] in indexed_by_q}
    kv_vectors |= {p[3] for p in paddings}
    if len(q_vectors) != 1 or len(kv_vectors) != 1:
        raise MaskNotUnderstood("mask predicates use different query or key index vectors")
    (q_vec,), (kv_vec,) = q_vectors, kv_vectors
    kv_offset = _arange_offset(kv_vec, s_k)
    q_shape = shape(q_vec)
    if q_shape is None or len(q_shape) != 1 or not same_size(q_shape[0], s_q):
        raise MaskNotUnderstood(f"query index vector {q_vec.name} is not [S_Q]")
    for _, _, _, ids in (p for p in term.items if p[0] == "one_sequence"):
        ids_shape = shape(ids)
        if ids_shape is None or len(ids_shape) != 2 or not same_size(ids_shape[1], s_q) \
                or not same_size(ids_shape[1], s_k):
            raise MaskNotUnderstood(f"sequence ids {ids.name} do not cover S_Q = S_K")
    padding = paddings[0] if paddings else None
    return MaskDescription(
        q_indices=q_vec,
        kv_indices=kv_vec,
        kv_offset=kv_offset,
        window=windows[0][3] if windows else 0,
        padding_source=padding[1] if padding else None,
        batch_indices=padding[2] if padding else None,
        kind=kind,
    )


def _additive_source(node: fx.Node) -> fx.Node:
    """``torch.where(bool_mask, 0.0, fill)``: return bool_mask when fill is a large negative."""
    cond, keep, fill = (arg(node, i, n) for i, n in enumerate(("condition", "input", "other")))
    keep_value = _scalar(keep)
    if keep_value != 0.0 or not isinstance(fill, (int, float)) or fill > _ADDITIVE_FILL_AT_MOST:
        raise MaskNotUnderstood(f"additive mask {node.name} is not where(mask, 0, -large)")
    return cond


def _scalar(x: Any) -> float | None:
    if isinstance(x, (int, float)):
        return float(x)
    if is_function(x, torch.tensor) and isinstance(x.args[0], (int, float)):
        return float(x.args[0])
    return None


def _arange_offset(vec: fx.Node, s_k: Any) -> Any:
    """``vec`` must be arange(S_K) (+ c): return c (int or SymInt node)."""
    offset: Any = 0
    base = vec
    if is_function(vec, *ADD):
        base, offset = vec.args
    if not (is_function(base, torch.arange) and len(base.args) == 1):
        raise MaskNotUnderstood(f"key index vector {vec.name} is not arange(S_K) + offset")
    if not same_size(base.args[0], s_k) and not same_size(value(base.args[0]), s_k):
        raise MaskNotUnderstood(
            f"key index vector {vec.name} has {base.args[0]} keys, not S_K={s_k}"
        )
    if isinstance(offset, fx.Node) and isinstance(value(offset), torch.Tensor):
        raise MaskNotUnderstood(f"key offset {offset.name} is a tensor, not an integer")
    return offset


def _read(node: Any) -> Any:
    if not isinstance(node, fx.Node):
        raise MaskNotUnderstood(f"mask uses the constant {node!r} where a causal predicate or "
                                "index was expected")
    if node.op in ("placeholder", "get_attr"):
        raise MaskNotUnderstood(
            f"mask reads graph input {node.name}: built outside the compiled graph (e.g. by "
            "generate() for a static cache; see keep_generation_masks_in_graph)"
        )
    if is_method(node, "to", "expand"):
        if is_method(node, "to") and _changes_dtype(node):
            raise MaskNotUnderstood(f"{node.name} converts the mask's dtype")
        return _read(node.args[0])
    if is_method(node, "new_ones") and node.kwargs.get("dtype") == torch.bool:
        return _TRUE
    if is_function(node, operator.and_, torch.logical_and, torch.bitwise_and):
        left, right = _read(node.args[0]), _read(node.args[1])
        if not (isinstance(left, _Predicates) and isinstance(right, _Predicates)):
            raise MaskNotUnderstood(f"{node.name} combines non-boolean terms")
        return _Predicates(left.items | right.items)
    if is_function(node, operator.getitem):
        return _read_getitem(node)
    if is_function(node, *ADD, *SUB):
        return _read_shift(node)
    if is_function(node, operator.le, operator.ge, operator.gt, operator.lt):
        return _read_compare(node)
    if is_function(node, operator.eq, torch.eq):
        return _read_same_sequence(node)
    raise MaskNotUnderstood(f"mask built with unsupported op: {node.format_node()}")


def _changes_dtype(node: fx.Node) -> bool:
    before, after = value(node.args[0]), value(node)
    return not (
        isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor)
        and before.dtype == after.dtype
    )


def _read_getitem(node: fx.Node) -> Any:
    source, index = node.args
    if isinstance(index, tuple) and len(index) == 4:
        key = tuple("s" if is_full_slice(i) else i for i in index)
        if key in _AXIS_BY_INDEX and len(shape(source) or ()) == 1:
            return _Index(_AXIS_BY_INDEX[key], source, 0)
    if isinstance(index, tuple) and len(index) == 2 and all(isinstance(i, fx.Node) for i in index):
        batch, kv = _read(index[0]), _read(index[1])
        ok = isinstance(batch, _Index) and isinstance(kv, _Index)
        if ok and batch.axis == "batch" and kv.axis == "kv" and kv.offset == 0:
            src_value = value(source)
            if isinstance(src_value, torch.Tensor) and src_value.dtype == torch.bool \
                    and src_value.dim() == 2:
                return _Predicates(frozenset({("padding", source, batch.vector, kv.vector)}))
    raise MaskNotUnderstood(f"mask indexing not understood: {node.format_node()}")


def _read_same_sequence(node: fx.Node) -> _Predicates:
    """``ids[batch, q] == ids[batch, kv]``: true everywhere when ``ids`` provably holds one
    sequence per row; anything else compared with ``==`` is refused."""
    lookups = [_sequence_id_lookup(side, node) for side in node.args[:2]]
    (ids_a, axis_a), (ids_b, axis_b) = lookups
    if ids_a is not ids_b or {axis_a.axis, axis_b.axis} != {"q", "kv"}:
        raise MaskNotUnderstood(f"mask built with unsupported op: {node.format_node()} "
                                "(the only equality read is ids[batch, q] == ids[batch, kv])")
    reason = why_not_one_sequence(ids_a)
    if reason is not None:
        raise MaskNotUnderstood(f"{node.name} may separate packed sequences: {reason}")
    q, kv = (axis_a, axis_b) if axis_a.axis == "q" else (axis_b, axis_a)
    return _Predicates(frozenset({("one_sequence", q.vector, kv.vector, ids_a)}))


def _sequence_id_lookup(side: Any, node: fx.Node) -> tuple[fx.Node, _Index]:
    """``ids[batch, index]`` with un-shifted batch and q or kv index vectors."""
    if is_function(side, operator.getitem) and isinstance(side.args[1], tuple) \
            and len(side.args[1]) == 2 and all(isinstance(i, fx.Node) for i in side.args[1]):
        batch, index = (_read(i) for i in side.args[1])
        if isinstance(batch, _Index) and isinstance(index, _Index) and batch.axis == "batch" \
                and index.axis in ("q", "kv") and batch.offset == 0 and index.offset == 0:
            return side.args[0], index
    raise MaskNotUnderstood(f"mask built with unsupported op: {node.format_node()} (the only "
                            "equality read is ids[batch, q] == ids[batch, kv])")


def _read_shift(node: fx.Node) -> _Index:
    base, amount = node.args
    term = _read(base)
    if not isinstance(term, _Index) or not isinstance(amount, int) or isinstance(amount, bool):
        raise MaskNotUnderstood(f"index shift not understood: {node.format_node()}")
    sign = 1 if is_function(node, *ADD) else -1
    return _Index(term.axis, term.vector, term.offset + sign * amount)


def _read_compare(node: fx.Node) -> _Predicates:
    left, right = _read(node.args[0]), _read(node.args[1])
    if not (isinstance(left, _Index) and isinstance(right, _Index)):
        raise MaskNotUnderstood(f"comparison of non-index terms: {node.format_node()}")
    op = node.target
    if left.axis == "q":  # normalise to "kv <op> q"
        left, right = right, left
        op = {operator.le: operator.ge, operator.ge: operator.le,
              operator.lt: operator.gt, operator.gt: operator.lt}[op]
    if left.axis != "kv" or right.axis != "q" or left.offset != 0:
        raise MaskNotUnderstood(f"comparison between unexpected axes: {node.format_node()}")
    if op is operator.le and right.offset == 0:
        return _Predicates(frozenset({("causal", right.vector, left.vector)}))
    if op is operator.gt and right.offset < 0:
        return _Predicates(frozenset({("window", right.vector, left.vector, -right.offset)}))
    raise MaskNotUnderstood(
        f"comparison is neither causal nor a sliding window: {node.format_node()}"
    )
