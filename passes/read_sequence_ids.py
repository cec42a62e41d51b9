"""Prove that transformers' packed-sequence ids are one sequence per row.

Without an attention mask and without a cache (``use_cache=False``, training-style forwards),
transformers 5.17 ``_preprocess_mask_arguments`` looks for several sequences packed into one row
and adds ``ids[batch, q] == ids[batch, kv]`` to the mask, with ids built in the graph as
    first    = positions[:, :1] - 1
    ids      = (torch.diff(positions, prepend=first, dim=-1) != 1).cumsum(-1)
Eager code drops the predicate when every row is one sequence, but a traced graph cannot, so it
stays in the graph. When the positions are provably consecutive in every row, i.e.
    positions = (arange(S) + c).unsqueeze(0)   optionally .expand(B, -1)   c: an integer
every difference is 1, ``!= 1`` is false everywhere, the cumulative sum is 0 everywhere and the
predicate is true for every (batch, q, kv): it changes nothing. Position ids handed in by the
caller (a graph input) may really be packed and are never accepted.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx

from ihip_compile.passes.graph_facts import ADD, SUB, arg, is_full_slice, is_function, is_method, value

_LAST_AXIS_OF_2D = (-1, 1)


def why_not_one_sequence(ids: fx.Node) -> str | None:
    """None when ``ids`` is provably the all-zero sequence-id tensor of consecutive positions;
    otherwise the reason it is not."""
    if not (is_method(ids, "cumsum") or is_function(ids, torch.cumsum)):
        return f"sequence ids {_name(ids)} are not a cumsum"
    ne = ids.args[0]
    if not (is_function(ne, operator.ne, torch.ne) and _is_int(arg(ne, 1, "other"), 1)):
        return f"sequence ids {_name(ids)} do not count position steps != 1"
    diff = ne.args[0]
    if not is_function(diff, torch.diff):
        return f"{_name(diff)} is not torch.diff of the positions"
    positions = arg(diff, 0, "input")
    n, dim = arg(diff, 1, "n", 1), arg(diff, 2, "dim", -1)
    prepend, append = arg(diff, 3, "prepend"), arg(diff, 4, "append")
    if not _is_int(n, 1) or dim not in _LAST_AXIS_OF_2D or append is not None:
        return f"{_name(diff)} is not a first difference along the sequence"
    if not _is_first_minus_one(prepend, positions):
        return f"{_name(diff)} does not prepend positions[:, :1] - 1"
    return _why_not_consecutive(positions)


def _is_first_minus_one(prepend: Any, positions: fx.Node) -> bool:
    if not (is_function(prepend, *SUB) and _is_int(prepend.args[1], 1)):
        return False
    first = prepend.args[0]
    if not (is_function(first, operator.getitem) and first.args[0] is positions):
        return False
    index = first.args[1]
    return (isinstance(index, tuple) and len(index) == 2 and is_full_slice(index[0])
            and index[1] == slice(None, 1, None))


def _why_not_consecutive(positions: Any) -> str | None:
    """``positions`` must be (arange(S) + c).unsqueeze(0), optionally expanded over the batch."""
    if is_method(positions, "expand"):
        if not (len(positions.args) == 3 and positions.args[2] == -1):
            return f"positions {_name(positions)} are expanded along the sequence"
        positions = positions.args[0]
    if not ((is_method(positions, "unsqueeze") or is_function(positions, torch.unsqueeze))
            and arg(positions, 1, "dim") == 0):
        return (f"positions {_name(positions)} are not a 1-D vector unsqueezed to [1, S] "
                "(position ids given by the caller may hold packed sequences)")
    vector = positions.args[0]
    if is_function(vector, *ADD):
        vector, offset = vector.args
        offset_value = value(offset) if isinstance(offset, fx.Node) else offset
        if not isinstance(offset_value, (int, torch.SymInt)) or isinstance(offset_value, bool):
            return f"positions add {offset!r}, not an integer offset"
    if not (is_function(vector, torch.arange) and len(vector.args) == 1
            and set(vector.kwargs) <= {"device"}):
        return f"positions {_name(vector)} are not arange(S) + offset"
    return None


def _is_int(x: Any, expected: int) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x == expected


def _name(x: Any) -> str:
    return x.name if isinstance(x, fx.Node) else repr(x)
