"""Small read-only questions about Dynamo FX nodes, shared by the matchers.

Dynamo graphs use ``call_method`` for tensor methods and ``call_function`` for free functions and
operators; these helpers accept both spellings so matchers read as the model code does.
"""

from __future__ import annotations

import operator
import re
from typing import Any, Iterable

import torch
import torch.fx as fx

_LAYER_PATTERN = re.compile(r"\.(?:layers|layer|h|blocks|block)(?:\[|\.)(?:')?(\d+)")


def is_method(node: Any, *names: str) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_method" and node.target in names


def is_function(node: Any, *targets: Any) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def value(node: Any) -> Any:
    """The fake value Dynamo recorded for a node (tensor, SymInt, ...), or None."""
    if not isinstance(node, fx.Node):
        return None
    return node.meta.get("example_value", node.meta.get("val"))


def shape(node: Any) -> tuple | None:
    v = value(node)
    return tuple(v.shape) if isinstance(v, torch.Tensor) else None


def same_size(a: Any, b: Any) -> bool:
    """Sizes known equal for every input (same int, or the same symbolic expression)."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return str(a) == str(b)


def only_user(node: fx.Node) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def arg(node: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def is_full_slice(s: Any) -> bool:
    return isinstance(s, slice) and s == slice(None, None, None)


def layer_index(node: fx.Node) -> int | None:
    """Layer number from the module path Dynamo recorded (``...layers[3].self_attn``)."""
    stack = node.meta.get("nn_module_stack") or {}
    found = None
    for path, _type in stack.values():
        match = _LAYER_PATTERN.search(str(path))
        if match:
            found = int(match.group(1))
    return found


def strip_passthrough(node: Any, methods: Iterable[str] = ("to", "contiguous", "float")) -> Any:
    """Walk up through calls that do not change values of a float tensor (dtype kept)."""
    methods = tuple(methods)
    while is_method(node, *methods) and _keeps_dtype(node):
        node = node.args[0]
    return node


def _keeps_dtype(node: fx.Node) -> bool:
    before, after = value(node.args[0]), value(node)
    if isinstance(before, torch.Tensor) and isinstance(after, torch.Tensor):
        return before.dtype == after.dtype
    return False


ADD = (operator.add, torch.add)
SUB = (operator.sub, torch.sub)
MUL = (operator.mul, torch.mul)
DIV = (operator.truediv, torch.div)
NEG = (operator.neg, torch.neg)
CAT = (torch.cat, torch.concat, torch.concatenate)
MATMUL = (operator.matmul, torch.matmul, torch.bmm)
SOFTMAX = (torch.nn.functional.softmax, torch.softmax, torch.Tensor.softmax)
SDPA = (
    torch._C._nn.scaled_dot_product_attention,
    torch.nn.functional.scaled_dot_product_attention,
)
