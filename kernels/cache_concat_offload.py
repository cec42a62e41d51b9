"""Offload for transformers' plain DynamicCache: the op that replaces its ``torch.cat``.

With ``options={"offload_kv": True}`` the backend rewrites each ``torch.cat([past, new], dim=-2)``
by which a DynamicCache layer grows (``ihip_compile/offload_graph.py``) into
``ihip.kv_offload_concat(past, new, layer=..., is_value=...)``. The op appends ``new`` to a host
store owned here (one per model shape and device, grown on demand) and returns a zero-stride NaN
proxy of the concatenated shape, which DynamicCache keeps as its "keys"/"values" and the attention
op resolves through the store (as for ``OffloadedCache``, see ``kv_store``). A call whose past is
empty starts a new sequence for that layer. Keys and values of a layer arrive as two calls, in
either order; the store appends them once both are there, always before the attention that reads
the proxies runs. The first to arrive waits as a copy (its buffer may be reused meanwhile).
"""

from __future__ import annotations

import torch

from ihip_compile.kernels import kv_store
from ihip_compile.kernels.kv_store import HostKVStore

# Initial capacity of a store; it doubles when a sequence outgrows it.
INITIAL_TOKENS = 65536

_STORES: dict[tuple, HostKVStore] = {}
_PENDING: dict[tuple, dict[str, torch.Tensor]] = {}

_lib = torch.library.Library("ihip", "FRAGMENT")
_lib.define(
    "kv_offload_concat(Tensor past, Tensor new, *, int layer, int num_layers, bool is_value, "
    "int block_tokens, int gpu_cache_tokens, int pruning_cache_tokens, bool cuda_graphs, "
    "bool fp8_pruning_keys=False) -> Tensor"
)


def _past_tokens(past: torch.Tensor):
    return past.shape[-2] if past.dim() == 4 else 0  # an empty 1-D tensor before the first step


def _store_for(new: torch.Tensor, num_layers: int, block_tokens: int, gpu_cache_tokens: int,
               pruning_cache_tokens: int, cuda_graphs: bool, fp8_pruning_keys: bool):
    batch, heads, _, dim = new.shape
    key = (num_layers, batch, heads, dim, new.dtype, new.device, block_tokens, gpu_cache_tokens,
           pruning_cache_tokens, cuda_graphs, fp8_pruning_keys)
    if key not in _STORES:
        _STORES[key] = HostKVStore(
            num_layers=num_layers, batch=batch, kv_heads=heads, head_dim=dim, value_dim=dim,
            capacity_tokens=INITIAL_TOKENS, block_tokens=block_tokens, dtype=new.dtype,
            device=new.device, attention_bank_tokens=gpu_cache_tokens,
            pruning_bank_tokens=pruning_cache_tokens, cuda_graphs=cuda_graphs,
            pruning_key_dtype=torch.float8_e4m3fn if fp8_pruning_keys else None,
        )
    return _STORES[key]


def _kv_offload_concat(past, new, *, layer, num_layers, is_value, block_tokens,
                       gpu_cache_tokens, pruning_cache_tokens, cuda_graphs,
                       fp8_pruning_keys=False):
    store = _store_for(new, num_layers, block_tokens, gpu_cache_tokens, pruning_cache_tokens,
                       cuda_graphs, fp8_pruning_keys)
    past_tokens = _past_tokens(past)
    pending = _PENDING.setdefault((id(store), layer), {})
    if past_tokens == 0 and not pending:
        store.reset_layer(layer)  # a new sequence
    if store.lengths[layer] != past_tokens:
        raise ValueError(
            f"layer {layer}: the cache passed {past_tokens} past tokens but the offloaded store "
            f"holds {store.lengths[layer]}; with offload_kv one DynamicCache at a time can grow"
        )
    # The first half to arrive waits for the other in a copy: a compiler that plans the graph's
    # buffers (Inductor) may write another result into ``new``'s memory once this op has run.
    pending["values" if is_value else "keys"] = new if pending else new.clone()
    if len(pending) == 2:
        end = past_tokens + new.shape[-2]
        if end > store.capacity_tokens:
            store.grow(max(end, 2 * store.capacity_tokens))
        store.append(layer, pending.pop("keys"), pending.pop("values"))
        kv_store.mark_appended(layer, store)
    shape = (*new.shape[:2], past_tokens + new.shape[-2], new.shape[-1])
    marker = torch.full((1,), float("nan"), dtype=new.dtype, device=new.device)
    return marker.as_strided(shape, (0, 0, 0, 0))


torch.library.impl("ihip::kv_offload_concat", "CompositeExplicitAutograd", lib=_lib)(
    _kv_offload_concat
)


@torch.library.register_fake("ihip::kv_offload_concat", lib=_lib)
def _kv_offload_concat_fake(past, new, **_scalars):
    shape = (*new.shape[:2], _past_tokens(past) + new.shape[-2], new.shape[-1])
    return new.new_empty_strided(shape, (0, 0, 0, 0))
