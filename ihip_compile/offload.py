"""OffloadedCache: a transformers ``Cache`` whose keys and values live in host memory.

    cache = OffloadedCache(model.config, max_cache_tokens=len(prompt) + max_new_tokens)
    model.compile(backend="infinitehip")
    out = model.generate(ids, attention_mask=torch.ones_like(ids), past_key_values=cache,
                         max_new_tokens=...)   # the mask: ``chunked_prefill``'s docstring

How it reaches the compiled graph. Dynamo inlines ``Cache.update`` but never sees the cache
object. Our ``update()`` calls the custom op ``ihip.kv_store_append(key, value, store_id, layer)``,
which copies the new tokens into a host store owned by the op layer (``kernels/kv_store.py``) and
returns a one-element NaN marker. The cache returns ``marker.expand(B, H_KV, S_K, D)`` as "the
keys": the right shape for transformers (masks, ``repeat_kv``), no memory, and a data dependency
that orders the append before the attention. ``ihip.attention`` recognises the proxy and reads
from the store through the GPU block banks (``kernels/offloaded_attention.py``). The proxy's shape
grows every step; Dynamo marks that dimension dynamic after the first decode step, so decoding
does not recompile. Attention that is not ours (an uncompiled model, a site left dense) would read
NaN: wrong use fails loudly, never silently.

Host memory: pinned when the model runs on CUDA. The whole capacity (``max_cache_tokens``) is
checked against available host memory when the cache is made, before anything is allocated; each
layer's storage is allocated at its first token.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache, DynamicLayer

from ihip_compile.config import IHipConfig
from ihip_compile.kernels.kv_store import HostKVStore, register_store


class OffloadedLayer(DynamicLayer):
    """One layer: stores nothing itself; its keys/values are zero-stride proxies."""

    def __init__(self, store_id: torch.Tensor, layer_idx: int):
        super().__init__()
        self.store_id = store_id
        self.layer_idx = layer_idx

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.dtype, self.device = key_states.dtype, key_states.device
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs):
        past = 0
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        elif self.keys is not None:
            past = self.keys.shape[-2]
        marker = torch.ops.ihip.kv_store_append(
            key_states, value_states, self.store_id, self.layer_idx
        ).view(1, 1, 1, 1)
        batch, heads, new, _ = key_states.shape
        self.keys = marker.expand(batch, heads, past + new, key_states.shape[-1])
        self.values = marker.expand(batch, heads, past + new, value_states.shape[-1])
        return self.keys, self.values

    def reset(self) -> None:
        self.keys = self.values = None
        self.is_initialized = False

    def _unsupported(self, *args, **kwargs):
        raise NotImplementedError(
            "OffloadedCache supports greedy and sampled generation of a fixed batch; cropping, "
            "beam search and batch reordering are not supported"
        )

    crop = reorder_cache = batch_repeat_interleave = batch_select_indices = _unsupported
    offload = prefetch = _unsupported


class OffloadedCache(Cache):
    """KV cache in host memory with GPU banks of recently used blocks (see module docstring).

    Shapes come from ``model_config`` (a transformers config) unless given. ``gpu_cache_tokens``
    sizes each layer's attention bank and ``pruning_cache_tokens`` its pruning bank (defaults:
    ``IHipConfig.gpu_cache_tokens`` and ``IHipConfig.pruning_bank_tokens``: by default twice
    the attention bank's);
    ``storage_dtype=torch.float8_e4m3fn`` halves host memory and PCIe traffic (lossy);
    ``IHipConfig.fp8_pruning_keys`` keeps an FP8 copy of the keys for the pruning stages alone.
    ``cuda_graphs`` (default: ``IHipConfig.decode_cuda_graphs``) replays each layer's decode
    append and attention as CUDA graphs on CUDA.
    """

    def __init__(self, model_config=None, *, max_cache_tokens: int, batch_size: int = 1,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                 gpu_cache_tokens: int | None = None, pruning_cache_tokens: int | None = None,
                 storage_dtype: torch.dtype | None = None, ihip_config: IHipConfig | None = None,
                 num_layers: int | None = None, kv_heads: int | None = None,
                 head_dim: int | None = None, cuda_graphs: bool | None = None):
        ihip_config = ihip_config or IHipConfig()
        num_layers = num_layers or _config_value(model_config, "num_hidden_layers")
        heads = _config_value(model_config, "num_attention_heads", required=kv_heads is None)
        kv_heads = kv_heads or _config_value(model_config, "num_key_value_heads", False) or heads
        head_dim = head_dim or _config_value(model_config, "head_dim", False) or (
            _config_value(model_config, "hidden_size") // heads
        )
        dtype = dtype or _config_value(model_config, "dtype", False) or torch.get_default_dtype()
        if isinstance(dtype, str):
            dtype = getattr(torch, dtype)
        if storage_dtype not in (None, dtype, torch.float8_e4m3fn):
            raise ValueError(f"storage_dtype must be None, {dtype} or torch.float8_e4m3fn, "
                             f"got {storage_dtype}")
        gpu_cache_tokens = gpu_cache_tokens or ihip_config.gpu_cache_tokens
        self.store = HostKVStore(
            num_layers=num_layers, batch=batch_size, kv_heads=kv_heads, head_dim=head_dim,
            value_dim=head_dim, capacity_tokens=max_cache_tokens,
            block_tokens=ihip_config.block_size_k, dtype=dtype, device=device,
            storage_dtype=storage_dtype,
            pruning_key_dtype=torch.float8_e4m3fn if ihip_config.fp8_pruning_keys else None,
            attention_bank_tokens=gpu_cache_tokens,
            pruning_bank_tokens=(pruning_cache_tokens
                                 or ihip_config.pruning_bank_tokens(gpu_cache_tokens)),
            cuda_graphs=(ihip_config.decode_cuda_graphs if cuda_graphs is None
                         else cuda_graphs),
        )
        store_id = register_store(self.store)
        super().__init__(layers=[OffloadedLayer(store_id, i) for i in range(num_layers)])

    def reset(self) -> None:
        """Forget all tokens (reuse the cache for a new prompt); host memory is kept."""
        self.store.reset()
        for layer in self.layers:
            layer.reset()

    def allocate(self) -> None:
        """Allocate (and on CUDA pin) the host memory of every layer now, at full capacity;
        otherwise each layer allocates at its first token, inside the first prompt's time."""
        self.store.allocate()

    def hit_counts(self) -> list[dict[str, int]]:
        """Per layer: hits/misses of the attention and pruning banks, blocks streamed past them."""
        return self.store.hit_counts()

    def hit_ratios(self) -> dict[str, float | None]:
        """Overall hit ratio of each bank (None before any read)."""
        totals = {}
        for kind in ("attention", "pruning"):
            hits = sum(row[f"{kind}_hits"] for row in self.hit_counts())
            misses = sum(row[f"{kind}_misses"] for row in self.hit_counts())
            totals[kind] = hits / (hits + misses) if hits + misses else None
        return totals

    @property
    def host_bytes(self) -> int:
        return self.store.host_bytes

    @property
    def gpu_bytes(self) -> int:
        """Device memory the block banks and stage 0's probe copies hold now (scratch buffers not
        included; a prompt's chunk gives them back, the next decode step makes them again)."""
        return self.store.gpu_bytes


def _config_value(config, name: str, required: bool = True):
    value = getattr(config, name, None) if config is not None else None
    if value is None and required:
        raise ValueError(f"OffloadedCache needs {name}: pass a model config that has it, or the "
                         f"matching keyword argument")
    return value
