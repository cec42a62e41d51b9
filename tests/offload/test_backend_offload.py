"""The unmodified model compiled with the infinitehip backend, generating with OffloadedCache."""

import pytest
import torch

from ihip_compile.config import IHipConfig
from ihip_compile.offload import OffloadedCache
from tests.models import tiny_hf

# Sparse from 16 keys on, selection wide enough to cover every key of these prompts, so sparse
# attention equals dense and the generated tokens must match the uncompiled model's.
OPTIONS = {"dense_below_tokens": 16, "sink_tokens": 4, "sliding_window_tokens": 8,
           "selected_tokens": 48, "stages": [[16, 64], [8, 48]], "refresh_intervals": [3, 1]}


def _layers_with_their_own_window(config) -> set[int]:
    """Layers the model gives a sliding window of its own: they stay on the dense path."""
    kinds = getattr(config, "layer_types", None) or []
    windowed = {i for i, kind in enumerate(kinds) if kind == "sliding_attention"}
    if getattr(config, "sliding_window", None) and not kinds:
        windowed = set(range(config.num_hidden_layers))
    return windowed


@pytest.mark.parametrize("family", tiny_hf.FAMILIES)
def test_every_family_generates_as_eager_through_the_offloaded_sparse_path(family):
    torch._dynamo.reset()
    model = tiny_hf.build(family)
    ids = torch.randint(3, tiny_hf.VOCAB, (1, 36), generator=torch.Generator().manual_seed(0))
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    model.compile(backend="infinitehip_eager", options=OPTIONS)
    cache = OffloadedCache(model.config, max_cache_tokens=48, gpu_cache_tokens=32)
    got = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert torch.equal(got, want)
    sparse = set(range(model.config.num_hidden_layers)) - _layers_with_their_own_window(
        model.config)
    # every decode step of every other layer went the sparse way, through the banks
    assert cache.store.selection_states.steps == dict.fromkeys(sparse, 5)
    counts = cache.hit_counts()
    assert all(counts[i]["attention_hits"] + counts[i]["attention_misses"] > 0 for i in sparse)


def test_fp8_pruning_keys_are_what_the_pruning_bank_reads_and_generate_as_eager():
    # The selection covers every key here, so FP8 scores cannot change what is attended.
    torch._dynamo.reset()
    model = tiny_hf.build("llama")
    ids = torch.randint(3, tiny_hf.VOCAB, (1, 36), generator=torch.Generator().manual_seed(3))
    want = model.generate(ids, max_new_tokens=6, do_sample=False)
    options = {**OPTIONS, "fp8_pruning_keys": True}
    model.compile(backend="infinitehip_eager", options=options)
    cache = OffloadedCache(model.config, max_cache_tokens=48, gpu_cache_tokens=32,
                           ihip_config=IHipConfig.from_options(options))
    got = model.generate(ids, max_new_tokens=6, do_sample=False, past_key_values=cache)
    assert torch.equal(got, want)
    store = cache.store
    per_element = 2 * store._layer_host(0)["keys"].element_size() + 1  # keys, values, FP8 keys
    assert store.host_bytes == 48 * store.num_layers * store.kv_heads * store.head_dim * per_element
    for layer in range(model.config.num_hidden_layers):
        counts = cache.hit_counts()[layer]
        assert counts["pruning_hits"] + counts["pruning_misses"] > 0
        assert store.pruning_bank(layer).tensors["keys"].dtype == torch.float8_e4m3fn
        host = store._layer_host(layer)
        keys, _ = store.read_tokens(layer)
        fp8 = host["pruning_keys"].view(1, -1, *host["pruning_keys"].shape[1:])
        got_fp8 = fp8.permute(0, 2, 1, 3, 4).flatten(2, 3)[:, :, :keys.shape[2]]
        assert torch.equal(got_fp8.to(keys.dtype), keys.to(torch.float8_e4m3fn).to(keys.dtype))
