"""Remove nodes whose values nobody uses, never in-place or impure ones.

Matches   call_function / call_method nodes without users.
Emits     nothing; erases them (the replaced mask subgraphs and repeat_kv expansions).
Skips     in-place methods and functions (``index_copy_``, ``add_``: a static cache is written
          this way), ``operator.setitem``, nodes FX considers impure, placeholders and outputs.
          ``Graph.eliminate_dead_code`` treats in-place method calls as pure and deleted a
          static cache's ``index_copy_`` (wrong tokens), hence this pass.
Order     last.
"""

from __future__ import annotations

import operator

import torch.fx as fx
from torch.fx.passes.infra.pass_base import PassResult

from ihip_compile.passes.sites import PassContext


def remove_dead_code(gm: fx.GraphModule, context: PassContext) -> PassResult:
    removed = []
    for node in reversed(list(gm.graph.nodes)):
        if node.users or not is_removable(node):
            continue
        removed.append(node.name)
        gm.graph.erase_node(node)
    context.removed_nodes.extend(sorted(removed))
    if removed:
        gm.graph.lint()
        gm.recompile()
    return PassResult(gm, bool(removed))


# Python's in-place operators (operator.and_ is not one: it ends in "_" but returns a new value).
_INPLACE_OPERATORS = frozenset({
    operator.iadd, operator.isub, operator.imul, operator.itruediv, operator.ifloordiv,
    operator.imod, operator.ipow, operator.iand, operator.ior, operator.ixor, operator.ilshift,
    operator.irshift, operator.imatmul, operator.setitem, operator.delitem,
})


def is_removable(node: fx.Node) -> bool:
    if node.op not in ("call_function", "call_method"):
        return False
    if getattr(node.target, "__module__", None) in ("_operator", "operator"):
        return node.target not in _INPLACE_OPERATORS
    name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
    if name.endswith("_") and not name.endswith("__"):
        return False  # in-place: index_copy_, add_, copy_, ...
    schema = getattr(node.target, "_schema", None)
    if schema is not None and schema.is_mutable:
        return False
    return not node.is_impure()
