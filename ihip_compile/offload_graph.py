"""``offload_kv=True``: move a DynamicCache's keys and values to host memory, in the graph.

generate() makes a DynamicCache; Dynamo traces its growth as one ``torch.cat([past, new],
dim=-2)`` per layer for keys and one for values, each returned from the graph so the cache can
keep it. This rewrite replaces each such concat by ``ihip.kv_offload_concat`` (see
``kernels/cache_concat_offload.py``): the new tokens go to a host store, and the graph returns a
zero-stride proxy that the rewritten attention reads through the GPU block banks. The model and
the cache object are untouched; ``OffloadedCache`` is the explicit route with a fixed capacity,
a checked memory budget and hit counters on the cache.

Matches   torch.cat of two tensors along dim -2 (or 2 of a 4-D result), the first a graph input
          or an empty tensor, the result a graph output, in a module with a layer index
Skips     concats without a layer index (the graph then keeps them; reported in the count)
Order     after the attention passes (the attention op must already consume the concat)
"""

from __future__ import annotations

import torch
from torch import fx

from ihip_compile.config import IHipConfig
from ihip_compile.kernels import cache_concat_offload  # noqa: F401  (registers the op)
from ihip_compile.passes.graph_facts import layer_index


def _is_cache_concat(node: fx.Node) -> bool:
    if node.op != "call_function" or node.target is not torch.cat:
        return False
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim", 0)
    if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or dim not in (-2, 2):
        return False
    returned = any(user.op == "output" for user in node.users)
    past = tensors[0]
    return returned and isinstance(past, fx.Node) and past.op in ("placeholder", "call_function",
                                                                  "get_attr")


def offload_cache_concats(gm: fx.GraphModule, config: IHipConfig) -> dict[str, int]:
    """Rewrite the cache concats of ``gm`` in place; returns counts of rewritten and skipped."""
    concats = [n for n in gm.graph.nodes if _is_cache_concat(n)]
    layers = {n: layer_index(n) for n in concats}
    found = [n for n in concats if layers[n] is not None]
    if not found:
        return {"rewritten": 0, "skipped": len(concats)}
    num_layers = max(layers[n] for n in found) + 1
    seen: dict[int, int] = {}
    for node in found:
        layer = layers[node]
        is_value = seen.get(layer, 0) == 1  # DynamicLayer.update concatenates keys, then values
        seen[layer] = seen.get(layer, 0) + 1
        past, new = node.args[0] if node.args else node.kwargs["tensors"]
        with gm.graph.inserting_before(node):
            replacement = gm.graph.call_function(
                torch.ops.ihip.kv_offload_concat.default, (past, new),
                {"layer": layer, "num_layers": num_layers, "is_value": is_value,
                 "block_tokens": config.block_size_k,
                 "gpu_cache_tokens": config.gpu_cache_tokens,
                 "pruning_cache_tokens": config.pruning_bank_tokens(),
                 "cuda_graphs": config.decode_cuda_graphs,
                 "fp8_pruning_keys": config.fp8_pruning_keys},
            )
        replacement.meta.update({k: v for k, v in node.meta.items()
                                 if k in ("nn_module_stack", "stack_trace", "source_fn_stack")})
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    return {"rewritten": len(found), "skipped": len(concats) - len(found)}
