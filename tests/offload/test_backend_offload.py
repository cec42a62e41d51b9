"""The unmodified model compiled with the infinitehip backend, generating with OffloadedCache."""

import pytest
import torch

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
